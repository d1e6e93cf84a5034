"""Shared reading/validation for every on-disk layout.

Each layout reader produces an `Artifact`: a config plus canonical tensors (`W_enc.<l>` ...) with the
file each came from; `check` validates them all in one place so every layout gets the same clear errors.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clt_hub.artifacts.lazy import RowReader, read_header
from clt_hub.config import (
    DTYPES,
    MAX_CONFIG_BYTES,
    TranscoderConfig,
    dtype_name,
    hook_for_layer,
    load_json,
    load_yaml,
)
from clt_hub.errors import ArtifactError, ConfigError

SAELENS_FORMAT_VERSION = "6.0.0"  # the SAE-Lens cfg.json schema we write (v6: hooks inside metadata)
MANIFEST = "cfg.json"  # clt_hub's SAE-Lens-style manifest at the top of every folder it writes
# Metrics of a folder in which clt_hub owns no config (SAE-Lens, circuit-tracer or Gemma Scope as published):
# `clt-hub eval --write-metrics` writes them here instead of rewriting files of another tool's.
METRICS_SIDECAR = "clt_hub_metrics.json"


@dataclass
class Artifact:
    """What a layout reader returns: the config, canonical tensors and where each came from."""

    cfg: TranscoderConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # canonical name -> "file:key"
    lazy: dict[int, RowReader] = field(default_factory=dict)
    config_file: Path | None = None  # the file the config was read from, when it is not config.yaml (SAE-Lens)


def inside(root: Path, entry: object, source: Path | str) -> Path:
    """`root / entry` for a file name that an artifact's own config lists, refused unless it stays inside
    `root`: a relative path without `..` (a config from a Hub repo must not make the reader open any other file
    of the machine). Checked on the name, not by resolving links: the Hub cache's snapshot files are links into
    its blob store."""
    text = str(entry)
    parts = Path(text).parts
    if not text or Path(text).is_absolute() or ".." in parts or "\\" in text or (parts and ":" in parts[0]):
        raise ArtifactError(f"{source}: file entry {text[:200]!r} is not a relative path inside {root}; an "
                            "artifact may only list its own files")
    return root / text


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every failure into an error that names the file."""
    read_header(path)  # catches missing/truncated files with a precise message
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read safetensors ({exc}); the file is corrupted: "
                            "download it again (force_download=True)") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def take(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    try:
        return tensors.pop(key)
    except KeyError:
        raise ArtifactError(f"{path}: tensor '{key}' is missing (found: {', '.join(sorted(tensors)) or 'none'})") from None


def reject_leftovers(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Unknown tensors are an error, never silently dropped (a complaint about SAE-Lens)."""
    if tensors:
        raise ArtifactError(f"{path}: unexpected tensor(s) {', '.join(sorted(tensors))}; this file does not "
                            "match the layout it sits in. Check the file or convert it with `clt-hub convert`")


ARTIFACT_FIX = "fix or re-download the file"


def _mapping(data: Any, path: Path, kind: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a {kind} mapping, got {type(data).__name__}")
    return data


def read_json(path: Path) -> dict[str, Any]:
    """An artifact's JSON config (cfg.json, config.json): clt_hub.config.load_json, as an ArtifactError."""
    return _mapping(load_json(path, what="config file", max_bytes=MAX_CONFIG_BYTES, error=ArtifactError,
                              fix=ARTIFACT_FIX), path, "JSON")


def read_yaml(path: Path) -> dict[str, Any]:
    """An artifact's config.yaml: safe YAML without aliases (clt_hub.config.load_yaml), as an ArtifactError."""
    return _mapping(load_yaml(path, what="config file", max_bytes=MAX_CONFIG_BYTES, error=ArtifactError,
                              fix=ARTIFACT_FIX), path, "YAML")


def write_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_yaml(data: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def meta_field(meta: dict[str, Any], key: str, kind: type, default: Any, source: Path | str) -> Any:
    """A field of a third-party config (circuit-tracer, SAE-Lens) of the type it must have, or `default`
    when absent: `prepend_bos: "false"` must not load as True, nor a hook name as a dict."""
    value = meta.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ArtifactError(f"{source}: field {key!r} must be a {kind.__name__}, got {value!r}; fix the config")
    return value


def config_from(data: Any, source: str) -> TranscoderConfig:
    try:
        return TranscoderConfig.from_dict(data, source=source)
    except ConfigError as exc:
        raise ArtifactError(str(exc)) from None


def expected_shapes(cfg: TranscoderConfig) -> dict[str, tuple[int, ...]]:
    L, d, F = cfg.n_layers, cfg.d_model, cfg.d_sae
    shapes: dict[str, tuple[int, ...]] = {}
    for l in range(L):
        shapes[f"W_enc.{l}"] = (F, d)
        shapes[f"b_enc.{l}"] = (F,)
        shapes[f"b_dec.{l}"] = (d,)
        shapes[f"W_dec.{l}"] = (F, cfg.n_targets(l), d)
        if cfg.activation == "jumprelu":
            shapes[f"threshold.{l}"] = (F,)
        if cfg.skip:
            shapes[f"W_skip.{l}"] = (d, d)
    return shapes


def _shape_hint(cfg: TranscoderConfig) -> str:
    return (f"the config says n_layers={cfg.n_layers}, d_model={cfg.d_model}, d_sae={cfg.d_sae}, "
            f"kind={cfg.kind}; the config and the weights disagree, so one of them belongs to another "
            "transcoder: re-download or fix the config")


def check(artifact: Artifact, check_finite: bool = True) -> Artifact:
    """Validate canonical tensors against the config (names, shapes, float dtypes, finite values); record
    the stored dtype in the config. Returns the artifact, ready for `Transcoder.from_tensors`."""
    cfg = artifact.cfg
    shapes = expected_shapes(cfg)
    for name, shape in shapes.items():
        origin = artifact.origins.get(name, name)
        if name.startswith("W_dec.") and artifact.lazy:
            reader = artifact.lazy[int(name.split(".")[1])]
            actual: tuple[int, ...] = tuple(reader.shape)
        elif name not in artifact.tensors:
            raise ArtifactError(f"{origin}: tensor is missing; {_shape_hint(cfg)}")
        else:
            t = artifact.tensors[name]
            actual = tuple(t.shape)
            if str(t.dtype).removeprefix("torch.") not in DTYPES:
                raise ArtifactError(f"{origin}: dtype {t.dtype} is not a float type")
            if check_finite and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ArtifactError(f"{origin}: {bad} NaN/inf value(s); the weights are broken (a diverged "
                                    "training run or a corrupted file): retrain or re-download")
        if actual != shape:
            raise ArtifactError(f"{origin}: shape {actual}, expected {shape}; {_shape_hint(cfg)}")
    extra = sorted(set(artifact.tensors) - set(shapes))
    if extra:
        raise ArtifactError(f"unexpected tensor(s) {', '.join(artifact.origins.get(e, e) for e in extra)} "
                            f"for a {cfg.kind} with activation={cfg.activation}, skip={cfg.skip}")
    first: dict[str, str] = {}  # dtype -> the first tensor stored in it
    for name, t in artifact.tensors.items():
        first.setdefault(str(t.dtype).removeprefix("torch."), artifact.origins.get(name, name))
    for reader in artifact.lazy.values():
        first.setdefault(str(reader.torch_dtype).removeprefix("torch."), f"{reader.path}:{reader.key}")
    if len(first) > 1:
        shown = "; ".join(f"{d} (e.g. {origin})" for d, origin in sorted(first.items()))
        raise ArtifactError(f"the artifact mixes dtypes: {shown}. A transcoder is stored in one dtype; the files "
                            "belong to different saves. Re-save it (clt-hub convert SRC DST --dtype float32)")
    if artifact.tensors:
        cfg.dtype = dtype_name(next(iter(artifact.tensors.values())).dtype)
    return artifact


def hook_names(cfg: TranscoderConfig, layer: int) -> dict[str, str]:
    """Per-layer hook names in both conventions."""
    return {
        "hook_name": f"blocks.{layer}.{cfg.feature_input_hook}",
        "hook_name_out": f"blocks.{layer}.{cfg.feature_output_hook}",
        "hf_hook_name": hook_for_layer(cfg.hf_hook_name, layer),
        "hf_hook_name_out": hook_for_layer(cfg.hf_hook_name_out, layer),
    }


def saelens_architecture(cfg: TranscoderConfig) -> str:
    """The SAE-Lens architecture one layer of this transcoder loads as."""
    if cfg.activation == "jumprelu":
        return "jumprelu_skip_transcoder" if cfg.skip else "jumprelu_transcoder"
    if cfg.activation == "relu":
        return "skip_transcoder" if cfg.skip else "transcoder"
    # SAE-Lens has no TopK transcoder; a name it does not know makes it refuse instead of loading wrong.
    return "clt_hub_topk_transcoder"


def saelens_cfg(cfg: TranscoderConfig, layer: int | None) -> dict[str, Any]:
    """A SAE-Lens v6 cfg.json for one layer (or, with layer=None, the artifact as a whole)."""
    hooks = hook_names(cfg, layer) if layer is not None else {
        "hook_name": f"blocks.{{layer}}.{cfg.feature_input_hook}",
        "hook_name_out": f"blocks.{{layer}}.{cfg.feature_output_hook}",
        "hf_hook_name": cfg.hf_hook_name, "hf_hook_name_out": cfg.hf_hook_name_out,
    }
    return {
        "architecture": saelens_architecture(cfg),
        "d_in": cfg.d_model,
        "d_sae": cfg.d_sae,
        "d_out": cfg.d_model,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "model_name": cfg.model_name,
            **hooks,
            "context_size": cfg.context_size,
            "prepend_bos": cfg.prepend_bos,
            "dataset_path": cfg.dataset_path,
            "neuronpedia_id": (f"{cfg.neuronpedia_id}/{layer}" if cfg.neuronpedia_id and layer is not None
                               else cfg.neuronpedia_id),
            "clt_hub": {"layer": layer, "config": cfg.to_dict()},
        },
    }


def merge_metrics_sidecar(root: Path, cfg: TranscoderConfig) -> None:
    """Add the metrics of `root`'s METRICS_SIDECAR (if any) to `cfg.metrics`; they win over the config's own."""
    path = root / METRICS_SIDECAR
    if not path.is_file():
        return
    metrics = read_json(path).get("metrics")
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path}: expected {{\"metrics\": {{name: value, ...}}}}; {ARTIFACT_FIX} or delete it")
    try:
        merged = dataclasses.replace(cfg, metrics={**cfg.metrics, **metrics})  # validated like a config's own
    except ConfigError as exc:
        raise ArtifactError(f"{path}: {exc}; {ARTIFACT_FIX} or delete it") from None
    cfg.metrics = merged.metrics


# What the transcoder is: a manifest that disagrees on these describes another transcoder than the one loaded.
STRUCTURE = ("kind", "n_layers", "d_model", "d_sae", "activation", "skip")
NOT_COMPARED = ("metrics", "dtype")  # metrics may be added later; the dtype is the weights' own (check)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_manifest(root: Path, cfg: TranscoderConfig, source: Path) -> None:
    """Compare clt_hub's manifest (`root/cfg.json`, read by SAE-Lens-style tools) with the config the reader
    loaded from `source` (and checked against the weights): refuse when they describe another transcoder
    (STRUCTURE), warn naming the fields when they differ otherwise. Folders without a manifest pass."""
    path = root / MANIFEST
    if not path.is_file():
        return
    manifest = read_json(path)
    if not isinstance(manifest.get("clt_hub"), dict):
        return  # not clt_hub's manifest (e.g. a single SAE-Lens transcoder's cfg.json)

    def mapping(parent: dict[str, Any], key: str) -> dict[str, Any]:
        value = parent.get(key)
        return value if isinstance(value, dict) else {}

    meta = mapping(manifest, "metadata")
    config = mapping(mapping(meta, "clt_hub"), "config")
    said: list[tuple[dict[str, Any], str, str]] = [  # (mapping, its key, the config field it states)
        (manifest, "d_in", "d_model"), (manifest, "d_sae", "d_sae"), (meta, "model_name", "model_name"),
        (mapping(manifest, "clt_hub"), "kind", "kind"), *((config, key, key) for key in config)]
    loaded = cfg.to_dict()
    differ: dict[str, Any] = {}  # field -> what the manifest says (its SAE-Lens-facing value first)
    for where, key, field_name in said:
        if field_name in loaded and field_name not in NOT_COMPARED and key in where and where[key] != loaded[field_name]:
            differ.setdefault(field_name, where[key])
    if not differ:
        return
    name = source.relative_to(root).as_posix() if source.is_relative_to(root) else source.name  # layer_0/cfg.json
    shown = "; ".join(f"{k}: {_short(v)} in {path.name}, {_short(loaded[k])} in {name}" for k, v in differ.items())
    structural = [k for k in differ if k in STRUCTURE]
    if structural:
        raise ArtifactError(f"{path} and {source} describe different transcoders ({shown}); the weights match "
                            f"{name}, so {path.name} is from another save: delete or fix {path.name} (then "
                            "`clt-hub convert` the folder to write a matching one)")
    warnings.warn(f"{path} and {source} disagree ({shown}); clt_hub uses {name}'s values. Fix {path.name} "
                  "or re-save the folder (clt-hub convert) to make them agree", stacklevel=4)
