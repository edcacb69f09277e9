"""``TorchScorer``: the dense half at serving time in this process, DLRM on CUDA when present
(else CPU), behind the ``Scorer`` interface (``services.ranker.scorer``).

The forward pass runs under ``torch.inference_mode`` in a dedicated single-thread executor, so
the event loop never blocks on it; on CUDA the inputs are copied from pinned memory,
non-blocking.
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


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


class TorchScorer:
    """One version of the dense model on one device (a ``Scorer``)."""

    def __init__(
        self, arch: DenseArch, state: Mapping[str, np.ndarray], device: str = "auto", *, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self._device = pick_device(device)
        self.arch = arch
        self._model = build_dlrm(arch, state).to(self._device)
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker")

    @property
    def device(self) -> str:
        return str(self._device)

    def with_weights(self, state: Mapping[str, np.ndarray]) -> "TorchScorer":
        """The same architecture and device with other weights (a new version), sharing this
        scorer's executor: batches still running on this one finish. Closing the scorer that
        created the executor shuts it down; closing the new one does nothing."""
        return TorchScorer(self.arch, state, self.device, executor=self._executor)

    def forward(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """``dense`` float32 [B, num_dense], ``sparse`` float32 [B, F, D] -> scores float32 [B].
        Blocking; one caller at a time per device stream."""
        with torch.inference_mode():
            d = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
            s = torch.from_numpy(np.ascontiguousarray(sparse, dtype=np.float32))
            if self._device.type == "cuda":
                d = d.pin_memory().to(self._device, non_blocking=True)
                s = s.pin_memory().to(self._device, non_blocking=True)
            out = scores_from_logits(self._model(d, s))
            return out.to("cpu").numpy()

    async def score(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.forward, dense, sparse)

    def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=False)
