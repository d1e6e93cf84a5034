"""GemmaScope transcoders: `layer_<l>/.../params.npz` (read-only; numpy, never pickle)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from clt_hub.artifacts.layouts.common import Artifact
from clt_hub.config import TranscoderConfig
from clt_hub.errors import ArtifactError

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def find(root: Path) -> dict[int, Path]:
    by_layer: dict[int, list[Path]] = {}
    for p in sorted(root.rglob("params.npz")):
        m = re.search(r"layer_(\d+)", str(p.relative_to(root)))
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(p)
    ambiguous = {l: ps for l, ps in by_layer.items() if len(ps) > 1}
    if ambiguous:
        l, ps = next(iter(ambiguous.items()))
        raise ArtifactError(f"{root}: layer {l} has {len(ps)} params.npz files ({', '.join(str(p.relative_to(root)) for p in ps)}); "
                            "download one variant per layer (e.g. one width and one average_l0) and load that folder")
    return {l: ps[0] for l, ps in by_layer.items()}


def read(root: Path, lazy: bool = False) -> Artifact:
    files = find(root)
    if not files or sorted(files) != list(range(len(files))):
        raise ArtifactError(f"{root}: params.npz for layers {sorted(files)}; need one for every layer 0..n-1")
    out: Artifact | None = None
    for l, path in sorted(files.items()):
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"{path}: cannot read ({exc}); the file is corrupted: download it again") from None
        missing = [k for k in KEYS if k not in arrays]
        if missing:
            raise ArtifactError(f"{path}: missing array(s) {', '.join(missing)}; not a GemmaScope transcoder")
        if out is None:
            d, F = arrays["W_enc"].shape
            out = Artifact(TranscoderConfig(n_layers=len(files), d_model=int(d), d_sae=int(F), kind="plt",
                                          activation="jumprelu", feature_input_hook="ln2.hook_normalized",
                                          feature_output_hook="hook_mlp_out"))
        t = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in KEYS}
        out.tensors[f"W_enc.{l}"] = t["W_enc"].T
        out.tensors[f"W_dec.{l}"] = t["W_dec"][:, None, :]
        out.tensors[f"b_enc.{l}"] = t["b_enc"]
        out.tensors[f"b_dec.{l}"] = t["b_dec"]
        out.tensors[f"threshold.{l}"] = t["threshold"]
        for k in KEYS:
            out.origins[f"{'threshold' if k == 'threshold' else k}.{l}"] = f"{path}:{k}"
        extra = sorted(set(arrays) - set(KEYS))
        if extra:
            raise ArtifactError(f"{path}: unexpected array(s) {', '.join(extra)}")
    assert out is not None
    return out
