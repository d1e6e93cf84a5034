"""On-disk layouts: detect which one a folder uses, read it, write any of them.

`native` is circuit-tracer's CLT layout for CLTs and SAE-Lens's layout for PLTs, each plus a
top-level SAE-Lens-style `cfg.json` (the clt_hub manifest) and a model card, so the two tools
people already use load our artifacts with no extra code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from clt_hub.artifacts.atomic import INCOMPLETE_MARKER, atomic_directory, is_interrupted_write
from clt_hub.artifacts.layouts import circuit_tracer, gemmascope, gemmascope2, saelens
from clt_hub.artifacts.layouts.common import (
    MANIFEST,
    Artifact,
    check,
    check_manifest,
    merge_metrics_sidecar,
    read_yaml,
    saelens_cfg,
    write_json,
)
from clt_hub.artifacts.modelcard import write_model_card
from clt_hub.config import TranscoderConfig, dtype_name
from clt_hub.errors import ArtifactError, ConfigError

LAYOUTS = ("native", "circuit-tracer", "sae-lens")


def detect(root: Path) -> str:
    """Name the layout of a folder: circuit-tracer-clt, circuit-tracer-plt, sae-lens, gemmascope or gemmascope2."""
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a folder")
    if is_interrupted_write(root):
        raise ArtifactError(f"{root} is an interrupted write (a scratch folder of a save that did not finish; "
                            f"it has {INCOMPLETE_MARKER} or a .partial- name); delete it and save again")
    if (root / "config.yaml").exists():
        kind = read_yaml(root / "config.yaml").get("model_kind")
        if kind == circuit_tracer.CLT_KIND:
            return "circuit-tracer-clt"
        if kind == circuit_tracer.PLT_KIND:
            return "circuit-tracer-plt"
        raise ArtifactError(f"{root / 'config.yaml'}: unknown model_kind {kind!r}; expected "
                            f"{circuit_tracer.CLT_KIND!r} or {circuit_tracer.PLT_KIND!r}")
    if (root / saelens.WEIGHTS).exists() or saelens.find_layer_folders(root):
        return "sae-lens"
    if any(root.rglob("params.npz")):
        return "gemmascope"
    if gemmascope2.detect(root):
        return "gemmascope2"
    present = sorted(p.name for p in root.iterdir())[:10]
    if (root / "config.json").is_file():  # the commonest mix-up: a model folder where a transcoder belongs
        raise ArtifactError(f"{root}: no transcoder found; it looks like a language model folder (config.json, "
                            f"found {present}): give it as the model and a transcoder folder or repo as the "
                            "transcoder")
    raise ArtifactError(
        f"{root}: no transcoder found. Expected config.yaml (circuit-tracer), <layer>/cfg.json + "
        f"sae_weights.safetensors (SAE-Lens), layer_<l>/…/params.npz (GemmaScope) or layer_<l>_<set>/"
        f"params.safetensors / params_layer_<l>.safetensors (Gemma Scope 2); found {present or 'nothing'}"
    )


def read(root: str | os.PathLike[str], lazy: bool = False) -> Artifact:
    """The checked config and tensors of the transcoder in `root`, whatever its layout. A config.yaml (or a
    SAE-Lens set's layer 0 cfg.json, which every layer's must agree with) is checked against clt_hub's manifest
    beside it (common.check_manifest); metrics stored beside a folder of another tool's (common.METRICS_SIDECAR)
    are added to the config's."""
    root = Path(root)
    layout = detect(root)
    if lazy and layout != "circuit-tracer-clt":
        raise ConfigError(f"lazy decoder loading needs the CLT layout (W_dec_<l>.safetensors); {root} is "
                          f"{layout}. Convert it with `clt-hub convert --to native` or load eagerly")
    reader = {
        "circuit-tracer-clt": circuit_tracer.read_clt,
        "circuit-tracer-plt": circuit_tracer.read_plt,
        "sae-lens": saelens.read,
        "gemmascope": gemmascope.read,
        "gemmascope2": gemmascope2.read,
    }[layout]
    artifact = check(reader(root, lazy=lazy))
    if layout.startswith("circuit-tracer"):
        check_manifest(root, artifact.cfg, root / "config.yaml")
    elif artifact.config_file is not None:  # SAE-Lens: layer 0's cfg.json, which every layer's agrees with
        check_manifest(root, artifact.cfg, artifact.config_file)
    merge_metrics_sidecar(root, artifact.cfg)
    return artifact


def write(tensors: dict[str, torch.Tensor], cfg: TranscoderConfig, dtype: torch.dtype, dst: str | os.PathLike[str],
          layout: str = "native", overwrite: bool = True) -> Path:
    """Write canonical tensors in `layout`, atomically, with the SAE-Lens manifest and a model card."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    cfg = dataclasses.replace(cfg, dtype=dtype_name(dtype))
    if layout == "circuit-tracer":
        circuit_tracer.check_activation(cfg)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        if layout == "sae-lens" or (layout == "native" and cfg.kind == "plt"):
            saelens.write(tensors, cfg, tmp)
        elif cfg.kind == "clt":
            circuit_tracer.write_clt(tensors, cfg, tmp)
        else:
            circuit_tracer.write_plt(tensors, cfg, tmp)
        if layout == "native" and cfg.kind == "clt":
            # per-layer SAE-Lens configs (no weights: the converter reads the root files)
            for l in range(cfg.n_layers):
                (tmp / saelens.layer_folder(l)).mkdir()
                write_json(saelens_cfg(cfg, l), tmp / saelens.layer_folder(l) / "cfg.json")
        manifest = saelens_cfg(cfg, None)
        manifest["clt_hub"] = {"format_version": 1, "layout": layout, "kind": cfg.kind}
        write_json(manifest, tmp / MANIFEST)
        write_model_card(cfg, tmp, layout=layout)
    return Path(dst)


__all__ = ["LAYOUTS", "Artifact", "detect", "read", "write"]
