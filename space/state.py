"""What the Gradio Space (app.py) does, as plain functions: load a model + transcoder within the
limits of a public Space, trace, describe a node, group supernodes, intervene, rerun the paper's case
studies and describe the transcoder.

No gradio import here: the tests call these directly, and app.py only lays out the page, passes a
progress callback and turns the `CltHubError`s raised here into messages for the user. Models and
transcoders are cached across requests (`Space.load`), and work on one model is serialised, because
interventions and attribution put hooks on the shared model.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch

from clt_hub.attribution.graph import Graph
from clt_hub.attribution.graph_json import NodeRecord
from clt_hub.attribution.options import DEFAULT_OPTIONS, TraceOptions
from clt_hub.attribution.trace import TraceResult
from clt_hub.errors import CltHubError, ConfigError
from clt_hub.models.loading import encode_prompt
from clt_hub.transcoders.transcoder import Transcoder
from space import details, grouping, intervening
from space.config import CASES, Limits, Source, capped
from space.graph_view import graph_html
from space.text import front_matter, md, short, shown, without_server_paths
from space.views import CaseOutcome, InfoOutcome, InterventionOutcome, NodeDetails

Progress = Callable[[float, str], None]
# QK tracing on every Space graph: the (layer, head, query, key) carrying the most cross-position influence, each
# shown in its node's details (docs/qk_attribution.md); options.qk where the caller sets it (the page does not)
SPACE_QK = 3


def qk_default(model: Any, transcoder: Transcoder) -> int:
    """SPACE_QK where QK attribution supports the pair, else 0: a pair it refuses (a transcoder of another output
    point) still traces, without QK, and a mismatched pair gets attribution's own message."""
    from clt_hub.attribution.qk import check_supported

    try:
        check_supported(model, transcoder)
    except ConfigError:
        return 0
    return SPACE_QK


def _quiet(fraction: float, message: str) -> None:
    """The progress callback when nobody watches."""


class SessionDropped(CltHubError):
    """A user acted on a graph this Space dropped to make room for newer ones (see SessionRegistry)."""


@dataclass(eq=False)  # compared and hashed by identity: the registry tells sessions apart, never by content
class Session:
    """One user's traced graph and supernodes (kept in gr.State between requests).

    The graph itself (`result`, `records`, `index`) can be dropped by the Space while the user's gr.State
    still holds this object (`SessionRegistry`): reading any of them then raises `SessionDropped`, whose
    message app.py shows, so a handler given a dropped session stops with words instead of crashing."""

    source: Source
    _result: TraceResult | None
    _records: list[NodeRecord] | None   # every node of the graph in node order (graph_json.node_records)
    _index: dict[str, int] | None           # node id -> node index
    supernodes: list[list[str]] = field(default_factory=list)  # [[name, node_id, ...]] as in qParams
    nbytes: int = 0                          # approximate memory of the graph (approx_bytes), set on registering
    dropped: str = ""                        # why the graph was dropped (the message users get); "" while kept
    key: int = 0                             # the registry's key; 0 until registered

    @property
    def result(self) -> TraceResult:
        if self._result is None:
            raise SessionDropped(self.dropped or "this graph is gone; trace again")
        return self._result

    @property
    def records(self) -> list[NodeRecord]:
        if self._records is None:
            raise SessionDropped(self.dropped or "this graph is gone; trace again")
        return self._records

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            raise SessionDropped(self.dropped or "this graph is gone; trace again")
        return self._index

    @property
    def alive(self) -> bool:
        return self._result is not None

    def release(self, why: str) -> None:
        """Let go of the graph (its tensors are freed once no request still computes on them)."""
        self.dropped = why
        self._result = self._records = self._index = None

    def kept(self) -> list[int]:
        return self.result.pruned.node_mask.nonzero().squeeze(-1).tolist()

    def kept_features(self) -> list[str]:
        """Kept feature node ids, most influential first."""
        g, p = self.result.graph, self.result.pruned
        order = sorted((i for i in self.kept() if i < g.n_features), key=lambda i: float(p.cumulative[i]))
        return [self.records[i]["node_id"] for i in order]

    def describe(self, i: int) -> str:
        """Short name plus label: what hover text and tables show for node i."""
        label = self.records[i].get("clerp") or ""
        return f"{self.result.node_name(i)} {label}".strip()


def approx_bytes(*objs: Any) -> int:
    """About how much memory the objects hold: each tensor storage once (views share theirs), plus the
    Python containers, strings and numbers reachable through dicts, lists, tuples and dataclasses
    (sys.getsizeof). Walks the objects once: about 0.05 s for an organism graph, small beside the trace.
    What it leaves out (allocator overhead, the request's transient memory) is why RSS grows somewhat more
    than the sum: 11.6 MiB per organism graph against 10.4 MiB counted (docs/benchmarks.md)."""
    seen: set[int] = set()
    storages: set[tuple[int, int]] = set()
    total = 0
    stack = list(objs)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in storages:
                storages.add(key)
                total += storage.nbytes()
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif (dataclasses.is_dataclass(obj) and not isinstance(obj, type)) or isinstance(obj, Graph):
            stack.extend(vars(obj).values())
    return total


def _give_memory_back() -> None:
    """Return freed heap pages to the system (glibc's malloc_trim; nothing elsewhere).

    A dropped graph's big tensors are freed, but glibc keeps freed heap memory for reuse, and after the
    first large free it serves allocations of that size from the heap instead of fresh mappings. So
    without a trim the process's RSS stays well above what the kept graphs hold (100 traces keeping 6
    organism graphs: +150 to +230 MiB, against +80 MiB with it; a few milliseconds per call)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class SessionRegistry:
    """The sessions (traced graphs) all users of this Space hold, in least recently used order, with
    their approximate memory, under two caps: at most `limits.max_sessions` graphs and
    `limits.max_session_memory_mb` MB in all.

    Why a registry: a graph lives in its user's gr.State, which gradio keeps `session_ttl_s` after its
    last change (and an hour after a tab closes, whatever that TTL), and nothing bounds the number of
    tabs. So without a cap memory grows with the number of visitors (about 15 MB each on the organism:
    2 GB after 100; docs/benchmarks.md, "Space memory under many sessions").

    - `add` registers a new graph, first dropping the least recently used ones until the new one fits
      both caps. The newest is always kept, even when it alone is over the memory cap: a user who just
      waited for a trace gets it (max_feature_nodes and max_prompt_tokens bound its size).
    - Dropping releases the graph in place (`Session.release`): the user's gr.State keeps a small shell
      whose `result` raises `SessionDropped` with the message below, so their next click, grouping,
      intervention or download says what happened and to trace again. Releasing references rather than
      shrinking tensors in place means a request computing on that graph at the same moment finishes
      with the tensors it already holds (they are freed when it returns), instead of crashing.
    - `use` marks a graph as just used (every handler given a session calls it through Space.use).
    - `forget` removes a graph gradio let go of (gr.State's delete_callback when its TTL expires).
    - Entries are weak references: a graph its user replaced by tracing again (gradio calls no callback
      then) or that gradio evicted is freed at once and leaves the registry on the next `add` or `total`.

    Handlers run concurrently (gradio's worker threads, and the delete callback on its event loop), so
    every method holds `lock`; none of them computes under it beyond dict operations."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self._entries: OrderedDict[int, tuple[weakref.ReferenceType[Session], int]] = OrderedDict()
        self._keys = itertools.count(1)
        self.dropped_count = 0

    @property
    def max_bytes(self) -> int:
        return self.limits.max_session_memory_mb * 1024 * 1024

    def message(self) -> str:
        lim = self.limits
        return (f"this graph was dropped to make room for newer sessions on this Space (it keeps at most "
                f"{lim.max_sessions} graphs and {lim.max_session_memory_mb} MB, the least recently used go "
                "first: $CLT_SPACE_MAX_SESSIONS, $CLT_SPACE_MAX_SESSION_MEMORY_MB); trace again")

    def _prune(self) -> None:
        for key in [k for k, (ref, _) in self._entries.items() if ref() is None]:
            del self._entries[key]

    def add(self, session: Session) -> list[Session]:
        """Register `session` (its `nbytes` set), dropping least recently used graphs until it fits;
        returns the sessions dropped."""
        dropped: list[Session] = []
        with self.lock:
            self._prune()
            total = sum(n for _, n in self._entries.values())
            while self._entries and (len(self._entries) + 1 > self.limits.max_sessions
                                     or total + session.nbytes > self.max_bytes):
                _, (ref, n) = self._entries.popitem(last=False)
                total -= n
                old = ref()
                if old is not None:
                    old.release(self.message())
                    dropped.append(old)
            session.key = next(self._keys)
            self._entries[session.key] = (weakref.ref(session), session.nbytes)
            self.dropped_count += len(dropped)
        return dropped

    def use(self, session: Session) -> None:
        """Mark `session` as just used; raise SessionDropped if its graph was dropped."""
        with self.lock:
            if not session.alive:
                raise SessionDropped(session.dropped or self.message())
            if session.key in self._entries:
                self._entries.move_to_end(session.key)

    def forget(self, session: Any) -> None:
        """gradio let go of this state value (gr.State delete_callback): unregister and release it."""
        if not isinstance(session, Session):
            return
        with self.lock:
            self._entries.pop(session.key, None)
            if session.alive:
                session.release("this graph expired; trace again")

    def __len__(self) -> int:
        with self.lock:
            self._prune()
            return len(self._entries)

    def total(self) -> int:
        """Approximate bytes the kept graphs hold."""
        with self.lock:
            self._prune()
            return sum(n for _, n in self._entries.values())

    def kept(self) -> list[Session]:
        """The kept sessions, least recently used first."""
        with self.lock:
            return [s for ref, _ in self._entries.values() if (s := ref()) is not None]


@dataclass
class LoadedPair:
    source: Source
    model: Any
    tokenizer: Any
    transcoder: Transcoder
    transcoder_path: Path
    lock: threading.RLock = field(default_factory=threading.RLock)


def new_folder(scratch: Path, kind: str) -> Path:
    """A fresh folder under `scratch` for files users download; folders older than two hours are removed."""
    scratch.mkdir(parents=True, exist_ok=True)
    for old in scratch.iterdir():
        try:
            if time.time() - old.stat().st_mtime > 7200:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch))


FOLDERS_KEPT = 64  # resolved transcoder folders remembered (names users type are unbounded)


class Space:
    """The app's state that outlives requests: limits, the loaded-model cache and a scratch folder."""

    def __init__(self, limits: Limits | None = None, scratch: Path | None = None) -> None:
        self.limits = limits or Limits.from_env()
        self._cache: OrderedDict[Source, LoadedPair] = OrderedDict()
        self._cache_lock = threading.RLock()
        self._folders: OrderedDict[Source, Path] = OrderedDict()  # the last FOLDERS_KEPT sources' folders
        self._texts: dict[Source, list[str]] = {}
        self.scratch = scratch or Path(tempfile.gettempdir()) / "clt_space"
        self.sessions = SessionRegistry(self.limits)

    # -- sessions ------------------------------------------------------------------------------------
    def use(self, session: Session) -> Session:
        """The session, marked as just used; SessionDropped (a message for the user) if its graph was dropped.
        Every handler given a session calls this first (Space methods here, app.py's handlers)."""
        self.sessions.use(session)
        return session

    def forget(self, session: Any) -> None:
        """gr.State's delete_callback: gradio expired a user's state, so its graph is let go of."""
        self.sessions.forget(session)

    # what details.py and grouping.py do with a session, each checked and marked used first
    def node_details(self, session: Session, node_id: str, k: int = 8) -> NodeDetails:
        """`node_id` comes from the page's click script (gr.EventData), which a visitor can send as anything."""
        node_id = details.checked_node_id(node_id, self.limits.max_name_chars)
        return details.node_details(self.use(session), node_id, self.load, self.limits, k, self.context_texts)

    def node_choices(self, session: Session) -> list[tuple[str, str]]:
        return details.node_choices(self.use(session))

    def add_supernode(self, session: Session, name: str, node_ids: Sequence[str]) -> None:
        name = capped(name, "supernode name", self.limits.max_name_chars, "MAX_NAME_CHARS")
        grouping.add_supernode(self.use(session), name, node_ids)

    def accept_suggestion(self, session: Session) -> None:
        grouping.accept_suggestion(self.use(session))

    def remove_supernode(self, session: Session, name: str) -> None:
        grouping.remove_supernode(self.use(session), name)

    def supernode_rows(self, session: Session) -> list[list[Any]]:
        return grouping.supernode_rows(self.use(session))

    # -- loading -------------------------------------------------------------------------------
    def load(self, source: Source, report: Progress = _quiet) -> LoadedPair:
        """The loaded pair, from the cache when it is there (least recently used pairs are dropped)."""
        with self._cache_lock:
            if source in self._cache:
                self._cache.move_to_end(source)
                return self._cache[source]
            loaded = self._load(source, report)
            self._cache[source] = loaded
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
            return loaded

    def is_loaded(self, source: Source) -> bool:
        return source in self._cache

    def transcoder_folder(self, source: Source) -> Path:
        """The one place a transcoder name (registry entry, Hub repo id or folder) becomes a local folder, kept
        per source: loading and the transcoder's facts use the same folder, and a Hub repo is looked up once."""
        from clt_hub.artifacts.hub import resolve

        with self._cache_lock:
            if source not in self._folders:
                self._folders[source] = resolve(source.transcoder, local_files_only=source.local_files_only)
                while len(self._folders) > FOLDERS_KEPT:
                    self._folders.popitem(last=False)
            self._folders.move_to_end(source)
            return self._folders[source]

    def _load(self, source: Source, report: Progress) -> LoadedPair:
        from clt_hub.models.loading import load

        report(0.02, f"loading {source.name}")
        path = self.transcoder_folder(source)
        model, tokenizer, transcoder = load(source.model, str(path), local_files_only=source.local_files_only)
        return LoadedPair(source, model, tokenizer, transcoder, path)

    def context_texts(self, loaded: LoadedPair) -> list[str] | None:
        """Texts to find top activating contexts in: the organism's corpus, or the operator's source."""
        source = loaded.source
        if source not in self._texts:
            n = self.limits.max_context_texts
            if source.organism:
                from paper_cases.corpus import build

                unique = list(dict.fromkeys(build().train))  # the training mix: facts, sums, couplets, filler
                self._texts[source] = unique[:n]
            elif self.limits.context_texts:
                from clt_hub.texts import iter_texts

                self._texts[source] = list(islice(iter_texts(self.limits.context_texts), n))
            else:
                return None
        return self._texts[source]

    # -- trace -----------------------------------------------------------------------------------
    def trace(self, prompt: str, source: Source, options: TraceOptions = DEFAULT_OPTIONS, *, contexts: bool = True,
              report: Progress = _quiet) -> Session:
        """`options` as the page's fields set them (checked when made, by the rules `clt-hub trace` uses); the
        feature budget is this Space's at most, all of it when the options leave it open; QK tracing explains
        `options.qk` scores, `qk_default`'s where the options leave it at 0."""
        from clt_hub.attribution.graph_json import node_records
        from clt_hub.attribution.trace import trace

        lim = self.limits
        prompt = capped(prompt, "prompt", lim.max_prompt_chars, "MAX_PROMPT_CHARS")
        if not prompt.strip():
            raise ConfigError("the prompt is empty; type some text to trace")
        budget = options.max_feature_nodes or lim.max_feature_nodes
        if budget > lim.max_feature_nodes:
            raise ConfigError(f"max feature nodes must be between 1 and {lim.max_feature_nodes} on this Space "
                              f"($CLT_SPACE_MAX_FEATURE_NODES), not {budget}")
        options = dataclasses.replace(options, max_feature_nodes=budget, slug="clt-hub-space",
                                      max_context_texts=lim.max_context_texts)
        loaded = self.load(source, report)
        options = dataclasses.replace(options, qk=options.qk or qk_default(loaded.model, loaded.transcoder))
        n_tokens = len(encode_prompt(loaded.tokenizer, prompt))
        if n_tokens > lim.max_prompt_tokens:
            raise ConfigError(f"the prompt is {n_tokens} tokens long; this Space traces at most "
                              f"{lim.max_prompt_tokens} ($CLT_SPACE_MAX_PROMPT_TOKENS). Shorten it")
        texts = self.context_texts(loaded) if contexts else None
        report(0.5, "attributing")
        with loaded.lock:
            result = trace(prompt, loaded.model, loaded.tokenizer, loaded.transcoder, options, context_texts=texts,
                           transcoder_name=source.transcoder if not source.organism else "organism-clt", progress=True)
        labels = {n["node_id"]: n["clerp"] for n in result.json["nodes"]}
        records = node_records(result.graph, result.tokens + result.logit_texts, labels, result.pruned.cumulative)
        report(1.0, "drawing")
        session = Session(source, result, records, {r["node_id"]: i for i, r in enumerate(records)})
        session.nbytes = approx_bytes(result, records, session.index)
        # Only `session` may lead to the graph from here: a first-time import during this call (torch.fx's
        # wrap keeps its own frame) can keep this frame alive until the next full gc, and with it its locals.
        del result, records, labels
        if self.sessions.add(session):
            _give_memory_back()
        return session

    def summary_markdown(self, session: Session) -> str:
        """Scores and top logits, shown beside the graph."""
        self.use(session)
        r = session.result
        g, p = r.graph, r.pruned
        kept_f = int(p.node_mask[: g.n_features].sum())
        lines = [f"**Replacement score** {r.scores.replacement:.3f} · **completeness** {r.scores.completeness:.3f}", "",
                 f"{len(r.tokens)} tokens · {g.n_features} active features, {kept_f} kept · "
                 f"{int(p.edges.sum())} edges kept", "", "| top logit | p |", "|---|---:|"]
        lines += [f"| {md(repr(t))} | {q:.3f} |" for t, q in zip(r.logit_texts, g.logit_probabilities.tolist(),
                                                                    strict=True)]
        return "\n".join(lines)

    def downloads(self, session: Session, report: Progress = _quiet) -> tuple[str, str | None]:
        """graph.json (Neuronpedia frontend format, with the current supernodes) and graph.png."""
        self.use(session)
        from clt_hub.attribution.graph_json import save
        from clt_hub.attribution.graph_png import plot_graph

        r = session.result
        folder = new_folder(self.scratch, "graph")
        data = {**r.json, "qParams": {**r.json["qParams"], "supernodes": [list(s) for s in session.supernodes]}}
        json_path = save(data, folder / "graph.json")
        report(0.5, "drawing the PNG")
        groups = {s[0]: [session.index[n] for n in s[1:]] for s in session.supernodes}
        png = plot_graph(r.graph, r.pruned, r.tokens, folder / "graph.png", supernodes=groups,
                         title=short(r.prompt.replace("\n", " \\n "), 90), logit_texts=r.logit_texts)
        return str(json_path), None if png is None else str(png)

    def graph_html(self, session: Session, collapsed: bool = False) -> str:
        """The pruned graph as SVG (see space.graph_view); `collapsed` draws each supernode as one node."""
        self.use(session)
        return graph_html(session, collapsed, self.limits.max_edges_drawn)

    # -- interventions ---------------------------------------------------------------------------------
    def intervene(self, session: Session, features: Sequence[str] = (), supernodes: Sequence[str] = (), *,
                  how: Literal["multiply", "set"] = "multiply", amount: float = 0.0,
                  mode: Literal["constrained", "open"] = "constrained", new_tokens: int | None = None, top: int = 8,
                  report: Progress = _quiet) -> InterventionOutcome:
        """Set or scale the picked features (each at its own position) and supernodes' members."""
        self.use(session)
        from clt_hub.attribution.interventions import generate, intervene

        value = intervening.amount_of(how, amount)
        new_tokens = intervening.continuation_length(new_tokens, self.limits.max_new_tokens)
        ivs = intervening.requested(session, features, supernodes, how, value)
        loaded = self.load(session.source, report)
        intervening.check_fits(value, loaded.transcoder)
        ids = encode_prompt(loaded.tokenizer, session.result.prompt)
        report(0.2, "intervening")
        with loaded.lock:
            res = intervene(loaded.model, loaded.transcoder, ids, ivs, mode=mode)
            report(0.4, "generating the original continuation")
            plain = generate(loaded.model, loaded.transcoder, ids, [], max_new_tokens=new_tokens)
            report(0.7, "generating with the interventions held on")
            steered = generate(loaded.model, loaded.transcoder, ids, ivs, max_new_tokens=new_tokens)
        return intervening.outcome(loaded.tokenizer, session.result.prompt, ids, mode, len(ivs), res, plain, steered,
                                   top)

    # -- case studies ------------------------------------------------------------------------------------
    def run_case(self, source: Source, case: str, n: int = 2, report: Progress = _quiet) -> CaseOutcome:
        """One of the paper's checks live (paper_cases), on the organism or the picked model."""
        if case not in CASES:
            raise ConfigError(f"unknown case {case!r}; pick one of {', '.join(CASES)}")
        if not 1 <= int(n) <= self.limits.max_case_variants:
            raise ConfigError(f"run 1 to {self.limits.max_case_variants} prompt variants "
                              f"($CLT_SPACE_MAX_CASE_VARIANTS), not {n}")
        try:
            from paper_cases.__main__ import run_case
            from paper_cases.common import subject_for
        except ImportError:
            raise ConfigError("the case studies live in the repository's paper_cases/ folder; run the app from "
                              "the clt_hub repository root") from None
        loaded = self.load(source, report)
        subject = subject_for(loaded.model, loaded.tokenizer, loaded.transcoder,
                              None if source.organism else source.name)
        report(0.3, f"running {CASES[case]}")
        folder = new_folder(self.scratch, case)
        with loaded.lock:
            try:
                result = run_case(case, subject, source.organism, None, int(n), folder)
            except CltHubError:
                raise
            except (ValueError, KeyError, IndexError) as exc:
                raise ConfigError(f"the {CASES[case]} check cannot run on {source.name}: {exc}") from None
        columns = list(result.columns)
        rows = [[shown(str(row.get(c, ""))) for c in columns] for row in result.rows]

        def mean(v: list[float]) -> float | None:
            return sum(v) / len(v) if v else None

        return CaseOutcome(case, result.verdict, result.passed, result.tried, result.control_passed, columns, rows,
                           [f for f in result.files if Path(f).exists()], mean(result.replacement),
                           mean(result.completeness))

    # -- transcoder info -----------------------------------------------------------------------------------
    def info(self, source: Source) -> InfoOutcome:
        """Facts from the transcoder's config and model card (no weights loaded); model facts once loaded."""
        from clt_hub.artifacts.hub import describe

        path = self.transcoder_folder(source)
        card_file = path / "README.md"
        front, body = front_matter(card_file.read_text()) if card_file.exists() else ("", "(no model card)")
        loaded = self._cache.get(source)
        return InfoOutcome(describe(path), front, body, model_facts(source, loaded.model if loaded else None))


def model_facts(source: Source, model: Any | None) -> dict[str, Any]:
    """What the info tab says of the model: its name, and its shape once it is loaded (None: not loaded)."""
    facts: dict[str, Any] = {"source": source.model}
    if model is not None:
        cfg = model.config
        facts.update({"type": cfg.model_type, "layers": getattr(cfg, "num_hidden_layers", "?"),
                      "d_model": getattr(cfg, "hidden_size", "?"), "vocab": getattr(cfg, "vocab_size", "?")})
    return facts


def user_message(exc: BaseException) -> str | None:
    """The message to show for an exception a user can cause; None for bugs (logged, shown generically)."""
    if isinstance(exc, CltHubError):
        return without_server_paths(str(exc))
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "out of memory: trace a shorter prompt or fewer feature nodes"
    return None
