"""Hugging Face Hub I/O: resolve a name to a local folder, describe it, publish a folder.

Everything goes through `huggingface_hub` (snapshot_download / HfApi), so HF_ENDPOINT, HF_HOME,
HF_HUB_OFFLINE and tokens behave as in the rest of the ecosystem.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from clt_hub.artifacts.layouts import detect, read
from clt_hub.artifacts.modelcard import write_model_card
from clt_hub.artifacts.registry import lookup
from clt_hub.config import check_repo_id
from clt_hub.errors import HubError

CACHE_ENV = "CLT_HUB_CACHE"


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


_PROBES: dict[str, tuple[float, str | None]] = {}
PROBE_TTL_S = 30.0  # a long-running process (the Space) notices within this time that the Hub came back


def _reachable(endpoint: str, timeout: float) -> str | None:
    """None if the Hub answers at all within `timeout` seconds, else why not (remembered PROBE_TTL_S)."""
    from huggingface_hub import get_session

    now = time.monotonic()
    if endpoint in _PROBES and now - _PROBES[endpoint][0] < PROBE_TTL_S:
        return _PROBES[endpoint][1]
    why = None
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any transport failure means "not reachable"
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
    _PROBES[endpoint] = (now, why)
    return why


def offline_if_unreachable(name: str, what: str, cache_dir: str | os.PathLike[str] | None = None,
                           patterns: list[str] | None = None, timeout: float = 3.0) -> bool:
    """Whether to load `name` from the local cache only: True when the Hub cannot be reached and `name`
    is cached. Raises at once, suggesting --offline, when it can be reached neither way; without this,
    huggingface_hub's retries make an unreachable Hub cost half a minute before any error."""
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        return True
    why = _reachable(_endpoint(), timeout)
    if why is None:
        return False
    try:
        snapshot_download(name, local_files_only=True, cache_dir=None if cache_dir is None else Path(cache_dir),
                          allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not cached, in any of the ways huggingface_hub reports it
        raise HubError(f"cannot reach the Hub at {_endpoint()} ({why}) and {what} {name!r} is not in the local "
                       "cache. Connect to the network, or pass --offline (Python: local_files_only=True) to use "
                       "only what is cached, or give a local folder") from None
    return True


def _snapshot(name: str, revision: str | None, cache_dir: str | os.PathLike[str] | None, local_files_only: bool,
              force_download: bool, token: str | bool | None, patterns: list[str] | None) -> str:
    """huggingface_hub's snapshot of `name`, every way it can fail said as one HubError with the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            name, revision=revision, cache_dir=None if cache_dir is None else Path(cache_dir), local_files_only=local_files_only,
            force_download=force_download, token=token, library_name="clt-hub", allow_patterns=patterns,
        )
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} does not exist in {name} on {_endpoint()}; check the branch, "
                       "tag or commit (see the repo's 'Files and versions' page)") from None
    except GatedRepoError:
        raise HubError(f"{name} is gated; accept its terms on the Hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise HubError(f"repo {name} does not exist on {_endpoint()} (or is private: log in with "
                       "`hf auth login`); check the spelling") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{name}" + (f"@{revision}" if revision else "") + " is not in the local cache and the Hub "
            f"({_endpoint()}) cannot be reached or offline mode is on. Connect and run "
            f"`clt-hub download {name}` once, or pass a local folder"
        ) from None
    except HFValidationError as exc:
        raise HubError(f"{name!r} is not a valid repo id: {exc}") from None
    except OSError as exc:
        raise HubError(f"could not download {name} from {_endpoint()}: {exc}") from None


def resolve(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Local folder, registry name or repo id -> local folder holding the artifact."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    subfolder = ""
    entry = lookup(name)
    if entry is not None:
        name, subfolder = entry.repo_id, entry.subfolder
        revision = revision or entry.revision
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise HubError(
            f"{name_or_path!r} is neither an existing folder, a known transcoder name, nor a Hub repo id "
            "of the form 'org/name'. Run `clt-hub list` for known names"
        )
    patterns = [f"{subfolder}/*", f"{subfolder}/**"] if subfolder else None
    if not local_files_only and not force_download:
        local_files_only = offline_if_unreachable(name, "transcoder", cache_dir, patterns)
    local = _snapshot(name, revision, cache_dir, local_files_only, force_download, token, patterns)
    if not subfolder:
        return Path(local)
    return _gathered(Path(local), subfolder) if glob.has_magic(subfolder) else Path(local) / subfolder


def cache_root() -> Path:
    """$CLT_HUB_CACHE, else ~/.cache/clt_hub: clt_hub's own cache (converted models, gathered sets)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clt_hub").expanduser()


def _gathered(snapshot: Path, pattern: str) -> Path:
    """A folder of links to the snapshot folders a glob subfolder matches (e.g. the 18 layer folders of one
    Gemma Scope 2 set): the snapshot itself may hold other sets downloaded before."""
    matched = sorted(p for p in snapshot.glob(pattern) if p.is_dir())
    if not matched:
        raise HubError(f"{snapshot.name}: nothing matches {pattern!r}; the registry entry does not fit the repo")
    key = hashlib.sha256(f"{snapshot.resolve()}|{pattern}".encode()).hexdigest()[:16]
    folder = cache_root() / "sets" / key
    if not folder.is_dir():
        tmp = folder.with_name(f".{key}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for p in matched:
            (tmp / p.name).symlink_to(p.resolve(), target_is_directory=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process gathered it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def folder_size(path: Path) -> int:
    """Bytes of all files below `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n: float) -> str:
    """Bytes as a short human-readable size (1.5 MB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def parameter_count(cfg: Any) -> int:
    """Parameters of a transcoder with config `cfg` (CLT: layer l decodes to the L - l layers from l on)."""
    L, d, F = cfg.n_layers, cfg.d_model, cfg.d_sae
    dec_blocks = L * (L + 1) // 2 if cfg.kind == "clt" else L
    n = L * (F * d + F + d) + dec_blocks * F * d
    n += L * F if cfg.activation == "jumprelu" else 0
    n += L * d * d if cfg.skip else 0
    return n


def describe(path: Path) -> dict[str, Any]:
    """Facts about a transcoder folder, read from its config only (no weights): what `clt-hub info`
    prints and the Space's info tab shows."""
    layout = detect(path)
    cfg = read(path, lazy=layout == "circuit-tracer-clt").cfg
    return {
        "path": str(path), "layout": layout, "kind": cfg.kind, "model": cfg.model_name or "?",
        "layers": cfg.n_layers, "d_model": cfg.d_model, "features_per_layer": cfg.d_sae,
        "features_total": cfg.n_layers * cfg.d_sae, "activation": cfg.activation, "skip": cfg.skip,
        "dtype": cfg.dtype, "input_hook": cfg.feature_input_hook, "output_hook": cfg.feature_output_hook,
        "hf_input_hook": cfg.hf_hook_name, "hf_output_hook": cfg.hf_hook_name_out,
        "parameters": parameter_count(cfg), "size_on_disk": folder_size(path), "metrics": cfg.metrics,
    }


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    folder = Path(folder)
    loaded = read(folder)  # refuse to publish something we cannot load back
    layout = "native" if (folder / "cfg.json").exists() else detect(folder)
    card = folder / "README.md"
    if not card.exists() or "Written by clt_hub" in card.read_text():
        write_model_card(loaded.cfg, folder, layout=layout, repo_id=repo_id)  # snippets name the repo
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {loaded.cfg.kind} transcoder with clt_hub",
        )
    except HfHubHTTPError as exc:
        raise HubError(f"publishing to {repo_id} on {_endpoint()} failed: {exc}. Check that you are logged "
                       "in (`hf auth login`) with write access") from None
    except OSError as exc:
        raise HubError(f"publishing to {repo_id} failed: cannot reach {_endpoint()} ({exc})") from None
    return str(getattr(info, "commit_url", info))


__all__ = ["describe", "folder_size", "human_size", "parameter_count", "push_folder", "resolve"]


