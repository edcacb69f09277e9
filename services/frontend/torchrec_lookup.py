"""The ``torchrec`` baseline: TorchRec's ``EmbeddingBagCollection`` holding every table of one
version in this process, on CPU — what a TorchRec user runs today. Optional: torchrec is not a
dependency of shardrec; this module imports it only when ``TorchrecLookupClient`` is built, and
says how to install it when it is missing.

How the model maps onto TorchRec (per batch, user-side features have U bags each and item-side
features I bags each, and one KeyedJaggedTensor needs one batch size, so there is one
``EmbeddingBagCollection`` per side)::

    per side:  EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"{table}__{pooling}",
                   feature_names=[the side's features on that table with that pooling], ...)])
    per batch: KeyedJaggedTensor(keys=side features, values=rows, lengths=bag lengths)
               -> ebc(kjt).to_dict() -> feature -> float32 [bags, dim]

- weights: each table is copied once from the checkpoint into one tensor; every bag module that
  uses the table (both sides, several poolings) shares it (``load_state_dict(assign=True)``).
- MAX: TorchRec's ``PoolingType`` has SUM and MEAN only; a MAX group is configured as SUM and
  its ``nn.EmbeddingBag`` switched to ``mode="max"`` (what TorchRec runs underneath anyway).
- per-id weights (SUM only): an unweighted EBC ignores them, so a feature whose bags carry
  weights is pooled again by a one-feature ``is_weighted=True`` EBC sharing the same tensor.

Threads: ``lookup`` runs on the event loop; the forward passes run in a one-thread executor
under ``torch.inference_mode()``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import ConfigError, InvalidArgumentError
from services.core.types import FeatureSide, PoolingType, Version
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats

INSTALL_HINT = (
    "torchrec is not installed. It is an optional comparison baseline; in a venv with torch==2.13.0: "
    "pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 && "
    "pip install tensordict torchmetrics==1.0.3 pyre-extensions tqdm "
    "(--no-deps matters: torchrec declares the CUDA fbgemm-gpu, gigabytes)"
)


def _import_torchrec() -> Any:
    try:
        import torchrec
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType as TrPooling
    except Exception as e:  # ImportError, or fbgemm operators that fail to load under this torch
        raise ConfigError(f"{INSTALL_HINT} [import failed: {type(e).__name__}: {e}]") from e
    return torchrec, EmbeddingBagConfig, TrPooling


def _group(table: str, pooling: PoolingType) -> str:
    return f"{table}__{pooling.value}"


class TorchrecLookupClient:
    """Every table of one version in TorchRec ``EmbeddingBagCollection``s, on CPU (see the
    module docstring). Raises ConfigError with install instructions when torchrec is missing."""

    def __init__(self, reader: CheckpointReader, version: Version) -> None:
        import torch

        torchrec, EmbeddingBagConfig, TrPooling = _import_torchrec()
        self._torch = torch
        self._kjt = torchrec.KeyedJaggedTensor
        self.version = version
        self._spec = spec = reader.manifest(version).model
        self._dim = spec.dense_arch.embedding_dim
        meta = torch.device("meta")
        # one copy of each table in memory, shared by every bag module that reads it
        used = sorted({f.table for f in spec.sparse_features})
        weights = {t: torch.from_numpy(np.array(reader.open_table(version, t, verify=False))) for t in used}

        def ebc(features, weighted: bool):
            groups: dict[str, list[str]] = {}
            for f in features:
                groups.setdefault(_group(f.table, f.pooling), []).append(f.name)
            table_of = {_group(f.table, f.pooling): f for f in features}
            configs = [
                EmbeddingBagConfig(
                    name=g,
                    embedding_dim=self._dim,
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchrec-lookup")
        self.stats = LookupStats()

    def _check(self, features: list[FeatureLookup]) -> None:
        for f in features:
            spec = self._features.get(f.feature)
            if spec is None or spec.table != f.table or spec.pooling is not f.pooling or spec.side is not f.side:
                raise InvalidArgumentError(
                    f"torchrec lookup: feature {f.feature!r} on table {f.table!r} ({f.pooling.value}, {f.side.value}) "
                    f"is not a sparse feature of model {self._spec.name!r} as configured"
                )
            rows = f.bags.rows
            n = self._spec.table(f.table).rows
            if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
                bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
                raise InvalidArgumentError(f"feature {f.feature!r}: row {bad} is outside [0, {n}) of table {f.table!r}")

    def _kjt_of(self, names: list[str], given: dict[str, FeatureLookup], weighted: bool = False):
        torch = self._torch
        bags = {len(given[n].bags.lengths) for n in names if n in given}
        if len(bags) > 1:
            raise InvalidArgumentError(f"torchrec lookup: features of one side must have one bag count, got {sorted(bags)}")
        stride = bags.pop() if bags else 0
        empty_rows, empty_lengths = np.zeros(0, np.int64), np.zeros(stride, np.int32)
        values = np.concatenate([given[n].bags.rows if n in given else empty_rows for n in names])
        lengths = np.concatenate([given[n].bags.lengths if n in given else empty_lengths for n in names])
        w = None
        if weighted:
            w = torch.from_numpy(np.concatenate([given[n].bags.weights for n in names]))
        return self._kjt(
            keys=names,
            values=torch.from_numpy(values.astype(np.int64, copy=False)),
            lengths=torch.from_numpy(lengths.astype(np.int32, copy=False)),
            weights=w,
        )

    def _pool_all(self, features: list[FeatureLookup]) -> dict[str, np.ndarray]:
        given = {f.feature: f for f in features}
        out: dict[str, np.ndarray] = {}
        with self._torch.inference_mode():
            for side, names in self._side_features.items():
                if not any(n in given for n in names):
                    continue
                pooled = self._side_ebc[side](self._kjt_of(names, given)).to_dict()
                for n in names:
                    if n in given:
                        out[n] = pooled[n].numpy()
            for f in features:
                if f.bags.weights is not None:
                    if f.pooling is not PoolingType.SUM:
                        raise InvalidArgumentError(f"per-id weights need sum pooling, got {f.pooling.value}")
                    out[f.feature] = self._weighted_ebc[f.feature](self._kjt_of([f.feature], given, weighted=True)).to_dict()[f.feature].numpy()
        return out

    async def lookup(self, features, *, version, timeout_s, request_id) -> LookupResult:
        self._check(features)
        self.stats.batches += 1
        self.stats.ids_sent += sum(len(f.bags.rows) for f in features)
        pooled = await asyncio.get_running_loop().run_in_executor(self._executor, self._pool_all, features)
        return LookupResult(pooled, self.version, 0)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
