"""One state dict file read lazily, tensor by tensor and rows by rows (docs/import.md).

``open_state_dict(path)`` recognises the file by its bytes: a safetensors file, or a
``torch.save`` zip archive (read with ``torch.load(weights_only=True, mmap=True)``: no code runs).
A distributed checkpoint (DCP: a folder with ``.metadata``) is refused, as is anything else.

Memory: ``read(key, start, stop)`` opens the file, copies those rows out and closes it again,
so the pages of the memory map it read are unmapped after every call; a reader that kept one
mapping open would see its RSS grow to the whole table (measured in docs/import.md). A call
costs one header parse (safetensors) or one unpickling of the small ``data.pkl`` (torch).

Pure module: numpy and safetensors; torch only inside the torch.save reader (and for bfloat16
safetensors, which numpy cannot hold).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from services.core.errors import CheckpointError

# Source dtypes a float32 checkpoint can hold exactly (widening), by their safetensors names.
EXACT_AS_FLOAT32 = ("F32", "F16", "BF16")
_TORCH_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}

DCP_REFUSAL = (
    "is a distributed checkpoint (DCP: a folder with .metadata): sharded exports are out of scope. "
    "Write one unsharded state dict instead (model.state_dict() of an unsharded model, saved with "
    "safetensors or torch.save), or convert this folder with "
    "torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, 'model.pt') on a machine "
    "that can hold it"
)


class StateDictFile:
    """Names, shapes and dtypes of every tensor of one file, and ``read`` for rows of one.

    ``keys`` are in file order (torch.save: the state dict's order; safetensors: the order of
    the data in the file). ``dtype(key)`` is a safetensors dtype name (``F32``, ``F16``,
    ``BF16``, ``F64``, ``I64``, ...). Not thread-safe; no file stays open between calls.
    """

    kind = ""

    def __init__(self, path: pathlib.Path, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> None:
        self.path = path
        self._shapes = dict(shapes)
        self._dtypes = dict(dtypes)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        return self._dtypes[key]

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of tensor ``key`` (the whole tensor by default) as float32,
        a private copy. Only dtypes in ``EXACT_AS_FLOAT32`` (the caller checks)."""
        raise NotImplementedError

    def _bounds(self, key: str, start: int | None, stop: int | None) -> tuple[int, int]:
        rows = self._shapes[key][0] if self._shapes[key] else 1
        start = 0 if start is None else max(0, min(start, rows))
        stop = rows if stop is None else max(start, min(stop, rows))
        return start, stop


class SafetensorsFile(StateDictFile):
    kind = "safetensors"

    @classmethod
    def open(cls, path: pathlib.Path) -> "SafetensorsFile":
        header = _safetensors_header(path)
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: tuple(kv[1].get("data_offsets", (0, 0))),
        )
        try:
            shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in entries}
            dtypes = {k: str(v["dtype"]) for k, v in entries}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed safetensors header: {e!r}") from e
        return cls(path, shapes, dtypes)

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        from safetensors import safe_open

        start, stop = self._bounds(key, start, stop)
        scalar = not self._shapes[key]
        if self._dtypes[key] == "BF16":  # numpy has no bfloat16: read through torch
            import torch

            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(key) if scalar else f.get_slice(key)[start:stop]
                return t.to(torch.float32).numpy()
        with safe_open(str(self.path), framework="numpy") as f:
            arr = f.get_tensor(key) if scalar else f.get_slice(key)[start:stop]
        return np.asarray(arr, dtype=np.float32)  # already a private copy out of the mapping


class TorchSaveFile(StateDictFile):
    kind = "torch.save"

    @classmethod
    def open(cls, path: pathlib.Path) -> "TorchSaveFile":
        tensors = _torch_load_flat(path)
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        dtypes = {k: _TORCH_DTYPE_NAMES.get(str(t.dtype).removeprefix("torch."), str(t.dtype)) for k, t in tensors.items()}
        return cls(path, shapes, dtypes)

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        import torch

        start, stop = self._bounds(key, start, stop)
        tensors = _torch_load_flat(self.path)
        t = tensors[key]
        rows = t[start:stop] if t.dim() else t
        # ``.to`` copies (float32 -> float32 included, copy=True): the mapping closes below.
        out = rows.to(torch.float32, copy=True).numpy()
        del tensors, t, rows
        return out


def _safetensors_header(path: pathlib.Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (u64 little-endian length, then the JSON)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}{k}.", v, out)
        return
    out[prefix[:-1]] = value


def _torch_load_flat(path: pathlib.Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True, mmap=True)`` flattened to ``dotted.key -> tensor``
    (nested dicts such as ``{"model": state_dict}`` are joined with dots; non-tensor leaves
    such as an epoch counter are dropped). Tensor subclasses (a ShardedTensor or DTensor of a
    sharded model) are refused."""
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path}: cannot load it with torch.load(weights_only=True, mmap=True): {str(e).splitlines()[0]} "
            f"(save model.state_dict() of an unsharded model with torch.save's default zip format)"
        ) from e
    flat: dict[str, Any] = {}
    _flatten("", loaded if isinstance(loaded, Mapping) else {"": loaded}, flat)
    tensors: dict[str, Any] = {}
    for k, v in flat.items():
        if not isinstance(v, torch.Tensor):
            continue
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(
                f"{path}: {k!r} is a {type(v).__name__}, not a plain tensor (a sharded model's state dict?): "
                f"sharded exports are out of scope; save the state dict of an unsharded model"
            )
        tensors[k] = v
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (expected a state dict: name -> tensor)")
    return tensors


def open_state_dict(path: str | os.PathLike[str]) -> StateDictFile:
    """The state dict file at ``path``, recognised by its first bytes (not its name).
    CheckpointError for a DCP folder (``DCP_REFUSAL``), another folder, a legacy (non-zip)
    ``torch.save`` file, or anything that is neither safetensors nor a torch.save archive."""
    p = pathlib.Path(path)
    if p.is_dir():
        if (p / ".metadata").exists():
            raise CheckpointError(f"{p} {DCP_REFUSAL}")
        raise CheckpointError(f"{p} is a folder; expected one state dict file (.safetensors or torch.save)")
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read state dict {p}: {e}") from e
    if head.startswith(b"PK\x03\x04"):
        return TorchSaveFile.open(p)
    if len(head) == 9 and head[8:9] == b"{":
        return SafetensorsFile.open(p)
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{p}: a legacy (non-zip) torch.save file, which cannot be memory-mapped; save it again with "
            f"torch.save's default format (torch >= 1.6) or as safetensors"
        )
    raise CheckpointError(f"{p}: neither a safetensors file nor a torch.save archive")
