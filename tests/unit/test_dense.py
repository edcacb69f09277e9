"""DLRM forward against an independent numpy implementation; strict, pickle-free loading."""

import numpy as np
import pytest
import torch

from services.core.dense import build_dlrm, scores_from_logits
from services.core.errors import CheckpointError
from services.core.types import DenseArch

ARCH = DenseArch(num_dense=3, embedding_dim=4, num_sparse=5, bottom_mlp=(8, 4), top_mlp=(16, 8, 1))


def random_state(arch, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.5 for k, s in arch.param_shapes().items()}


def numpy_dlrm(arch, state, dense, sparse):
    def mlp(x, prefix, n, relu_last):
        for i in range(n):
            x = x @ state[f"{prefix}.{2 * i}.weight"].T + state[f"{prefix}.{2 * i}.bias"]
            if i < n - 1 or relu_last:
                x = np.maximum(x, 0)
        return x

    x = mlp(dense.astype(np.float64), "bottom_mlp", len(arch.bottom_mlp), True)
    vecs = [x] + [sparse[:, f].astype(np.float64) for f in range(arch.num_sparse)]
    dots = [np.sum(vecs[i] * vecs[j], axis=1) for i in range(len(vecs)) for j in range(i + 1, len(vecs))]
    top_in = np.concatenate([x, np.stack(dots, axis=1)], axis=1)
    return mlp(top_in, "top_mlp", len(arch.top_mlp), False)[:, 0]


def test_forward_matches_numpy():
    state = random_state(ARCH)
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((32, ARCH.num_dense)).astype(np.float32)
    sparse = rng.standard_normal((32, ARCH.num_sparse, ARCH.embedding_dim)).astype(np.float32)
    model = build_dlrm(ARCH, state)
    with torch.inference_mode():
        logits = model(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()
    np.testing.assert_allclose(logits, numpy_dlrm(ARCH, state, dense, sparse), rtol=1e-5, atol=1e-5)
    scores = scores_from_logits(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-6, atol=1e-7)


def test_interaction_dim():
    assert ARCH.interaction_dim == 4 + 6 * 5 // 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("top_mlp.4.bias"), r"missing \['top_mlp.4.bias'\]"),
        (lambda s: s.update({"extra.weight": np.zeros(1, np.float32)}), r"unexpected \['extra.weight'\]"),
        (lambda s: s.update({"bottom_mlp.0.weight": np.zeros((8, 2), np.float32)}), r"bottom_mlp.0.weight.*\[8, 3\].*\[8, 2\]"),
    ],
)
def test_mismatched_weights_are_refused(mutate, message):
    state = random_state(ARCH)
    mutate(state)
    with pytest.raises(CheckpointError, match=message):
        build_dlrm(ARCH, state)
