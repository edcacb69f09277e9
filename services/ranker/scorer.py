"""The ranker's interface: ``Scorer``, what the frontend scores a micro-batch with, and
``build_scorer``, the one place an implementation is chosen. Importing this module imports no
torch: the frontend depends on this interface, and reaches torch only through the ranker.

Shapes, for a batch of B samples, F sparse features of dim D::

    dense float32 [B, num_dense], sparse float32 [B, F, D] -> scores float32 [B] (in (0, 1))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from services.core.types import DenseArch


class Scorer(Protocol):
    """One version of the dense model on one device. ``score`` runs on the event loop and never
    blocks it (the forward pass runs elsewhere); ``with_weights`` is blocking (call it in an
    executor) and returns a scorer of another version sharing this one's device and worker."""

    device: str  # where the forward pass runs: "cpu", "cuda", "cuda:1", ...

    async def score(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray: ...

    def with_weights(self, state: Mapping[str, np.ndarray]) -> "Scorer": ...

    def close(self) -> None: ...


def build_scorer(arch: DenseArch, state: Mapping[str, np.ndarray], device: str = "auto") -> Scorer:
    """The scorer of ``arch`` with weights ``state`` on ``device`` (``auto``: CUDA when present,
    else CPU): today the in-process torch one (``torch_scorer``), imported here on first use.
    Blocking (builds the model): call it in an executor from an event loop."""
    from services.ranker.torch_scorer import TorchScorer

    return TorchScorer(arch, state, device)


def set_threads(threads: int) -> None:
    """Intra-op threads of torch in this process: the forward pass and any torch pooling."""
    from services.ranker.torch_scorer import set_threads as set_torch_threads

    set_torch_threads(threads)
