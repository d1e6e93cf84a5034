"""What this Space may load and do: its limits (from $CLT_SPACE_* variables) and the model + transcoder
pairs a user can pick, checked before anything is loaded."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from clt_hub.errors import ConfigError

ORGANISM = "organism (bundled)"
REAL = "gemma-3-270m + the CLT trained here (nox -s train_real)"
# where `python3 -m nox -s train_real` (recipes/gemma-3-270m-clt.yaml) writes the real-model CLT
REAL_CLT_DIR = Path(__file__).resolve().parents[1] / "real_out" / "gemma-3-270m-clt" / "transcoder"
REAL_MODEL = "gemma-3-270m"
CUSTOM = "other: Hub repo id or folder"
ENV_PREFIX = "CLT_SPACE_"
CASES = {"two_hop": "two-hop factual recall", "addition": "addition (ones digit)", "rhyme": "rhyme planning"}
ORGANISM_PROMPTS = ["fact : the capital of the state containing Dallas is", "calc : 3 6 + 5 9 =",
                    "poem : he saw a carrot and a habit \n", "fact : the bird of the state containing Tampa is"]


@dataclass(frozen=True)
class Limits:
    """Bounds for a public Space. Each field is read from $CLT_SPACE_<FIELD> (e.g. CLT_SPACE_LOCAL_MODE=1).

    A traced graph costs memory for as long as a user may come back to it (the dense adjacency and edge mask
    grow with the square of its nodes: 10 to 15 MB for an organism prompt). `max_sessions` and
    `max_session_memory_mb` bound what all users' graphs hold together, whatever gradio's state time to
    live (`session_ttl_s`) does: gradio keeps a closed tab's state an hour whatever the TTL, and nothing
    bounds how many tabs there are. See `space.state.SessionRegistry`. Apart from the graphs, gradio keeps
    every browser session's page as last sent (the two graph SVGs, the pickers' choices: about 1 MB once a
    graph is drawn) and never expires it, only forgets the least recently active sessions beyond its
    capacity (10 000 by default: gigabytes); `max_browser_sessions` is that capacity here. A user gradio
    forgot is asked to trace again. gradio also keeps every input's last value per browser session, before
    any check here sees it, so `max_request_kb` caps each request's body (space.request_limit). A page's
    requests are far smaller: a 2,000-character prompt is at most 24 KiB of JSON (12 bytes a character,
    escaped), a list of all 4096 feature ids 60 KiB."""

    max_prompt_tokens: int = 64       # longer prompts are refused before any work
    max_prompt_chars: int = 2000      # ... and, before they are even tokenised, prompts longer than this
    max_name_chars: int = 200         # model, transcoder and supernode names a user types
    max_feature_nodes: int = 4096     # upper bound of the feature-node budget a user may ask for
    max_new_tokens: int = 32          # generated continuation length in the Intervene tab
    max_case_variants: int = 6        # prompt variants per case study run
    max_context_texts: int = 200      # texts searched for each kept feature's top activating contexts
    max_edges_drawn: int = 600        # strongest edges drawn in the graph view (all are in the JSON)
    concurrency: int = 1              # requests computing at once (queue concurrency limit)
    max_queue: int = 32               # requests waiting in the queue before new ones are turned away
    cache_size: int = 2               # (model, transcoder) pairs kept loaded
    allow_hub: bool = True            # load Hub repos a user names (registry entries are always offered)
    local_mode: bool = False          # read folders on this machine that a user names (off on a public Space)
    offline: bool = False             # never reach the Hub: only the local Hub cache and folders
    context_texts: str = ""           # operator's text source (file/folder/dataset) for non-organism contexts
    threads: int = 0                  # torch CPU threads (0: torch's choice; 1 is fastest for small models on busy CPUs)
    max_sessions: int = 24            # traced graphs kept across all users; the least recently used go first
    max_session_memory_mb: int = 512  # ... and their approximate memory in all (MB); the newest graph is always kept
    session_ttl_s: int = 1800         # a user's graph is forgotten this long after its last change (gr.State)
    max_browser_sessions: int = 100   # browser sessions whose page gradio keeps (launch's state_session_capacity)
    max_request_kb: int = 256         # HTTP request bodies over this are refused before gradio reads them (KiB)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name, "").strip()
            if not raw:
                continue
            default = f.default
            if isinstance(default, bool):
                if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ConfigError(f"${name}={raw!r}: write 1 or 0")
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                least = 0 if f.name == "threads" else 1  # threads 0: torch's own choice
                if not raw.isdigit() or int(raw) < least:
                    raise ConfigError(f"${name}={raw!r}: write a whole number of at least {least}")
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        return cls(**values)


@dataclass(frozen=True)
class Source:
    """A model + transcoder pair that passed the limits, as the loaders take it."""

    model: str
    transcoder: str
    organism: bool = False
    local_files_only: bool = False

    @property
    def name(self) -> str:
        return "organism" if self.organism else f"{self.model} + {self.transcoder}"


def _organism_dirs() -> tuple[Path, Path]:
    try:
        from paper_cases.organism import CLT_DIR, MODEL_DIR
    except ImportError:
        raise ConfigError("the bundled organism lives in the repository's paper_cases/ folder; run the app "
                          "from the clt_hub repository root") from None
    return MODEL_DIR, CLT_DIR


def pairs(limits: Limits) -> list[str]:
    """What the model + transcoder picker offers: the organism, the registry, and a free choice when allowed."""
    from clt_hub.artifacts.registry import entries

    known = [name for name, e in entries().items() if e.model]
    real = [REAL] if (REAL_CLT_DIR / "config.yaml").is_file() else []  # offered once it has been trained
    return [ORGANISM, *real, *known] + ([CUSTOM] if limits.allow_hub or limits.local_mode else [])


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "~", ".")) or "\\" in text or text.count("/") > 1
            or Path(text).expanduser().exists())


def capped(text: str | None, what: str, limit: int, env: str) -> str:
    """A user's text, refused before any work (tokenising, looking up, drawing) when longer than `limit`: one
    request must not make the server hold or repeat megabytes."""
    text = text or ""
    if len(text) > limit:
        raise ConfigError(f"the {what} is {len(text):,} characters long; this Space takes at most {limit:,} "
                          f"(${ENV_PREFIX}{env}). Shorten it")
    return text


def _user_source(text: str, what: str, limits: Limits) -> str:
    """A model or transcoder a user typed, if this Space may load it."""
    from clt_hub.artifacts.registry import lookup

    text = capped(text, f"{what} name", limits.max_name_chars, "MAX_NAME_CHARS").strip()
    if not text:
        where = "a Hub repo id (org/name)" + (" or a folder on this machine" if limits.local_mode else "")
        raise ConfigError(f"give a {what}: {where}")
    if what == "transcoder" and lookup(text) is not None:
        return text
    if _looks_like_path(text):
        if not limits.local_mode:
            raise ConfigError(f"{text!r} is a path on the server; this Space reads no folders users name unless "
                              "local mode is on ($CLT_SPACE_LOCAL_MODE=1, for running the app on your own machine)")
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{what} folder {path} does not exist")
        return str(path)
    if not limits.allow_hub:
        raise ConfigError(f"loading Hub repos by name ({text!r}) is switched off on this Space "
                          "($CLT_SPACE_ALLOW_HUB=0); pick the bundled organism or a listed transcoder")
    return text


def source_for(pick: str, model: str, transcoder: str, limits: Limits) -> Source:
    """The pair the picker names; `model`/`transcoder` are the free-text boxes (used with CUSTOM only)."""
    from clt_hub.artifacts.registry import lookup

    if pick == ORGANISM:
        model_dir, clt_dir = _organism_dirs()
        return Source(str(model_dir), str(clt_dir), organism=True, local_files_only=True)
    if pick == REAL and REAL in pairs(limits):
        return Source(REAL_MODEL, str(REAL_CLT_DIR), local_files_only=True)
    if pick == CUSTOM:
        if not (limits.allow_hub or limits.local_mode):
            raise ConfigError("this Space loads only the bundled organism and the listed transcoders")
        return Source(_user_source(model, "model", limits), _user_source(transcoder, "transcoder", limits),
                      local_files_only=limits.offline)
    entry = lookup(pick)
    if entry is None or not entry.model:
        raise ConfigError(f"unknown choice {pick!r}; pick one of: {', '.join(pairs(limits))}")
    return Source(entry.model, pick, local_files_only=limits.offline)


