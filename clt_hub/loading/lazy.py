"""Row-wise reads from safetensors files through a memory map.

A Gemma-2-2B CLT's decoders are far larger than RAM; attribution only ever needs the rows of the
features that fired, so we map the file and gather rows, letting the OS page in just those.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clt_hub.errors import ArtifactError

# safetensors dtype tag -> (numpy storage dtype, torch dtype)
_DTYPES: dict[str, tuple[type, torch.dtype]] = {
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Parse and sanity-check a safetensors header without reading any tensor data."""
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
                raise ArtifactError(f"{path}: header length {n} does not fit in a {size}-byte file; the file "
                                    "is truncated or not safetensors: download it again (force_download=True)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file is missing; the artifact is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupted: "
                            "download it again (force_download=True)") from None
    out: dict[str, TensorInfo] = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > size:
            raise ArtifactError(f"{path}: tensor '{name}' ends at byte {base + end} but the file has {size} "
                                "bytes; the file is truncated: download it again (force_download=True)")
        out[name] = TensorInfo(info["dtype"], tuple(info["shape"]), base + start, base + end)
    return out


class RowReader:
    """Reads selected rows (first dimension) of one tensor in a safetensors file."""

    def __init__(self, path: str | os.PathLike[str], key: str, info: TensorInfo | None = None):
        self.path = Path(path)
        self.key = key
        info = info or read_header(path).get(key)
        if info is None:
            raise ArtifactError(f"{self.path}: tensor '{key}' is missing")
        if info.dtype not in _DTYPES:
            raise ArtifactError(f"{self.path}: tensor '{key}' has dtype {info.dtype}; expected a float type")
        np_dtype, self.torch_dtype = _DTYPES[info.dtype]
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
        return t.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else t

    def all(self) -> torch.Tensor:
        return self.rows(np.arange(self.shape[0]))
