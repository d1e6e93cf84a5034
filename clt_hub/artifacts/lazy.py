"""Row-wise reads from safetensors files through a memory map.

A Gemma-2-2B CLT's decoders are far larger than RAM; attribution only ever needs the rows of the
features that fired, so we map the file and gather rows, letting the OS page in just those.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from clt_hub.config import ParseError, parse_json_text
from clt_hub.errors import ArtifactError

# safetensors dtype tag -> (numpy storage dtype, torch dtype, bytes per value): the float types weights use
_DTYPES: dict[str, tuple[type, torch.dtype, int]] = {
    "F64": (np.float64, torch.float64, 8),
    "F32": (np.float32, torch.float32, 4),
    "F16": (np.float16, torch.float16, 2),
    "BF16": (np.uint16, torch.bfloat16, 2),
}
_OTHER_SIZES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _broken(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: {what}; the file is corrupted or not safetensors: download it again "
                         "(force_download=True)")


def _entry(path: Path, name: str, info: Any, base: int, size: int) -> TensorInfo:
    """One header entry, checked: known dtype, a shape of non-negative ints, offsets inside the file that
    hold exactly shape x dtype bytes (so nothing later allocates from a lying header)."""
    if not isinstance(info, dict):
        raise _broken(path, f"header entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    width = _DTYPES[dtype][2] if dtype in _DTYPES else _OTHER_SIZES.get(dtype) if isinstance(dtype, str) else None
    if width is None:
        raise _broken(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise _broken(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)):
        raise _broken(path, f"tensor {name!r} has data_offsets {offsets!r}, not two integers")
    start, end = offsets
    if not 0 <= start <= end or base + end > size:
        raise ArtifactError(f"{path}: tensor {name!r} spans bytes {base + start}..{base + end} but the file has "
                            f"{size} bytes; the file is truncated: download it again (force_download=True)")
    if end - start != math.prod(shape) * width:
        raise _broken(path, f"tensor {name!r} holds {end - start} bytes but its shape {tuple(shape)} of {dtype} "
                            f"needs {math.prod(shape) * width}")
    return TensorInfo(str(dtype), tuple(shape), base + start, base + end)


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading any tensor data (eager and lazy reads both
    start here, so a malformed file fails the same clear way whichever path reads it)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ArtifactError(f"{path}: file is {size} bytes, too short for a safetensors header; "
                                    "it is truncated: download it again (force_download=True)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                # the length is the file's first 8 bytes: never echoed, an error must not leak a file's content
                raise ArtifactError(f"{path}: its header length does not fit in a {size}-byte file; the file "
                                    "is truncated or not safetensors: download it again (force_download=True)")
            raw_header = f.read(n)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file is missing; the artifact is incomplete") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a folder where a safetensors file belongs; the artifact is malformed") from None
    try:
        header = parse_json_text(raw_header)  # clt_hub's one JSON reader: nesting capped, one clear error
    except ParseError as exc:
        raise _broken(path, f"safetensors header is {exc}") from None
    if not isinstance(header, dict):
        raise _broken(path, f"safetensors header is a JSON {type(header).__name__}, not an object")
    base = 8 + n
    return {name: _entry(path, name, info, base, size) for name, info in header.items() if name != "__metadata__"}


class RowReader:
    """Reads selected rows (first dimension) of one tensor in a safetensors file."""

    def __init__(self, path: str | os.PathLike[str], key: str, info: TensorInfo | None = None):
        self.path = Path(path)
        self.key = key
        info = info or read_header(path).get(key)
        if info is None:
            raise ArtifactError(f"{self.path}: tensor '{key}' is missing")
        if info.dtype not in _DTYPES:
            raise ArtifactError(f"{self.path}: tensor '{key}' has dtype {info.dtype}; weights must be a float type "
                                f"({', '.join(_DTYPES)})")
        np_dtype, self.torch_dtype, _ = _DTYPES[info.dtype]
        self.shape = info.shape
        count = int(np.prod(info.shape)) if info.shape else 1
        flat = np.memmap(self.path, dtype=np_dtype, mode="r", offset=info.start, shape=(count,))
        self._map: np.ndarray = flat.reshape(info.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, index: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        idx = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        data = np.ascontiguousarray(self._map[idx])
        t = torch.from_numpy(data)
        t = t.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else t
        if not bool(torch.isfinite(t).all()):  # eager loading refuses these too; lazy checks the rows it reads
            rows = np.atleast_1d(idx)
            bad = sorted(set(rows[~torch.isfinite(t.reshape(len(rows), -1)).all(1).numpy()].tolist()))
            raise ArtifactError(f"{self.path}: tensor '{self.key}' has NaN or infinite values in row(s) {bad[:8]}; "
                                "the artifact is corrupt: download it again (force_download=True)")
        return t

    def all(self) -> torch.Tensor:
        return self.rows(np.arange(self.shape[0]))

    def prefetch(self, index: torch.Tensor) -> torch.Tensor:
        """Rows are read from the map when asked for; nothing to do ahead, nothing newly held (see `RowSource`)."""
        return torch.zeros(0, dtype=torch.long)

    def release(self, index: torch.Tensor) -> None:
        """Nothing is held (see `RowSource`)."""


class RowSource(Protocol):
    """What a transcoder's lazy decoders are: this file's `RowReader`, or rows split over ranks
    (`clt_hub.transcoders.sharded`). `prefetch` announces the rows about to be read: every rank calls it with the
    same rows, so a sharded source exchanges them there and holds them until `release`; it returns the rows it
    newly holds, so that a caller releases only what it fetched."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...
    def rows(self, index: torch.Tensor) -> torch.Tensor: ...
    def all(self) -> torch.Tensor: ...
    def prefetch(self, index: torch.Tensor) -> torch.Tensor: ...
    def release(self, index: torch.Tensor) -> None: ...


@contextlib.contextmanager
def exchanged(sources: Mapping[int, RowSource], features: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Rows `features[l]` of `sources[l]` prefetched for the block and released after, except those held before
    it (layers without a source are skipped)."""
    held = {l: sources[l].prefetch(ids) for l, ids in features.items() if l in sources}
    try:
        yield
    finally:
        for l, ids in held.items():
            sources[l].release(ids)
