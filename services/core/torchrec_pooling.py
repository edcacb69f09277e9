"""Pooling with TorchRec's ``EmbeddingBagCollection``: what a TorchRec user runs today, for the
``torchrec`` comparison baseline (``services/frontend/lookup/baselines/torchrec.py``). Numpy in,
numpy out, on CPU. Optional: torchrec is not a dependency of shardrec; it is imported only when a
``TorchrecPooler`` is built, which says how to install it when it is missing.

How the model maps onto TorchRec (per batch, user-side features have U bags each and item-side
features I bags each, and one KeyedJaggedTensor needs one batch size, so there is one
``EmbeddingBagCollection`` per side)::

    per side:  EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"{table}__{pooling}",
                   feature_names=[the side's features on that table with that pooling], ...)])
    per batch: KeyedJaggedTensor(keys=side features, values=rows, lengths=bag lengths)
               -> ebc(kjt).to_dict() -> feature -> float32 [bags, dim]

- weights: each table is one tensor; every bag module that uses the table (both sides, several
  poolings) shares it (``load_state_dict(assign=True)``).
- MAX: TorchRec's ``PoolingType`` has SUM and MEAN only; a MAX group is configured as SUM and
  its ``nn.EmbeddingBag`` switched to ``mode="max"`` (what TorchRec runs underneath anyway).
- per-id weights (SUM only): an unweighted EBC ignores them, so a feature whose bags carry
  weights is pooled again by a one-feature ``is_weighted=True`` EBC sharing the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import ConfigError, InvalidArgumentError
from services.core.types import FeatureSide, PoolingType

INSTALL_HINT = (
    "torchrec is not installed. It is an optional comparison baseline; in a venv with torch==2.13.0: "
    "pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 && "
    "pip install tensordict torchmetrics==1.0.3 pyre-extensions tqdm "
    "(--no-deps matters: torchrec declares the CUDA fbgemm-gpu, gigabytes)"
)

# One feature's bags: rows int64 [n], lengths int32 [bags], per-id weights float32 [n] | None.
Bags = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def _import_torchrec() -> Any:
    try:
        import torchrec
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType as TrPooling
    except Exception as e:  # ImportError, or fbgemm operators that fail to load under this torch
        raise ConfigError(f"{INSTALL_HINT} [import failed: {type(e).__name__}: {e}]") from e
    return torchrec, EmbeddingBagConfig, TrPooling


def _group(table: str, pooling: PoolingType) -> str:
    return f"{table}__{pooling.value}"


class TorchrecPooler:
    """Every sparse feature of ``spec`` in TorchRec ``EmbeddingBagCollection``s over the tables
    ``load_table(name)`` returns (float32 [rows, dim], kept as they are: return a copy, not a
    memory map). ``pool`` may be called from one thread at a time. Raises ConfigError with
    install instructions when torchrec is missing, before any table is loaded."""

    def __init__(self, spec: ModelSpec, load_table: Callable[[str], np.ndarray]) -> None:
        torchrec, EmbeddingBagConfig, TrPooling = _import_torchrec()
        self._kjt = torchrec.KeyedJaggedTensor
        self._spec = spec
        dim = spec.dense_arch.embedding_dim
        meta = torch.device("meta")
        # one copy of each table in memory, shared by every bag module that reads it
        weights = {t: torch.from_numpy(load_table(t)) for t in sorted({f.table for f in spec.sparse_features})}

        def ebc(features, weighted: bool):
            groups: dict[str, list[str]] = {}
            for f in features:
                groups.setdefault(_group(f.table, f.pooling), []).append(f.name)
            table_of = {_group(f.table, f.pooling): f for f in features}
            configs = [
                EmbeddingBagConfig(
                    name=g,
                    embedding_dim=dim,
                    num_embeddings=spec.table(table_of[g].table).rows,
                    feature_names=names,
                    pooling=TrPooling.MEAN if table_of[g].pooling is PoolingType.MEAN else TrPooling.SUM,
                )
                for g, names in groups.items()
            ]
            module = torchrec.EmbeddingBagCollection(tables=configs, is_weighted=weighted, device=meta)
            module.load_state_dict({f"embedding_bags.{g}.weight": weights[table_of[g].table] for g in groups}, assign=True)
            for g, bag in module.embedding_bags.items():
                if table_of[g].pooling is PoolingType.MAX:
                    bag.mode = "max"
            return module.eval().requires_grad_(False)

        self._features = {f.name: f for f in spec.sparse_features}
        self._side_features: dict[FeatureSide, list[str]] = {}
        self._side_ebc = {}
        for side in FeatureSide:
            fs = [f for f in spec.sparse_features if f.side is side]
            if fs:
                module = ebc(fs, weighted=False)
                self._side_ebc[side] = module
                self._side_features[side] = [n for c in module.embedding_bag_configs() for n in c.feature_names]
        self._weighted_ebc = {f.name: ebc([f], weighted=True) for f in spec.sparse_features if f.pooling is PoolingType.SUM}

    def _kjt_of(self, names: list[str], given: Mapping[str, Bags], weighted: bool = False):
        counts = {len(given[n][1]) for n in names if n in given}
        if len(counts) > 1:
            raise InvalidArgumentError(f"torchrec lookup: features of one side must have one bag count, got {sorted(counts)}")
        stride = counts.pop() if counts else 0
        empty_rows, empty_lengths = np.zeros(0, np.int64), np.zeros(stride, np.int32)
        values = np.concatenate([given[n][0] if n in given else empty_rows for n in names])
        lengths = np.concatenate([given[n][1] if n in given else empty_lengths for n in names])
        w = None
        if weighted:
            w = torch.from_numpy(np.concatenate([given[n][2] for n in names]))
        return self._kjt(
            keys=names,
            values=torch.from_numpy(values.astype(np.int64, copy=False)),
            lengths=torch.from_numpy(lengths.astype(np.int32, copy=False)),
            weights=w,
        )

    def pool(self, given: Mapping[str, Bags]) -> dict[str, np.ndarray]:
        """feature -> its bags (features of ``spec``; of one side, one bag count) -> feature ->
        pooled float32 [bags, dim]."""
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for side, names in self._side_features.items():
                if not any(n in given for n in names):
                    continue
                pooled = self._side_ebc[side](self._kjt_of(names, given)).to_dict()
                for n in names:
                    if n in given:
                        out[n] = pooled[n].numpy()
            for name, (_rows, _lengths, weights) in given.items():
                if weights is not None:
                    pooling = self._features[name].pooling
                    if pooling is not PoolingType.SUM:
                        raise InvalidArgumentError(f"per-id weights need sum pooling, got {pooling.value}")
                    out[name] = self._weighted_ebc[name](self._kjt_of([name], given, weighted=True)).to_dict()[name].numpy()
        return out
