"""SAE-Lens v6 layout: one `<sae_id>/cfg.json` + `sae_weights.safetensors` per layer.

This is clt_hub's native PLT layout, so `sae_lens.SAE.from_pretrained("org/repo", "layer_3")` loads
our per-layer transcoders with no extra code. A CLT written in this layout keeps the same-layer
decoder in `sae_weights.safetensors` (what SAE-Lens loads) and the decoders to later layers in
`cross_layer_decoders.safetensors` beside it, so nothing is stored twice and nothing is lost.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from clt_hub.artifacts.layouts.common import (
    NOT_COMPARED,
    STRUCTURE,
    Artifact,
    config_from,
    meta_field,
    read_json,
    read_safetensors,
    reject_leftovers,
    saelens_cfg,
    take,
    write_json,
    write_safetensors,
)
from clt_hub.config import TranscoderConfig
from clt_hub.errors import ArtifactError

WEIGHTS = "sae_weights.safetensors"
CROSS = "cross_layer_decoders.safetensors"
ARCHITECTURES = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
    "clt_hub_topk_transcoder": ("topk", False),
}


def layer_folder(layer: int) -> str:
    return f"layer_{layer}"


def write(tensors: dict[str, torch.Tensor], cfg: TranscoderConfig, out: Path) -> None:
    for l in range(cfg.n_layers):
        folder = out / layer_folder(l)
        folder.mkdir()
        w_dec = tensors[f"W_dec.{l}"]
        weights = {"W_enc": tensors[f"W_enc.{l}"].T, "b_enc": tensors[f"b_enc.{l}"],
                   "W_dec": w_dec[:, 0, :], "b_dec": tensors[f"b_dec.{l}"]}
        if cfg.activation == "jumprelu":
            weights["threshold"] = tensors[f"threshold.{l}"]
        if cfg.skip:
            weights["W_skip"] = tensors[f"W_skip.{l}"]
        write_safetensors(weights, folder / WEIGHTS)
        if w_dec.shape[1] > 1:
            write_safetensors({"W_dec": w_dec[:, 1:, :]}, folder / CROSS)
        write_json(saelens_cfg(cfg, l), folder / "cfg.json")


def _layer_of(folder: Path, meta: dict) -> int:
    hub = meta.get("clt_hub") or {}
    if isinstance(hub.get("layer"), int):
        return int(hub["layer"])
    for source in (str(meta.get("hook_name") or ""), folder.name):
        m = re.search(r"(?:blocks|layers?|h)[._](\d+)", source) or re.search(r"(\d+)$", source)
        if m:
            return int(m.group(1))
    raise ArtifactError(f"{folder / 'cfg.json'}: cannot tell which layer this transcoder belongs to (no "
                        "metadata.hook_name like 'blocks.3.…' and no layer number in the folder name)")


def find_layer_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "cfg.json").exists() and (p / WEIGHTS).exists())


def read(root: Path, lazy: bool = False) -> Artifact:
    """A full set of per-layer SAE-Lens transcoders: the layer folders, the set's config (clt_hub's own, or
    inferred from layer 0's cfg.json), then each layer's tensors in clt_hub's names."""
    cfgs, by_layer = _layer_cfgs(root)
    first = cfgs[by_layer[0]]
    cfg = _set_config(root, first, by_layer)
    out = Artifact(cfg, config_file=by_layer[0] / "cfg.json")
    for l, folder in sorted(by_layer.items()):
        _check_layer_cfg(folder, cfgs[folder])
        path = folder / WEIGHTS
        t = read_safetensors(path)
        if l:
            _same_as_first(root, folder, cfgs[folder], l, by_layer[0], first, t.get("W_enc"))
        _read_layer(out, l, folder, cfgs[folder], t)
        reject_leftovers(t, path)
    return out


def _layer_cfgs(root: Path) -> tuple[dict[Path, dict[str, Any]], dict[int, Path]]:
    """Each layer folder's cfg.json, and the folder of each layer 0..n-1 (every layer once)."""
    if (root / WEIGHTS).exists():
        raise ArtifactError(
            f"{root} holds a single SAE-Lens transcoder; clt_hub loads a full set (one folder per layer, "
            "e.g. layer_0 .. layer_<n-1>). Point at the folder that holds all layers"
        )
    folders = find_layer_folders(root)
    if not folders:
        raise ArtifactError(f"{root}: no '<layer>/cfg.json' + '<layer>/{WEIGHTS}' folders; not a SAE-Lens set")
    cfgs = {f: read_json(f / "cfg.json") for f in folders}
    by_layer: dict[int, Path] = {}
    for f, c in cfgs.items():
        layer = _layer_of(f, c.get("metadata") or {})
        if layer in by_layer:
            raise ArtifactError(f"{root}: folders {by_layer[layer].name} and {f.name} are both layer {layer}; keep one")
        by_layer[layer] = f
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ArtifactError(f"{root}: transcoders for layers {sorted(by_layer)}; a set needs every layer 0..n-1")
    return cfgs, by_layer


def _set_config(root: Path, first: dict[str, Any], by_layer: dict[int, Path]) -> TranscoderConfig:
    """The set's config: clt_hub's own from layer 0's metadata, else inferred from its SAE-Lens fields."""
    hub = (first.get("metadata") or {}).get("clt_hub") or {}
    if "config" in hub:
        cfg = config_from(hub["config"], f"{by_layer[0] / 'cfg.json'} (metadata.clt_hub.config)")
    else:
        cfg = _infer(first, by_layer[0], len(by_layer))
    if cfg.n_layers != len(by_layer):
        raise ArtifactError(f"{root}: {len(by_layer)} layer folders but config n_layers={cfg.n_layers}")
    return cfg


def _check_layer_cfg(folder: Path, c: dict[str, Any]) -> None:
    """A layer's cfg.json describes a transcoder clt_hub reads as it is."""
    arch = c.get("architecture")
    if arch not in ARCHITECTURES:
        raise ArtifactError(f"{folder / 'cfg.json'}: architecture {arch!r} is not a transcoder clt_hub reads; "
                            f"supported: {', '.join(ARCHITECTURES)}")
    if c.get("normalize_activations", "none") not in ("none", None):
        raise ArtifactError(f"{folder / 'cfg.json'}: normalize_activations={c['normalize_activations']!r} is "
                            "not supported; fold the normalisation into the weights first")


def _read_layer(out: Artifact, l: int, folder: Path, c: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    """Layer l's tensors from its safetensors `t` (and its cross-layer decoders) into `out`, in clt_hub's names."""
    cfg, path = out.cfg, folder / WEIGHTS
    w_enc = take(t, "W_enc", path)
    b_enc = take(t, "b_enc", path)
    b_dec = take(t, "b_dec", path)
    if c.get("apply_b_dec_to_input", False):
        # encoder sees x - b_dec: fold it into b_enc so the encoder reads raw MLP inputs
        b_enc = b_enc - b_dec @ w_enc
    out.tensors[f"W_enc.{l}"] = w_enc.T
    out.tensors[f"b_enc.{l}"] = b_enc
    out.tensors[f"b_dec.{l}"] = b_dec
    w_dec = take(t, "W_dec", path)
    if cfg.kind == "clt" and cfg.n_targets(l) > 1:
        cpath = folder / CROSS
        ct = read_safetensors(cpath)
        w_dec = torch.cat([w_dec[:, None, :], take(ct, "W_dec", cpath)], dim=1)
        reject_leftovers(ct, cpath)
    else:
        w_dec = w_dec[:, None, :]
    out.tensors[f"W_dec.{l}"] = w_dec
    if cfg.activation == "jumprelu":
        out.tensors[f"threshold.{l}"] = take(t, "threshold", path)
    if cfg.skip:
        out.tensors[f"W_skip.{l}"] = take(t, "W_skip", path)
    for name in ("W_enc", "b_enc", "b_dec", "W_dec", "threshold", "W_skip"):
        out.origins[f"{name}.{l}"] = f"{path}:{name}"


# What a layer's cfg.json says that every layer of a set shares. A layer whose cfg.json says another of the
# REFUSED (or another structure in clt_hub's own config) describes another transcoder than layer 0's, whose
# cfg.json gives the set's config: refused, naming the file and the field; any other difference is a warning.
REFUSED = ("architecture", "d_in", "d_out", "d_sae", "metadata.hook_name", "metadata.hook_name_out")


def _says(c: dict[str, Any], layer: int) -> dict[str, Any]:
    """The fields of a layer's cfg.json that every layer shares, by dotted name; a hook name with this layer's
    number written as '{layer}' (so layer 1's 'blocks.1.hook_resid_mid' reads as layer 0's 'blocks.0....')."""
    def mapping(parent: dict[str, Any], key: str) -> dict[str, Any]:
        value = parent.get(key)
        return value if isinstance(value, dict) else {}

    meta = mapping(c, "metadata")
    config = mapping(mapping(meta, "clt_hub"), "config")
    said = {"architecture": c.get("architecture"), "d_in": c.get("d_in"), "d_sae": c.get("d_sae"),
            "d_out": c.get("d_out", c.get("d_in")), "metadata.model_name": meta.get("model_name")}
    for key in ("hook_name", "hook_name_out"):
        name = meta.get(key)
        said[f"metadata.{key}"] = (".".join("{layer}" if part == str(layer) else part for part in name.split("."))
                                   if isinstance(name, str) else name)
    said.update({f"metadata.clt_hub.config.{k}": v for k, v in config.items() if k not in NOT_COMPARED})
    return said


def _same_as_first(root: Path, folder: Path, c: dict[str, Any], layer: int, first_folder: Path,
                   first: dict[str, Any], w_enc: torch.Tensor | None) -> None:
    """Layer `layer`'s cfg.json describes the same transcoder as layer 0's (see REFUSED), or is refused naming
    both files and the field; other differences (the model's name, the dataset) are a warning."""
    mine, theirs = _says(c, layer), _says(first, 0)
    differ = [k for k in dict.fromkeys([*theirs, *mine]) if mine.get(k) != theirs.get(k)
              and (not k.startswith("metadata.clt_hub.") or (k in mine and k in theirs))]  # one may lack clt_hub's
    if not differ:
        return
    here, there = (str(f.relative_to(root) / "cfg.json") for f in (folder, first_folder))

    def shown(key: str, said: dict[str, Any], n: int) -> str:
        value = said.get(key)
        text = repr(value.replace("{layer}", str(n)) if isinstance(value, str) and key.startswith("metadata.hook")
                    else value)
        return text if len(text) <= 60 else text[:57] + "..."

    fields = "; ".join(f"{k}: {shown(k, mine, layer)} in {here}, {shown(k, theirs, 0)} in {there}" for k in differ)
    refused = [k for k in differ if k in REFUSED or k.rpartition(".")[2] in
               (*STRUCTURE, "feature_input_hook", "feature_output_hook", "n_layers")]
    if refused:
        weights = (f"; the weights in {folder.name} have d_in {w_enc.shape[0]}, d_sae {w_enc.shape[1]}"
                   if w_enc is not None and w_enc.ndim == 2 else "")
        raise ArtifactError(f"{root}: {here} and {there} describe different transcoders ({fields}){weights}; every "
                            "layer of a set is the same kind of transcoder, so one of these layers is from another "
                            "set: re-download the folder or fix the cfg.json that is wrong")
    warnings.warn(f"{root}: {here} and {there} disagree ({fields}); clt_hub uses {there}'s values. Fix the "
                  "cfg.json that is wrong or re-save the folder (clt-hub convert)", stacklevel=5)


def _infer(c: dict, folder: Path, n_layers: int) -> TranscoderConfig:
    arch = c.get("architecture")
    if arch not in ARCHITECTURES:
        raise ArtifactError(f"{folder / 'cfg.json'}: architecture {arch!r} is not a transcoder clt_hub reads; "
                            f"supported: {', '.join(ARCHITECTURES)}")
    activation, skip = ARCHITECTURES[arch]
    meta = c.get("metadata") or {}
    d_in, d_out = c.get("d_in"), c.get("d_out", c.get("d_in"))
    if d_in != d_out:
        raise ArtifactError(f"{folder / 'cfg.json'}: d_in={d_in} but d_out={d_out}; MLP transcoders map the "
                            "residual width to itself")

    src = folder / "cfg.json"

    def hook(key: str, default: str) -> str:
        name = meta_field(meta, key, str, "", src)
        return re.sub(r"^blocks\.\d+\.", "", name) if name else default

    try:
        return TranscoderConfig(
            n_layers=n_layers, d_model=int(d_in), d_sae=int(c["d_sae"]), kind="plt",  # type: ignore[arg-type]
            activation=activation, skip=skip, model_name=meta_field(meta, "model_name", str, "", src),
            feature_input_hook=hook("hook_name", "hook_resid_mid"),
            feature_output_hook=hook("hook_name_out", "hook_mlp_out"),
            context_size=meta_field(meta, "context_size", int, None, src),
            prepend_bos=meta_field(meta, "prepend_bos", bool, True, src),
            dataset_path=meta_field(meta, "dataset_path", str, "", src),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder / 'cfg.json'}: missing or invalid field ({exc})") from None
