"""Store evaluation metrics in an existing transcoder folder without re-saving it.

Only files clt_hub owns change, each replaced atomically (atomic_write_text), in the folder's own layout:
its sections of config.yaml and of the cfg.json files (`clt_hub` / `metadata.clt_hub.config`), and a model
card it wrote. Weights and every other file stay byte for byte. A folder in which clt_hub owns no config (as
SAE-Lens, circuit-tracer or Gemma Scope publish it) gets one file of clt_hub's beside them instead,
`clt_hub_metrics.json`, which `layouts.read` adds to `cfg.metrics`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from clt_hub.artifacts.atomic import atomic_write_text
from clt_hub.artifacts.layouts import detect, saelens
from clt_hub.artifacts.layouts.common import MANIFEST, METRICS_SIDECAR, read_json, read_yaml
from clt_hub.artifacts.modelcard import render
from clt_hub.config import MAX_CONFIG_BYTES, TranscoderConfig
from clt_hub.errors import ArtifactError, ConfigError

CARD = "README.md"
CARD_MARK = "Written by clt_hub"  # a card with this line is clt_hub's (push_folder rewrites it too)


def _dict_at(data: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data if isinstance(data, dict) else None


class _Section:
    """A config of clt_hub's inside one file: `keys` lead from the file's top to the mapping holding `metrics`."""

    def __init__(self, path: Path, data: dict[str, Any], keys: tuple[str, ...], dump: Callable[[dict[str, Any]], str]):
        self.path, self.data, self.keys, self.dump = path, data, keys, dump

    @property
    def config(self) -> dict[str, Any]:
        config = _dict_at(self.data, self.keys)
        assert config is not None
        return config


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"  # as layouts.common.write_json writes it


def _yaml(data: dict[str, Any]) -> str:
    return str(yaml.safe_dump(data, sort_keys=False))  # as layouts.common.write_yaml writes it


def _sections(root: Path) -> tuple[list[_Section], list[Path]]:
    """clt_hub's config sections in `root` (the manifest, per-layer cfg.json files, config.yaml), and the
    config files of the folder that have no such section."""
    found: list[_Section] = []
    foreign: list[Path] = []
    candidates = [(root / MANIFEST, ("metadata", "clt_hub", "config"))]
    candidates += [(p, ("metadata", "clt_hub", "config")) for p in sorted(root.glob(f"*/{MANIFEST}"))]
    for path, keys in candidates:
        if path.is_file():
            data = read_json(path)
            if _dict_at(data, keys) is not None:
                found.append(_Section(path, data, keys, _json))
            elif path.parent != root:
                foreign.append(path)
    if (root / "config.yaml").is_file():
        data = read_yaml(root / "config.yaml")
        if _dict_at(data, ("clt_hub",)) is not None:
            found.append(_Section(root / "config.yaml", data, ("clt_hub",), _yaml))
        else:
            foreign.append(root / "config.yaml")
    return found, foreign


def _needs_sidecar(root: Path, layout: str, found: list[_Section], foreign: list[Path]) -> bool:
    """Whether the reader of `layout` takes its config from a file without a clt_hub section."""
    if (root / METRICS_SIDECAR).exists():
        return True  # it would override what is written elsewhere: keep it current
    if layout.startswith("circuit-tracer"):
        return root / "config.yaml" in foreign
    if layout == "sae-lens":
        return any(f / MANIFEST in foreign for f in saelens.find_layer_folders(root))
    return True  # Gemma Scope: clt_hub owns none of its files


def _card_section(metrics: Mapping[str, Any]) -> str:
    card = render(TranscoderConfig(n_layers=1, d_model=1, d_sae=1, metrics=dict(metrics)), layout="native")
    return card[card.index("## Metrics\n"):card.index("## Loading\n")]


def _card_with(text: str, metrics: Mapping[str, Any]) -> str:
    """The card with its metrics section replaced (or added before "## Loading"); the rest as it is."""
    section = _card_section(metrics)
    if "\n## Metrics\n" in text:
        start = text.index("\n## Metrics\n") + 1
        end = text.find("\n## ", start)
        return text[:start] + section + (text[end + 1:] if end >= 0 else "")
    if "\n## Loading\n" in text:
        at = text.index("\n## Loading\n") + 1
        return text[:at] + section + text[at:]
    return text.rstrip("\n") + "\n\n" + section


def write_metrics(folder: str | os.PathLike[str], metrics: Mapping[str, Any]) -> list[Path]:
    """Add `metrics` to the transcoder in `folder` (earlier metrics of other names are kept) where clt_hub's
    readers find them, touching only clt_hub's own files; returns the files written."""
    root = Path(folder)
    layout = detect(root)  # also refuses a scratch folder of an interrupted save
    found, foreign = _sections(root)
    sidecar = root / METRICS_SIDECAR
    side_data = read_json(sidecar) if sidecar.is_file() else {}
    merged: dict[str, Any] = {}
    for section in found:
        if isinstance(section.config.get("metrics"), dict):
            merged.update(section.config["metrics"])
    if isinstance(side_data.get("metrics"), dict):
        merged.update(side_data["metrics"])
    merged.update(metrics)
    try:  # the rules of a config's metrics field, before any file changes
        TranscoderConfig(n_layers=1, d_model=1, d_sae=1, metrics=merged)
    except ConfigError as exc:
        raise ConfigError(f"metrics for {root}: {exc}") from None
    written = []
    for section in found:
        section.config["metrics"] = merged
        atomic_write_text(section.path, section.dump(section.data))
        written.append(section.path)
    if _needs_sidecar(root, layout, found, foreign):
        atomic_write_text(sidecar, _json({"format_version": 1, "metrics": merged}))
        written.append(sidecar)
    card = root / CARD
    if card.is_file() and card.stat().st_size <= MAX_CONFIG_BYTES:  # a bigger one is not a card clt_hub wrote
        try:
            text = card.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{card}: cannot read the model card ({exc})") from None
        if CARD_MARK in text:
            atomic_write_text(card, _card_with(text, merged))
            written.append(card)
    return written


__all__ = ["METRICS_SIDECAR", "write_metrics"]
