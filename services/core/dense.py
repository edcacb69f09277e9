"""The dense half of the model: DLRM (bottom MLP, pairwise dot interaction, top MLP).

Shared by the ranker (serving) and the reference path (the oracle). Weights load from plain
tensors (safetensors in a checkpoint) with ``load_state_dict(strict=True)``: no code from a
checkpoint is ever executed, and names and shapes must match ``DenseArch.param_shapes()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from services.core.errors import CheckpointError
from services.core.types import DenseArch


def _mlp(width: int, sizes: tuple[int, ...], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, out in enumerate(sizes):
        layers.append(nn.Linear(width, out))
        if i < len(sizes) - 1 or relu_last:
            layers.append(nn.ReLU())
        width = out
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """``forward(dense [B, num_dense], sparse [B, F, D]) -> logits [B]``.

    The interaction takes the bottom MLP output ``x [B, D]`` and the F pooled sparse vectors,
    computes every pairwise dot product of those F+1 vectors (i < j, row-major order), and feeds
    ``concat(x, dots)`` to the top MLP.
    """

    def __init__(self, arch: DenseArch) -> None:
        super().__init__()
        self.arch = arch
        self.bottom_mlp = _mlp(arch.num_dense, arch.bottom_mlp, relu_last=True)
        self.top_mlp = _mlp(arch.interaction_dim, arch.top_mlp, relu_last=False)
        n = arch.num_sparse + 1
        li, lj = torch.triu_indices(n, n, offset=1)
        self.register_buffer("_li", li, persistent=False)
        self.register_buffer("_lj", lj, persistent=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = self.bottom_mlp(dense)
        t = torch.cat([x.unsqueeze(1), sparse], dim=1)
        z = torch.bmm(t, t.transpose(1, 2))
        dots = z[:, self._li, self._lj]
        return self.top_mlp(torch.cat([x, dots], dim=1)).squeeze(1)


def build_dlrm(arch: DenseArch, state: Mapping[str, np.ndarray]) -> DLRM:
    """A DLRM in eval mode holding ``state`` (name -> array); CheckpointError on any mismatch."""
    expected = arch.param_shapes()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"dense weights do not match the architecture: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            raise CheckpointError(f"dense weight {name!r}: expected shape {list(shape)}, got {list(got)}")
    model = DLRM(arch)
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, strict=True)
    return model.eval()


def scores_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The score a Recommend response carries: sigmoid(logit), a click probability."""
    return torch.sigmoid(logits)
