"""circuit-tracer's layouts: CLT (`W_enc_{l}`/`W_dec_{l}` files) and PLT sets (`layer_{l}` files).

The CLT layout is clt_hub's native CLT layout, so circuit-tracer's `load_clt` reads our files
unchanged. circuit-tracer never saves CLT skip weights; we keep them in `W_skip_{l}.safetensors`
([d_out, d_in], applied as x @ W_skip.T), which its loader ignores.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from clt_hub.artifacts.layouts.common import (
    Artifact,
    config_from,
    inside,
    meta_field,
    read_safetensors,
    read_yaml,
    reject_leftovers,
    take,
    write_safetensors,
    write_yaml,
)
from clt_hub.artifacts.lazy import RowReader, read_header
from clt_hub.config import TranscoderConfig
from clt_hub.errors import ArtifactError, ConfigError

CLT_KIND = "cross_layer_transcoder"
PLT_KIND = "transcoder_set"


def _yaml_config(cfg: TranscoderConfig, model_kind: str) -> dict:
    return {
        "model_kind": model_kind,
        "model_name": cfg.model_name,
        "scan": cfg.model_name or "clt-hub",
        "repo_id": "",
        "feature_input_hook": cfg.feature_input_hook,
        "feature_output_hook": cfg.feature_output_hook,
        "clt_hub": cfg.to_dict(),
    }


def check_activation(cfg: TranscoderConfig) -> None:
    """circuit-tracer reads no activation field, so a TopK model in its layout would load as ReLU. Our
    native layout keeps the same files but records the activation in config.yaml, so it may hold TopK."""
    if cfg.activation == "topk":
        raise ConfigError("circuit-tracer supports JumpReLU and ReLU transcoders only, not TopK; "
                          "save with layout='native' or convert the TopK model to JumpReLU first")


def write_clt(tensors: dict[str, torch.Tensor], cfg: TranscoderConfig, out: Path) -> None:
    for l in range(cfg.n_layers):
        enc = {f"W_enc_{l}": tensors[f"W_enc.{l}"], f"b_enc_{l}": tensors[f"b_enc.{l}"],
               f"b_dec_{l}": tensors[f"b_dec.{l}"]}
        if cfg.activation == "jumprelu":
            enc[f"threshold_{l}"] = tensors[f"threshold.{l}"]
        write_safetensors(enc, out / f"W_enc_{l}.safetensors")
        write_safetensors({f"W_dec_{l}": tensors[f"W_dec.{l}"]}, out / f"W_dec_{l}.safetensors")
        if cfg.skip:
            write_safetensors({f"W_skip_{l}": tensors[f"W_skip.{l}"]}, out / f"W_skip_{l}.safetensors")
    write_yaml(_yaml_config(cfg, CLT_KIND), out / "config.yaml")  # last: marks the folder complete


def _layer_files(root: Path, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := rx.fullmatch(p.name)))


def _infer_clt_config(root: Path, meta: dict) -> TranscoderConfig:
    layers = _layer_files(root, r"W_enc_(\d+)\.safetensors")
    if not layers:
        raise ArtifactError(f"{root}: no W_enc_<layer>.safetensors files; not a circuit-tracer CLT")
    header = read_header(root / "W_enc_0.safetensors")
    if "W_enc_0" not in header:
        raise ArtifactError(f"{root / 'W_enc_0.safetensors'}: tensor 'W_enc_0' is missing")
    F, d = header["W_enc_0"].shape
    return TranscoderConfig(
        n_layers=len(layers), d_model=d, d_sae=F, kind="clt",
        activation="jumprelu" if "threshold_0" in header else "relu",
        skip=(root / "W_skip_0.safetensors").exists(),
        model_name=meta_field(meta, "model_name", str, "", root / "config.yaml"),
        feature_input_hook=meta_field(meta, "feature_input_hook", str, "hook_resid_mid", root / "config.yaml"),
        feature_output_hook=meta_field(meta, "feature_output_hook", str, "hook_mlp_out", root / "config.yaml"),
    )


def read_clt(root: Path, lazy: bool = False) -> Artifact:
    meta = read_yaml(root / "config.yaml")
    if meta.get("model_kind") != CLT_KIND:
        raise ArtifactError(f"{root / 'config.yaml'}: model_kind is {meta.get('model_kind')!r}, expected {CLT_KIND!r}")
    if "clt_hub" in meta:
        cfg = config_from(meta["clt_hub"], f"{root / 'config.yaml'} (clt_hub)")
    else:
        cfg = _infer_clt_config(root, meta)
    found = _layer_files(root, r"W_enc_(\d+)\.safetensors")
    if len(found) != cfg.n_layers or found != list(range(len(found))):
        raise ArtifactError(
            f"{root}: found W_enc files for layers {found}, but config n_layers={cfg.n_layers} needs exactly "
            f"0..{cfg.n_layers - 1}; the folder is incomplete or mixes two transcoders"
        )
    out = Artifact(cfg)
    for l in range(cfg.n_layers):
        path = root / f"W_enc_{l}.safetensors"
        t = read_safetensors(path)
        for name in ("W_enc", "b_enc", "b_dec") + (("threshold",) if cfg.activation == "jumprelu" else ()):
            out.tensors[f"{name}.{l}"] = take(t, f"{name}_{l}", path)
            out.origins[f"{name}.{l}"] = f"{path}:{name}_{l}"
        reject_leftovers(t, path)
        dpath = root / f"W_dec_{l}.safetensors"
        out.origins[f"W_dec.{l}"] = f"{dpath}:W_dec_{l}"
        if lazy:
            out.lazy[l] = RowReader(dpath, f"W_dec_{l}")
        else:
            t = read_safetensors(dpath)
            out.tensors[f"W_dec.{l}"] = take(t, f"W_dec_{l}", dpath)
            reject_leftovers(t, dpath)
        if cfg.skip:
            spath = root / f"W_skip_{l}.safetensors"
            t = read_safetensors(spath)
            out.tensors[f"W_skip.{l}"] = take(t, f"W_skip_{l}", spath)
            out.origins[f"W_skip.{l}"] = f"{spath}:W_skip_{l}"
            reject_leftovers(t, spath)
    return out


def write_plt(tensors: dict[str, torch.Tensor], cfg: TranscoderConfig, out: Path) -> None:
    check_activation(cfg)
    if cfg.kind != "plt":
        raise ConfigError("circuit-tracer's transcoder_set layout holds per-layer transcoders only; a CLT's "
                          "circuit-tracer layout is the native one (layout='native')")
    for l in range(cfg.n_layers):
        layer = {"W_enc": tensors[f"W_enc.{l}"], "W_dec": tensors[f"W_dec.{l}"][:, 0, :],
                 "b_enc": tensors[f"b_enc.{l}"], "b_dec": tensors[f"b_dec.{l}"]}
        if cfg.activation == "jumprelu":
            layer["activation_function.threshold"] = tensors[f"threshold.{l}"]
        if cfg.skip:
            layer["W_skip"] = tensors[f"W_skip.{l}"]
        write_safetensors(layer, out / f"layer_{l}.safetensors")
    write_yaml(_yaml_config(cfg, PLT_KIND), out / "config.yaml")


def read_plt(root: Path, lazy: bool = False) -> Artifact:
    meta = read_yaml(root / "config.yaml")
    if meta.get("model_kind") != PLT_KIND:
        raise ArtifactError(f"{root / 'config.yaml'}: model_kind is {meta.get('model_kind')!r}, expected {PLT_KIND!r}")
    if "transcoders" in meta:
        paths = []
        for entry in meta["transcoders"]:
            if str(entry).startswith("hf://"):
                raise ArtifactError(f"{root / 'config.yaml'}: entry {entry} points into another repo; download "
                                    "that repo and list local paths, or load its layers directly")
            paths.append(inside(root, entry, root / "config.yaml"))
    else:
        layers = _layer_files(root, r"layer_(\d+)\.safetensors")
        if layers != list(range(len(layers))) or not layers:
            raise ArtifactError(f"{root}: layer files for layers {layers}; a transcoder set needs layer_0 .. "
                                "layer_<n-1>.safetensors with none missing")
        paths = [root / f"layer_{l}.safetensors" for l in layers]
    if "clt_hub" in meta:
        cfg = config_from(meta["clt_hub"], f"{root / 'config.yaml'} (clt_hub)")
        if cfg.n_layers != len(paths):
            raise ArtifactError(f"{root}: {len(paths)} layer files but config n_layers={cfg.n_layers}")
    else:
        if any(p.suffix == ".npz" for p in paths):
            raise ArtifactError(f"{root}: .npz transcoders listed; load the GemmaScope folder itself instead")
        h = read_header(paths[0])
        if "W_enc" not in h:
            raise ArtifactError(f"{paths[0]}: tensor 'W_enc' is missing")
        F, d = h["W_enc"].shape
        cfg = TranscoderConfig(
            n_layers=len(paths), d_model=d, d_sae=F, kind="plt",
            activation="jumprelu" if "activation_function.threshold" in h else "relu",
            skip="W_skip" in h, model_name=meta_field(meta, "model_name", str, "", root / "config.yaml"),
            feature_input_hook=meta_field(meta, "feature_input_hook", str, "hook_resid_mid", root / "config.yaml"),
            feature_output_hook=meta_field(meta, "feature_output_hook", str, "hook_mlp_out", root / "config.yaml"),
        )
    out = Artifact(cfg)
    for l, path in enumerate(paths):
        t = read_safetensors(path)
        names = {"W_enc": "W_enc", "b_enc": "b_enc", "b_dec": "b_dec", "W_dec": "W_dec"}
        if cfg.activation == "jumprelu":
            names["threshold"] = "activation_function.threshold"
        if cfg.skip:
            names["W_skip"] = "W_skip"
        for canon, key in names.items():
            value = take(t, key, path)
            if canon == "W_dec" and value.dim() == 2:
                value = value[:, None, :]
            out.tensors[f"{canon}.{l}"] = value
            out.origins[f"{canon}.{l}"] = f"{path}:{key}"
        reject_leftovers(t, path)
    return out
