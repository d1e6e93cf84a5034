"""Gemma Scope 2 transcoders for Gemma-3 (google/gemma-scope-2-*): read-only, safetensors only.

Per-layer transcoders: one folder per layer, `layer_<L>_<set>/params.safetensors` (+ optional
`config.json`), where `<set>` names the set, e.g. `width_16k_l0_small_affine`. Cross-layer transcoders:
one file per source layer, `params_layer_<L>.safetensors`, side by side in the set's folder. Keys are
lowercase and encoders are stored [d_in, d_sae]. A folder must hold exactly one set; a folder with several
is refused with their names. The format, its sources and what is unverified: docs/layouts/gemma_scope_2.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from clt_hub.artifacts.layouts.common import (
    Artifact,
    config_from,
    read_json,
    read_safetensors,
    reject_leftovers,
    take,
)
from clt_hub.errors import ArtifactError

PARAMS = "params.safetensors"
CONFIG = "config.json"
LAYER_FOLDER = re.compile(r"layer_(\d+)_(.+)")  # layer_<L>_<set>
CLT_FILE = re.compile(r"params_layer_(\d+)\.safetensors")
SAE_FOLDER = re.compile(r"(resid_post|attn_out|mlp_out)(_all)?")  # Gemma Scope 2 SAEs: same files, not transcoders
AFFINE = "affine_skip_connection"
# Where Gemma Scope 2 transcoders attach (Hugging Face module outputs) and the clt_hub hook for each.
HOOK_IN = ("pre_feedforward_layernorm", "mlp.hook_in")  # the MLP's input
HOOK_OUT = ("post_feedforward_layernorm", "hook_mlp_out")  # the MLP block's output, after its norm
DEFAULT_HF_IN = f"model.layers.{{layer}}.{HOOK_IN[0]}.output"
DEFAULT_HF_OUT = f"model.layers.{{layer}}.{HOOK_OUT[0]}.output"
HOW_TO_PICK = ("download one set only (e.g. `hf download google/gemma-scope-2-270m-pt --include "
               "'transcoder_all/layer_*_width_16k_l0_small/*'`) or make a folder of links to that set's "
               "layer_<L>_<set> folders, and load that folder")


# ----------------------------------------------------------------- finding sets


def plt_sets(root: Path) -> dict[str, dict[int, Path]]:
    """Per-layer sets directly in `root`: set name -> layer -> `layer_<L>_<set>` folder."""
    sets: dict[str, dict[int, Path]] = {}
    for p in sorted(root.iterdir()):
        m = LAYER_FOLDER.fullmatch(p.name)
        if m and p.is_dir() and (p / PARAMS).is_file():
            sets.setdefault(m.group(2), {})[int(m.group(1))] = p
    return sets


def clt_files(root: Path) -> dict[int, Path]:
    """A cross-layer set directly in `root`: source layer -> `params_layer_<L>.safetensors`."""
    return {int(m.group(1)): p for p in sorted(root.iterdir()) if (m := CLT_FILE.fullmatch(p.name)) and p.is_file()}


def _subfolders(root: Path, depth: int) -> list[Path]:
    out: list[Path] = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and not LAYER_FOLDER.fullmatch(p.name):
            out.append(p)
            if depth > 1:
                out += _subfolders(p, depth - 1)
    return out


def nested_sets(root: Path) -> list[str]:
    """Transcoder sets one or two folders below `root` (a whole downloaded repo), as 'path (sets)'."""
    found = []
    for sub in _subfolders(root, 2):
        if SAE_FOLDER.fullmatch(sub.name):
            continue
        names = [*plt_sets(sub)] + (["cross-layer transcoder"] if clt_files(sub) else [])
        if names:
            found.append(f"{sub} ({', '.join(names)})")
    return found


def detect(root: Path) -> bool:
    """Whether `root` holds Gemma Scope 2 transcoders, itself or in its first two levels of subfolders."""
    return bool(plt_sets(root) or clt_files(root) or nested_sets(root))


# ----------------------------------------------------------------- config.json


def _hook(raw: dict[str, Any], key: str, module: str, path: Path, layer: int | None) -> str:
    """An hf_hook_point_* as a `{layer}` template, refusing any point but the one clt_hub's hooks mean."""
    value = raw[key]
    m = re.fullmatch(rf"(.*\blayers)\.(\d+)\.{module}(\.output)?", str(value))
    if not m:
        raise ArtifactError(f"{path}: {key} is {value!r}; clt_hub reads Gemma Scope 2 transcoders that read "
                            f"'model.layers.<L>.{HOOK_IN[0]}.output' and write "
                            f"'model.layers.<L>.{HOOK_OUT[0]}.output'. This file describes another kind")
    if layer is not None and int(m.group(2)) != layer:
        raise ArtifactError(f"{path}: {key} is {value!r}, a hook of layer {m.group(2)}, but the folder is layer "
                            f"{layer}; the folder was renamed or mixed up with another layer's")
    return f"{m.group(1)}.{{layer}}" + str(value)[m.end(2):]


def _settings(path: Path, raw: dict[str, Any] | None, layer: int | None) -> dict[str, Any]:
    """What one config.json (None: absent) says, in clt_hub's terms."""
    if raw is None:
        return {"hf_hook_name": DEFAULT_HF_IN, "hf_hook_name_out": DEFAULT_HF_OUT}
    if raw.get("architecture") != "jump_relu":
        raise ArtifactError(f"{path}: architecture is {raw.get('architecture')!r}; Gemma Scope 2 transcoders are "
                            "'jump_relu'")
    out: dict[str, Any] = {"hf_hook_name": DEFAULT_HF_IN, "hf_hook_name_out": DEFAULT_HF_OUT}
    if "hf_hook_point_in" in raw or "hf_hook_point_out" in raw:
        if "hf_hook_point_out" not in raw:
            raise ArtifactError(f"{path}: hf_hook_point_in but no hf_hook_point_out: a Gemma Scope 2 SAE "
                                f"(it reconstructs {raw['hf_hook_point_in']!r}), not a transcoder")
        if "hf_hook_point_in" in raw:
            out["hf_hook_name"] = _hook(raw, "hf_hook_point_in", HOOK_IN[0], path, layer)
        out["hf_hook_name_out"] = _hook(raw, "hf_hook_point_out", HOOK_OUT[0], path, layer)
    if "affine_connection" in raw:
        out["affine"] = bool(raw["affine_connection"])
    if raw.get("model_name"):
        out["model_name"] = _model_name(str(raw["model_name"]))
    return out


def _model_name(raw: str) -> str:
    """config.json's model_name as a Hub model id, normalised as SAE-Lens does for Gemma Scope 2: an org
    prefix, '-v3' spelled '-3', and no '-pt' for 270M (google/gemma-3-270m has none)."""
    name = (raw if "/" in raw else f"google/{raw}").replace("-v3", "-3")
    return name.removesuffix("-pt") if "270m" in name else name


def _model_from_path(*paths: Path) -> str:
    """The model a Hub cache path names (…/models--google--gemma-scope-2-270m-it/…), or ''."""
    for p in paths:
        m = re.search(r"gemma-scope-2-(\d+[mb])-(pt|it)\b", str(p))
        if m:
            size, variant = m.groups()
            return f"google/gemma-3-{size}" + ("-it" if variant == "it" else "" if size == "270m" else "-pt")
    return ""


def _config(root: Path, kind: str, n_layers: int, d: int, F: int, skip: bool, settings: dict[str, Any],
            anchor: Path, source: str) -> Artifact:
    if "affine" in settings and settings["affine"] != skip:
        raise ArtifactError(f"{source}: affine_connection is {settings['affine']} but the weights "
                            f"{'have' if skip else 'have no'} '{AFFINE}'; the config belongs to another set")
    model = settings.get("model_name") or _model_from_path(root.absolute(), anchor.resolve())
    cfg = config_from({
        "n_layers": n_layers, "d_model": d, "d_sae": F, "kind": kind, "activation": "jumprelu", "skip": skip,
        "feature_input_hook": HOOK_IN[1], "feature_output_hook": HOOK_OUT[1],
        "hf_hook_name": settings["hf_hook_name"], "hf_hook_name_out": settings["hf_hook_name_out"],
        "model_name": model or ("google/gemma-3-270m" if d == 640 else ""),
    }, source)
    return Artifact(cfg)


# ----------------------------------------------------------------- reading
# Transposed tensors get the memory layout the native layout loads them with (PLT encoders stay a
# transposed view, as SAE-Lens files store them; CLT encoders and skips are contiguous), so a model loaded
# from here and its converted copy take the same matmul paths and compute bit for bit alike.


def _shape(t: torch.Tensor, path: Path, key: str, shape: tuple[int, ...], meaning: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ArtifactError(f"{path}: '{key}' has shape {tuple(t.shape)}, expected {shape} ({meaning}); the "
                            "file is damaged or belongs to another transcoder: re-download it")
    return t


def _complete(layers: dict[int, Path], root: Path, what: str) -> None:
    missing = sorted(set(range(max(layers) + 1)) - set(layers))
    if missing:
        raise ArtifactError(f"{root}: {what} has layers {sorted(layers)}; layer(s) {missing} are missing. A set "
                            "needs every layer from 0; finish the download")


def _refuse_sae_folder(root: Path) -> None:
    sae = [p for p in root.absolute().parts if SAE_FOLDER.fullmatch(p)]
    if sae:
        raise ArtifactError(f"{root} sits in {sae[-1]}/, which holds Gemma Scope 2 SAEs, not transcoders; "
                            "clt_hub reads the transcoder_all/, transcoder/ and clt/ sets")


def read(root: Path, lazy: bool = False) -> Artifact:
    plt, clt = plt_sets(root), clt_files(root)
    if plt and clt:
        raise ArtifactError(f"{root} holds both per-layer sets ({', '.join(plt)}) and cross-layer files "
                            "(params_layer_<L>.safetensors); keep one set per folder")
    if not plt and not clt:
        found = nested_sets(root)
        if not found:
            raise ArtifactError(f"{root}: no Gemma Scope 2 transcoder (layer_<L>_<set>/{PARAMS} folders or "
                                "params_layer_<L>.safetensors files)")
        raise ArtifactError(f"{root} holds no Gemma Scope 2 set itself, only in subfolders: {'; '.join(found)}. "
                            f"Point at the folder of one set; if it holds several, {HOW_TO_PICK}")
    if clt:
        return _read_clt(root, clt)
    if len(plt) > 1:
        raise ArtifactError(f"{root} holds {len(plt)} Gemma Scope 2 sets: {', '.join(plt)}; clt_hub loads one set "
                            f"at a time: {HOW_TO_PICK}")
    name, folders = next(iter(plt.items()))
    return _read_plt(root, name, folders)


def _read_plt(root: Path, name: str, folders: dict[int, Path]) -> Artifact:
    _complete(folders, root, f"set {name}")
    out: Artifact | None = None
    hooks: tuple[str, str] | None = None
    for l, folder in sorted(folders.items()):
        cpath = folder / CONFIG
        raw = read_json(cpath) if cpath.exists() else None
        if raw is None and out is None:
            _refuse_sae_folder(root)  # without a config, only the folder names tell an SAE set from transcoders
        settings = _settings(cpath, raw, l)
        path = folder / PARAMS
        t = read_safetensors(path)
        w_enc, w_dec = take(t, "w_enc", path), take(t, "w_dec", path)
        if out is None:
            if w_enc.dim() != 2 or w_dec.dim() != 2:
                raise ArtifactError(f"{path}: w_enc {tuple(w_enc.shape)} and w_dec {tuple(w_dec.shape)} must both be "
                                    "2-D ([d_in, d_sae] and [d_sae, d_out]); a 3-D w_dec is a cross-layer "
                                    "transcoder's, stored as params_layer_<L>.safetensors")
            (d, F), d_out = w_enc.shape, w_dec.shape[-1]
            if d_out != d:
                raise ArtifactError(f"{path}: d_in={d} but d_out={d_out}; MLP transcoders map the residual width to "
                                    "itself")
            skip = AFFINE in t
            if name.endswith("_affine") != skip:
                raise ArtifactError(f"{path}: the set is named {name!r} but the file {'has' if skip else 'has no'} "
                                    f"'{AFFINE}'; the folder was renamed or holds another set's file")
            out = _config(root, "plt", len(folders), d, F, skip, settings, folder, f"{cpath} ({name})")
            hooks = (out.cfg.hf_hook_name, out.cfg.hf_hook_name_out)
        elif "affine" in settings and settings["affine"] != out.cfg.skip:
            raise ArtifactError(f"{cpath}: affine_connection is {settings['affine']}, unlike layer 0 of set {name}")
        if (settings["hf_hook_name"], settings["hf_hook_name_out"]) != hooks:
            raise ArtifactError(f"{cpath}: hooks {settings['hf_hook_name']!r} -> {settings['hf_hook_name_out']!r} "
                                f"differ from layer 0's {hooks}; the set mixes transcoders of different kinds")
        d, F = out.cfg.d_model, out.cfg.d_sae
        out.tensors[f"W_enc.{l}"] = _shape(w_enc, path, "w_enc", (d, F), "[d_in, d_sae]").T
        out.tensors[f"W_dec.{l}"] = _shape(w_dec, path, "w_dec", (F, d), "[d_sae, d_out]")[:, None, :]
        _read_common(out, t, path, l)
    assert out is not None
    return out


def _read_clt(root: Path, files: dict[int, Path]) -> Artifact:
    _complete(files, root, "the cross-layer transcoder")
    n = len(files)
    cpath = root / CONFIG
    settings = _settings(cpath, read_json(cpath) if cpath.exists() else None, None)
    out: Artifact | None = None
    for l, path in sorted(files.items()):
        t = read_safetensors(path)
        w_enc, w_dec = take(t, "w_enc", path), take(t, "w_dec", path)
        if out is None:
            if w_enc.dim() != 2 or w_dec.dim() != 3:
                raise ArtifactError(f"{path}: w_enc {tuple(w_enc.shape)} and w_dec {tuple(w_dec.shape)}; a cross-layer "
                                    "transcoder stores w_enc [d_in, d_sae] and w_dec [d_sae, n_layers, d_out]")
            d, F = w_enc.shape
            out = _config(root, "clt", n, d, F, AFFINE in t, settings, path, f"{root} (cross-layer transcoder)")
        d, F = out.cfg.d_model, out.cfg.d_sae
        if w_dec.dim() == 3 and w_dec.shape[1] != n:
            raise ArtifactError(f"{path}: w_dec decodes to {w_dec.shape[1]} layers but {root} has {n} "
                                f"params_layer_<L>.safetensors files; a file is missing or belongs to another CLT")
        out.tensors[f"W_enc.{l}"] = _shape(w_enc, path, "w_enc", (d, F), "[d_in, d_sae]").T.contiguous()
        # decoders to every layer are stored; only targets >= the source layer are part of the model
        w_dec = _shape(w_dec, path, "w_dec", (F, n, d), "[d_sae, n_layers, d_out]")
        out.tensors[f"W_dec.{l}"] = w_dec[:, l:, :].contiguous()
        _read_common(out, t, path, l)
    assert out is not None
    return out


def _read_common(out: Artifact, t: dict[str, torch.Tensor], path: Path, l: int) -> None:
    """Biases, threshold and the affine skip of layer `l`; then nothing may be left in the file."""
    d, F = out.cfg.d_model, out.cfg.d_sae
    out.tensors[f"b_enc.{l}"] = _shape(take(t, "b_enc", path), path, "b_enc", (F,), "[d_sae]")
    out.tensors[f"b_dec.{l}"] = _shape(take(t, "b_dec", path), path, "b_dec", (d,), "[d_out]")
    out.tensors[f"threshold.{l}"] = _shape(take(t, "threshold", path), path, "threshold", (F,), "[d_sae]")
    keys = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    if out.cfg.skip:
        affine = _shape(take(t, AFFINE, path), path, AFFINE, (d, d), "[d_in, d_out]")
        out.tensors[f"W_skip.{l}"] = affine.T.contiguous()  # skip = x @ affine = x @ W_skip.T
        keys["W_skip"] = AFFINE
    for canon, key in keys.items():
        out.origins[f"{canon}.{l}"] = f"{path}:{key}"
    reject_leftovers(t, path)
