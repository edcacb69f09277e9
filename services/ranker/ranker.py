"""The dense half at serving time: DLRM scoring on CUDA when present (else CPU), and top-k.

``Ranker.score`` is synchronous and thread-safe for one caller at a time per device stream;
the frontend calls it through ``score_async``, which runs it in a dedicated single-thread
executor so the event loop never blocks on a forward pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from services.core.dense import build_dlrm, scores_from_logits
from services.core.types import DenseArch


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; or an explicit torch device string."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Ranker:
    """One version of the dense model on one device."""

    def __init__(
        self, arch: DenseArch, state: Mapping[str, np.ndarray], device: str = "auto", *, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self.device = pick_device(device)
        self.arch = arch
        self._model = build_dlrm(arch, state).to(self.device)
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker")

    def with_weights(self, state: Mapping[str, np.ndarray]) -> "Ranker":
        """The same architecture and device with other weights (a new version), sharing this
        ranker's executor: batches still running on this one finish. Closing the ranker that
        created the executor shuts it down; closing the new one does nothing."""
        return Ranker(self.arch, state, str(self.device), executor=self._executor)

    def score(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """``dense`` float32 [B, num_dense], ``sparse`` float32 [B, F, D] -> scores float32 [B]."""
        with torch.inference_mode():
            d = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
            s = torch.from_numpy(np.ascontiguousarray(sparse, dtype=np.float32))
            if self.device.type == "cuda":
                d = d.pin_memory().to(self.device, non_blocking=True)
                s = s.pin_memory().to(self.device, non_blocking=True)
            out = scores_from_logits(self._model(d, s))
            return out.to("cpu").numpy()

    async def score_async(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.score, dense, sparse)

    def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=False)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Candidate positions of the ``k`` best scores: score descending, ties by position."""
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    return order[:k]
