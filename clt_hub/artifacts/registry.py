"""Known pretrained transcoders by short name, extendable with a YAML file and no code changes."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from clt_hub.config import load_yaml
from clt_hub.errors import ConfigError

ENV_VAR = "CLT_HUB_REGISTRY"
USER_FILE = Path("~/.config/clt_hub/registry.yaml")


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    repo_id: str
    revision: str = "main"
    model: str = ""
    kind: str = "clt"
    feature_input_hook: str = ""
    feature_output_hook: str = ""
    subfolder: str = ""
    description: str = ""


def _parse(data: object, source: str) -> dict[str, RegistryEntry]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a registry is a mapping of name -> fields")
    known = {f.name for f in fields(RegistryEntry)} - {"name"}
    out = {}
    for name, fields_ in data.items():
        if not isinstance(fields_, dict) or "repo_id" not in fields_:
            raise ConfigError(f"{source}: entry {name!r} needs at least a repo_id")
        unknown = {str(k) for k in fields_ if k not in known}  # YAML keys may be ints or null
        if unknown:
            raise ConfigError(f"{source}: entry {name!r} has unknown field(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        for key, value in fields_.items():  # str() would turn null into 'None' and a list into "['a', 'b']"
            if value is None or isinstance(value, (list, dict)):
                raise ConfigError(f"{source}: entry {name!r} field {key!r} must be a single value (text), got "
                                  f"{'null' if value is None else type(value).__name__}")
        out[str(name)] = RegistryEntry(name=str(name), **{k: str(v) for k, v in fields_.items()})
    return out


def _read(path: Path) -> dict[str, RegistryEntry]:
    return _parse(load_yaml(path, what="registry file", fix="fix the file or move it away"), str(path))


def entries() -> dict[str, RegistryEntry]:
    """Bundled entries, then the user file, then $CLT_HUB_REGISTRY (later ones win)."""
    text = resources.files("clt_hub").joinpath("data/registry.yaml").read_text(encoding="utf-8")
    bundled = "clt_hub/data/registry.yaml"
    out = _parse(load_yaml(text, source=bundled, what="registry file", fix="reinstall clt_hub"), bundled)
    user = USER_FILE.expanduser()
    if user.exists():
        out.update(_read(user))
    extra = os.environ.get(ENV_VAR)
    if extra:
        path = Path(extra).expanduser()
        if not path.exists():
            raise ConfigError(f"${ENV_VAR} points at {path}, which does not exist")
        out.update(_read(path))
    return out


def lookup(name: str) -> RegistryEntry | None:
    return entries().get(name)
