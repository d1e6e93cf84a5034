"""What the Gradio Space (app.py) does, as plain functions: load a model + transcoder within the
limits of a public Space, trace, draw the graph, describe a node, group supernodes, intervene, rerun
the paper's case studies and describe the transcoder.

No gradio import here: the tests call these directly, and app.py only lays out the page, passes a
progress callback and turns the `CltHubError`s raised here into messages for the user. Models and
transcoders are cached across requests (`Space.load`), and work on one model is serialised, because
interventions and attribution put hooks on the shared model.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch

from clt_hub.attribution.trace import TraceResult
from clt_hub.errors import CltHubError, ConfigError
from clt_hub.transcoders.transcoder import Transcoder

Progress = Callable[[float, str], None]
ORGANISM = "organism (bundled)"
CUSTOM = "other: Hub repo id or folder"
ENV_PREFIX = "CLT_SPACE_"
CASES = {"two_hop": "two-hop factual recall", "addition": "addition (ones digit)", "rhyme": "rhyme planning"}
ORGANISM_PROMPTS = ["fact : the capital of the state containing Dallas is", "calc : 3 6 + 5 9 =",
                    "poem : he saw a carrot and a habit \n", "fact : the bird of the state containing Tampa is"]


def _quiet(fraction: float, message: str) -> None:
    """The progress callback when nobody watches."""


@dataclass(frozen=True)
class Limits:
    """Bounds for a public Space. Each field is read from $CLT_SPACE_<FIELD> (e.g. CLT_SPACE_LOCAL_MODE=1)."""

    max_prompt_tokens: int = 64       # longer prompts are refused before any work
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
                if not raw.isdigit() or int(raw) < 1:
                    raise ConfigError(f"${name}={raw!r}: write a whole number of at least 1")
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


@dataclass
class Loaded:
    source: Source
    model: Any
    tokenizer: Any
    transcoder: Transcoder
    transcoder_path: Path
    lock: threading.RLock = field(default_factory=threading.RLock)


@dataclass
class Session:
    """One user's traced graph and supernodes (kept in gr.State between requests)."""

    source: Source
    result: TraceResult
    records: list[dict[str, Any]]          # every node of the graph in node order (graph_json.node_records)
    index: dict[str, int]                  # node id -> node index
    supernodes: list[list[str]] = field(default_factory=list)  # [[name, node_id, ...]] as in qParams

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


def _organism_dirs() -> tuple[Path, Path]:
    try:
        from paper_cases.organism import CLT_DIR, MODEL_DIR
    except ImportError:
        raise ConfigError("the bundled organism lives in the repository's paper_cases/ folder; run the app "
                          "from the clt_hub repository root") from None
    return MODEL_DIR, CLT_DIR


def pairs(limits: Limits) -> list[str]:
    """What the model + transcoder picker offers: the organism, the registry, and a free choice when allowed."""
    from clt_hub.loading.registry import entries

    known = [name for name, e in entries().items() if e.model]
    return [ORGANISM, *known] + ([CUSTOM] if limits.allow_hub or limits.local_mode else [])


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "~", ".")) or "\\" in text or text.count("/") > 1
            or Path(text).expanduser().exists())


def _user_source(text: str, what: str, limits: Limits) -> str:
    """A model or transcoder a user typed, if this Space may load it."""
    from clt_hub.loading.registry import lookup

    text = (text or "").strip()
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
    from clt_hub.loading.registry import lookup

    if pick == ORGANISM:
        model_dir, clt_dir = _organism_dirs()
        return Source(str(model_dir), str(clt_dir), organism=True, local_files_only=True)
    if pick == CUSTOM:
        if not (limits.allow_hub or limits.local_mode):
            raise ConfigError("this Space loads only the bundled organism and the listed transcoders")
        return Source(_user_source(model, "model", limits), _user_source(transcoder, "transcoder", limits),
                      local_files_only=limits.offline)
    entry = lookup(pick)
    if entry is None or not entry.model:
        raise ConfigError(f"unknown choice {pick!r}; pick one of: {', '.join(pairs(limits))}")
    return Source(entry.model, pick, local_files_only=limits.offline)


def _strip_front_matter(card: str) -> tuple[str, str]:
    """(YAML front matter, Markdown body) of a model card."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end > 0:
            return card[4:end].strip(), card[end + 4:].lstrip()
    return "", card


def _text(s: object) -> str:
    """HTML-escaped text that also survives gradio's template pass (no $, {, }, backtick left)."""
    out = html.escape(str(s), quote=True)
    for ch, ent in (("$", "&#36;"), ("{", "&#123;"), ("}", "&#125;"), ("`", "&#96;")):
        out = out.replace(ch, ent)
    return out


def _md(s: object) -> str:
    """Text for gradio Markdown: no HTML, and no character that would start a table cell, emphasis or maths."""
    out = html.escape(str(s), quote=False)
    for ch in "\\`*_[]|$#":
        out = out.replace(ch, "\\" + ch)
    return out


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _shown(token: str) -> str:
    return token.replace("\n", "\\n").replace("Ġ", " ").replace("▁", " ")


@dataclass
class NodeDetails:
    """What the details panel shows for one clicked node."""

    node_id: str
    kind: Literal["feature", "error", "token", "logit", "supernode"]
    title: str
    label: str = ""
    activation: float | None = None
    influence: float | None = None
    probability: float | None = None
    promotes: list[tuple[str, float]] = field(default_factory=list)    # tokens the decoders push up (direct effect)
    suppresses: list[tuple[str, float]] = field(default_factory=list)
    contexts: list[dict[str, Any]] = field(default_factory=list)       # text, token, activation
    inputs: list[tuple[str, float]] = field(default_factory=list)      # (node, direct effect on this node)
    outputs: list[tuple[str, float]] = field(default_factory=list)     # (node, this node's direct effect on it)
    members: list[str] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {_md(self.title)}", f"`{self.node_id}`" + (f" — {_md(self.label)}" if self.label else "")]
        facts = []
        if self.activation is not None:
            facts.append(f"activation **{self.activation:.4g}**")
        if self.influence is not None:
            facts.append(f"cumulative influence {self.influence:.3f}")
        if self.probability is not None:
            facts.append(f"probability **{self.probability:.3f}**")
        if facts:
            lines.append(" · ".join(facts))
        if self.note and self.kind != "feature":
            lines.append(f"({_md(self.note)})")
        if self.members:
            lines += ["", "**Members**: " + ", ".join(f"`{m}`" for m in self.members)]
        if self.promotes:
            lines += ["", "**Top logit effects** (direct, decoder → unembedding)", "",
                      "| pushes up | effect | pushes down | effect |", "|---|---:|---|---:|"]
            for (a, x), (b, y) in zip(self.promotes, self.suppresses, strict=False):
                lines.append(f"| {_md(repr(a))} | {x:+.3f} | {_md(repr(b))} | {y:+.3f} |")
        if self.kind == "feature":
            lines += ["", "**Top activating contexts**", ""]
            if self.contexts:
                lines += ["| activation | context (… **token**) |", "|---:|---|"]
                for c in self.contexts:
                    text = _shown(str(c["text"]))
                    tok = _shown(str(c["token"]))
                    head = text[: len(text) - len(tok)] if text.endswith(tok) else text
                    lines.append(f"| {float(c['activation']):.3f} | …{_md(head)}**{_md(tok)}** |")
            else:
                lines.append(self.note or "none found")
        for title, rows in (("Strongest inputs", self.inputs), ("Strongest outputs", self.outputs)):
            if rows:
                lines += ["", f"**{title}** (direct effect)", "", "| node | weight |", "|---|---:|"]
                lines += [f"| {_md(name)} | {w:+.4g} |" for name, w in rows]
        return "\n".join(lines)


@dataclass
class InterventionOutcome:
    prompt: str
    mode: str
    n_interventions: int
    before: list[tuple[str, float]]
    after: list[tuple[str, float]]
    continuation_before: str
    continuation_after: str

    @property
    def top_changed(self) -> bool:
        return self.before[0][0] != self.after[0][0]

    def table(self) -> list[list[Any]]:
        return [[k + 1, repr(a), f"{p:.3g}", repr(b), f"{q:.3g}"]
                for k, ((a, p), (b, q)) in enumerate(zip(self.before, self.after, strict=True))]

    def markdown(self) -> str:
        change = (f"top token **{_md(repr(self.before[0][0]))} → {_md(repr(self.after[0][0]))}**"
                  if self.top_changed else f"top token unchanged ({_md(repr(self.before[0][0]))})")
        return (f"{self.n_interventions} feature interventions, {self.mode} mode: {change}\n\n"
                f"| | greedy continuation (open-loop replacement model, interventions held on) |\n|---|---|\n"
                f"| original | {_md(_shown(self.continuation_before))} |\n"
                f"| intervened | {_md(_shown(self.continuation_after))} |")


@dataclass
class CaseOutcome:
    case: str
    verdict: str
    passed: int
    tried: int
    control_passed: int
    columns: list[str]
    rows: list[list[str]]
    figures: list[str]
    replacement: float | None
    completeness: float | None

    def markdown(self) -> str:
        scores = ("" if self.replacement is None else
                  f" · replacement {self.replacement:.3f}, completeness {self.completeness:.3f} (mean over prompts)")
        return (f"### {CASES.get(self.case, self.case)}: **{self.verdict}**\n"
                f"{self.passed}/{self.tried} prompt variants pass; random groups of the same size and places "
                f"(the control) pass {self.control_passed}/{self.tried}{scores}")


@dataclass
class InfoOutcome:
    facts: dict[str, Any]
    card_front_matter: str
    card: str
    model_facts: dict[str, Any]

    def rows(self) -> list[list[str]]:
        from clt_hub.loading.hub import human_size

        out = []
        for key, value in self.facts.items():
            if key == "metrics":
                continue
            shown = (human_size(value) if key == "size_on_disk" else
                     f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
            out.append([key, shown])
        return out + [[f"model {k}", str(v)] for k, v in self.model_facts.items()]

    def metric_rows(self) -> list[list[str]]:
        return [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in self.facts.get("metrics", {}).items()]


class Space:
    """The app's state that outlives requests: limits, the loaded-model cache and a scratch folder."""

    def __init__(self, limits: Limits | None = None, scratch: Path | None = None) -> None:
        self.limits = limits or Limits.from_env()
        self._cache: OrderedDict[Source, Loaded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._texts: dict[Source, list[str]] = {}
        self.scratch = scratch or Path(tempfile.gettempdir()) / "clt_space"

    # -- loading -------------------------------------------------------------------------------
    def load(self, source: Source, report: Progress = _quiet) -> Loaded:
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

    @staticmethod
    def _load(source: Source, report: Progress) -> Loaded:
        from clt_hub.loading.hub import resolve
        from clt_hub.models.loading import load

        report(0.02, f"loading {source.name}")
        model, tokenizer, transcoder = load(source.model, source.transcoder, local_files_only=source.local_files_only)
        path = resolve(source.transcoder, local_files_only=source.local_files_only)
        return Loaded(source, model, tokenizer, transcoder, path)

    def context_texts(self, loaded: Loaded) -> list[str] | None:
        """Texts to find top activating contexts in: the organism's corpus, or the operator's source."""
        source = loaded.source
        if source not in self._texts:
            n = self.limits.max_context_texts
            if source.organism:
                from paper_cases.corpus import build

                unique = list(dict.fromkeys(build().train))  # the training mix: facts, sums, couplets, filler
                self._texts[source] = unique[:n]
            elif self.limits.context_texts:
                from clt_hub.training.texts import iter_texts

                self._texts[source] = list(islice(iter_texts(self.limits.context_texts), n))
            else:
                return None
        return self._texts[source]

    def _new_folder(self, kind: str) -> Path:
        """A fresh folder for files users download; folders older than two hours are removed."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        for old in self.scratch.iterdir():
            try:
                if time.time() - old.stat().st_mtime > 7200:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.scratch))

    # -- trace -----------------------------------------------------------------------------------
    def trace(self, prompt: str, source: Source, *, node_threshold: float = 0.8, edge_threshold: float = 0.98,
              max_feature_nodes: int | None = None, contexts: bool = True, report: Progress = _quiet) -> Session:
        from clt_hub.attribution.graph_json import node_records
        from clt_hub.attribution.trace import trace

        lim = self.limits
        if not (prompt or "").strip():
            raise ConfigError("the prompt is empty; type some text to trace")
        for name, value in (("node threshold", node_threshold), ("edge threshold", edge_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"the {name} is a fraction of influence between 0 and 1, not {value}")
        budget = lim.max_feature_nodes if max_feature_nodes is None else int(max_feature_nodes)
        if not 1 <= budget <= lim.max_feature_nodes:
            raise ConfigError(f"max feature nodes must be between 1 and {lim.max_feature_nodes} on this Space "
                              f"($CLT_SPACE_MAX_FEATURE_NODES), not {budget}")
        loaded = self.load(source, report)
        n_tokens = len(loaded.tokenizer(prompt)["input_ids"])
        if n_tokens > lim.max_prompt_tokens:
            raise ConfigError(f"the prompt is {n_tokens} tokens long; this Space traces at most "
                              f"{lim.max_prompt_tokens} ($CLT_SPACE_MAX_PROMPT_TOKENS). Shorten it")
        texts = self.context_texts(loaded) if contexts else None
        report(0.5, "attributing")
        with loaded.lock:
            result = trace(prompt, loaded.model, loaded.tokenizer, loaded.transcoder, node_threshold=node_threshold,
                           edge_threshold=edge_threshold, max_feature_nodes=budget, progress=True,
                           transcoder_name=source.transcoder if not source.organism else "organism-clt",
                           slug="clt-hub-space", context_texts=texts, max_context_texts=lim.max_context_texts)
        labels = {n["node_id"]: n["clerp"] for n in result.json["nodes"]}
        records = node_records(result.graph, result.tokens + result.logit_texts, labels, result.pruned.cumulative)
        report(1.0, "drawing")
        return Session(source, result, records, {r["node_id"]: i for i, r in enumerate(records)})

    def summary_markdown(self, session: Session) -> str:
        """Scores and top logits, shown beside the graph."""
        r = session.result
        g, p = r.graph, r.pruned
        kept_f = int(p.node_mask[: g.n_features].sum())
        lines = [f"**Replacement score** {r.scores.replacement:.3f} · **completeness** {r.scores.completeness:.3f}", "",
                 f"{len(r.tokens)} tokens · {g.n_features} active features, {kept_f} kept · "
                 f"{int(p.edge_mask.sum())} edges kept", "", "| top logit | p |", "|---|---:|"]
        lines += [f"| {_md(repr(t))} | {q:.3f} |" for t, q in zip(r.logit_texts, g.logit_probabilities.tolist(),
                                                                    strict=True)]
        return "\n".join(lines)

    def downloads(self, session: Session, report: Progress = _quiet) -> tuple[str, str | None]:
        """graph.json (Neuronpedia frontend format, with the current supernodes) and graph.png."""
        from clt_hub.attribution.graph_json import save
        from clt_hub.attribution.plot import plot_graph

        r = session.result
        folder = self._new_folder("graph")
        data = {**r.json, "qParams": {**r.json["qParams"], "supernodes": [list(s) for s in session.supernodes]}}
        json_path = save(data, folder / "graph.json")
        report(0.5, "drawing the PNG")
        groups = {s[0]: [session.index[n] for n in s[1:]] for s in session.supernodes}
        png = plot_graph(r.graph, r.pruned, r.tokens, folder / "graph.png", supernodes=groups,
                         title=_short(r.prompt.replace("\n", " \\n "), 90))
        return str(json_path), None if png is None else str(png)

    # -- node details ------------------------------------------------------------------------------
    def node_details(self, session: Session, node_id: str, k: int = 8) -> NodeDetails:
        if node_id.startswith("supernode:"):
            return self._supernode_details(session, node_id.removeprefix("supernode:"), k)
        if node_id not in session.index:
            raise ConfigError(f"there is no node {node_id!r} in this graph; trace again")
        r = session.result
        g, p = r.graph, r.pruned
        i = session.index[node_id]
        rec = session.records[i]
        adj = g.adjacency

        def strongest(values: torch.Tensor, exclude: int) -> list[tuple[str, float]]:
            values = values.clone()
            values[exclude] = 0
            top = values.abs().topk(min(k, len(values)))
            return [(session.describe(j), float(values[j])) for j, v in zip(top.indices.tolist(), top.values.tolist(),
                                                                            strict=True) if v > 0]

        inputs, outputs = strongest(adj[i], i), strongest(adj[:, i], i)
        if i < g.n_features:
            layer, pos, feat = g.features[i].tolist()
            loaded = self.load(session.source)
            from clt_hub.attribution.descriptions import logit_effects

            with loaded.lock:
                eff = logit_effects(loaded.model, loaded.transcoder, layer, torch.tensor([feat]))[0]
            up, down = eff.topk(k), (-eff).topk(k)
            decode = loaded.tokenizer.decode
            has_texts = session.source.organism or bool(self.limits.context_texts)
            return NodeDetails(
                node_id, "feature", f"Feature {feat} at layer {layer}, position {pos} ({_shown(r.tokens[pos])!r})",
                label=rec.get("clerp") or "", activation=float(g.activations[i]), influence=float(p.cumulative[i]),
                promotes=[(decode([int(t)]), float(v)) for v, t in zip(up.values, up.indices, strict=True)],
                suppresses=[(decode([int(t)]), -float(v)) for v, t in zip(down.values, down.indices, strict=True)],
                contexts=r.contexts.get(node_id, []), inputs=inputs, outputs=outputs,
                note="" if has_texts else "no context texts on this Space for this model (set $CLT_SPACE_CONTEXT_TEXTS)")
        if i < g.token_index(0):
            layer, pos = divmod(i - g.n_features, g.n_pos)
            return NodeDetails(node_id, "error", f"MLP reconstruction error at layer {layer}, position {pos}",
                               label="what the transcoder misses of this MLP output", inputs=inputs, outputs=outputs,
                               influence=float(p.cumulative[i]))
        if i < g.logit_index(0):
            pos = i - g.token_index(0)
            return NodeDetails(node_id, "token", f"Token {_shown(r.tokens[pos])!r} at position {pos}", outputs=outputs,
                               influence=float(p.cumulative[i]))
        j = i - g.logit_index(0)
        return NodeDetails(node_id, "logit", f"Output {r.logit_texts[j]!r}", label=rec.get("clerp") or "",
                           probability=float(g.logit_probabilities[j]), inputs=inputs)

    def _supernode_details(self, session: Session, name: str, k: int) -> NodeDetails:
        groups = {s[0]: s[1:] for s in session.supernodes}
        if name not in groups:
            raise ConfigError(f"there is no supernode {name!r}; the graph has: {', '.join(groups) or 'none'}")
        members = [session.index[n] for n in groups[name]]
        g = session.result.graph
        inside = torch.zeros(g.adjacency.shape[0], dtype=torch.bool)
        inside[members] = True
        group_out = g.adjacency[:, inside].sum(1) * ~inside   # the members' summed effect on each other node
        group_in = g.adjacency[inside].sum(0) * ~inside     # each other node's summed effect on the members

        def top(v: torch.Tensor) -> list[tuple[str, float]]:
            t = v.abs().topk(min(k, len(v)))
            return [(session.describe(j), float(v[j])) for j, a in zip(t.indices.tolist(), t.values.tolist(),
                                                                       strict=True) if a > 0]

        acts = g.activations[[m for m in members if m < g.n_features]]
        return NodeDetails(f"supernode:{name}", "supernode", f"Supernode {name!r} ({len(members)} features)",
                           activation=float(acts.sum()) if len(acts) else None, members=groups[name],
                           inputs=top(group_in), outputs=top(group_out), note="activation: the sum over its members")

    # -- supernodes ----------------------------------------------------------------------------------
    def add_supernode(self, session: Session, name: str, node_ids: Sequence[str]) -> None:
        """Group kept features under `name` (a node moves out of any group it was in; same name: replaced)."""
        name = (name or "").strip()
        if not name:
            raise ConfigError("give the supernode a name")
        if not node_ids:
            raise ConfigError("pick the features to group (in the list, or by clicking nodes in the graph)")
        kept = set(session.kept_features())
        for n in node_ids:
            if n not in kept:
                raise ConfigError(f"{n!r} is not a feature kept in this graph; only kept features can be grouped")
        chosen = list(dict.fromkeys(node_ids))
        others = [[s[0], *[n for n in s[1:] if n not in chosen]] for s in session.supernodes if s[0] != name]
        session.supernodes = [s for s in others if len(s) > 1] + [[name, *chosen]]

    def accept_suggestion(self, session: Session) -> None:
        """Use the automatic grouping (features with alike outgoing effects), replacing the current groups."""
        suggested = session.result.suggested_supernodes
        if not suggested:
            raise ConfigError("no suggestion for this graph: fewer than two kept features have alike outgoing effects")
        seen: dict[str, int] = {}
        out = []
        for name, *members in suggested:
            seen[name] = seen.get(name, 0) + 1
            out.append([name if seen[name] == 1 else f"{name} ({seen[name]})", *members])
        session.supernodes = out

    def remove_supernode(self, session: Session, name: str) -> None:
        if name not in {s[0] for s in session.supernodes}:
            raise ConfigError(f"there is no supernode {name!r}")
        session.supernodes = [s for s in session.supernodes if s[0] != name]

    def supernode_rows(self, session: Session) -> list[list[Any]]:
        return [[s[0], len(s) - 1, ", ".join(s[1:])] for s in session.supernodes]

    # -- the graph view --------------------------------------------------------------------------------
    def graph_html(self, session: Session, collapsed: bool = False) -> str:
        """The pruned graph as SVG: nodes by layer (rows) and token position (columns), edges by weight.

        Every node carries data-node (its id) and data-label (hover text); GRAPH_JS turns clicks into
        an event for the details panel. `collapsed`: each supernode is drawn as one node, edges summed."""
        from clt_hub.attribution.supernodes import collapse

        r = session.result
        g, p = r.graph, r.pruned
        kept = session.kept()
        where = {n: k for k, n in enumerate(kept)}
        groups = [(s[0], [where[session.index[m]] for m in s[1:]]) for s in session.supernodes]
        ring = {session.index[m]: gi for gi, s in enumerate(session.supernodes) for m in s[1:]}
        a = (g.adjacency * p.edge_mask)[kept][:, kept]
        if collapsed and groups:
            a, members = collapse(a, [m for _, m in groups])
        else:
            members = [[k] for k in range(len(kept))]
        L, T = g.n_layers, g.n_pos

        def cell(i: int) -> tuple[int, int]:
            if i < g.n_features:
                return int(g.features[i, 0]) + 1, int(g.features[i, 1])
            if i < g.token_index(0):
                layer, pos = divmod(i - g.n_features, T)
                return layer + 1, pos
            if i < g.logit_index(0):
                return 0, i - g.token_index(0)
            return L + 1, T - 1

        nodes: list[dict[str, Any]] = []
        for v, m in enumerate(members):
            idx = [kept[k] for k in m]
            if collapsed and v < len(groups):
                name = groups[v][0]
                cells = [cell(i) for i in idx]
                row = round(sum(c[0] for c in cells) / len(cells))
                col = round(sum(c[1] for c in cells) / len(cells))
                shown = ", ".join(session.result.node_name(i) for i in idx[:6]) + (" …" if len(idx) > 6 else "")
                nodes.append({"id": f"supernode:{name}", "kind": "supernode", "row": row, "col": col, "order": -1.0,
                              "text": name, "group": v, "hover": f"supernode {name}: {len(idx)} features ({shown})"})
                continue
            i = idx[0]
            row, col = cell(i)
            kind = ("feature" if i < g.n_features else "error" if i < g.token_index(0) else
                    "token" if i < g.logit_index(0) else "logit")
            hover = session.describe(i)
            if kind == "feature":
                hover += f" · act {float(g.activations[i]):.3g}"
            elif kind == "token":
                hover = f"token {_shown(r.tokens[col])!r} (position {col})"
            elif kind == "error":
                hover += " (MLP reconstruction error)"
            nodes.append({"id": session.records[i]["node_id"], "kind": kind, "row": row, "col": col,
                          "order": float(p.cumulative[i]) + (1.0 if kind == "error" else 0.0), "text": "",
                          "group": ring.get(i, -1) if not collapsed else -1, "hover": hover,
                          "logit": i - g.logit_index(0) if kind == "logit" else -1})

        per_row, step, col_w, left = 5, 13, 78, 54
        by_cell: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for n in nodes:
            by_cell.setdefault((n["row"], n["col"]), []).append(n)
        slots: dict[tuple[int, int], int] = {}
        for key, items in by_cell.items():
            items.sort(key=lambda n: n["order"])
            used = 0
            for n in items:
                if n["kind"] == "supernode":
                    used = math.ceil(used / per_row) * per_row
                    n["slot"] = used
                    used += per_row
                elif n["kind"] == "logit":
                    n["slot"] = 0
                else:
                    n["slot"] = used
                    used += 1
            slots[key] = used
        heights = {}
        for row in range(L + 2):
            lines = max([math.ceil(slots.get((row, c), 0) / per_row) for c in range(T)] + [1])
            heights[row] = 30 if row == L + 1 else lines * step + 22
        tops, y = {}, 26
        for row in range(L + 1, -1, -1):
            tops[row] = y
            y += heights[row]
        height = y + 46
        width = left + T * col_w + 20
        for n in nodes:
            cx = left + n["col"] * col_w + col_w / 2
            if n["kind"] == "logit":
                n["x"], n["y"] = cx - 30 * n["logit"], tops[n["row"]] + 12
            else:
                line, k = divmod(n["slot"], per_row)
                n["x"] = cx if n["kind"] == "supernode" else cx + (k - (per_row - 1) / 2) * step
                n["y"] = tops[n["row"]] + 12 + line * step
        pos = {n["id"]: (n["x"], n["y"]) for n in nodes}
        # short prompts fit the panel (scaled); long ones keep their size and scroll
        size = 'width="100%"' if width <= 1100 else f'width="{width}" height="{height}"'

        out = [f'<div class="clt-hover">hover a node for its label; click it for details</div>'
               f'<div class="clt-scroll"><svg xmlns="http://www.w3.org/2000/svg" class="clt-svg" {size} '
               f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
        for row in range(L + 2):
            label = "emb" if row == 0 else "logits" if row == L + 1 else f"L{row - 1}"
            y0 = tops[row]
            if row % 2:
                out.append(f'<rect x="0" y="{y0 - 4}" width="{width}" height="{heights[row]}" fill="#f6f7f9"/>')
            out.append(f'<text x="6" y="{y0 + 14}" fill="#6b7280">{label}</text>')
        t_idx, s_idx = a.nonzero(as_tuple=True)
        weights = a[t_idx, s_idx]
        if len(weights):
            order = weights.abs().argsort(descending=True)[: self.limits.max_edges_drawn]
            biggest = float(weights.abs().max())
            ids = [n["id"] for n in nodes]
            for e in reversed(order.tolist()):
                t, s, w = int(t_idx[e]), int(s_idx[e]), float(weights[e])
                (x0, y0), (x1, y1) = pos[ids[s]], pos[ids[t]]
                rel = abs(w) / biggest
                out.append(f'<line class="edge" data-s="{_text(ids[s])}" data-t="{_text(ids[t])}" x1="{x0:.1f}" '
                           f'y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{"#2563eb" if w > 0 else "#dc2626"}" '
                           f'stroke-opacity="{0.12 + 0.6 * rel:.2f}" stroke-width="{0.4 + 3.2 * rel:.2f}"/>')
        palette = ["#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#4d7c0f", "#c2410c", "#1d4ed8", "#be123c"]
        for n in nodes:
            x, y = n["x"], n["y"]
            ring_attr = (f' stroke="{palette[n["group"] % len(palette)]}" stroke-width="2.2"' if n["group"] >= 0
                         else ' stroke="#14532d" stroke-width="0.6"')
            head = (f'<g class="node {n["kind"]}" data-node="{_text(n["id"])}" data-label="{_text(n["hover"])}">'
                    f'<title>{_text(n["hover"])}</title>')
            if n["kind"] == "feature":
                shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#16a34a"{ring_attr}/>'
            elif n["kind"] == "error":
                shape = f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="#9ca3af"/>'
            elif n["kind"] == "token":
                shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#111827"/>'
            elif n["kind"] == "logit":
                shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="#f97316"/>'
                         f'<text x="{x:.1f}" y="{y - 9:.1f}" text-anchor="middle" fill="#9a3412">'
                         f'{_text(_short(_shown(r.logit_texts[n["logit"]]), 10))}</text>')
            else:
                color = palette[n["group"] % len(palette)]
                shape = (f'<rect x="{x - 34:.1f}" y="{y - 6:.1f}" width="68" height="12" rx="4" fill="{color}"/>'
                         f'<text x="{x:.1f}" y="{y + 3.5:.1f}" text-anchor="middle" fill="#fff" font-size="9">'
                         f'{_text(_short(n["text"], 13))}</text>')
            out.append(head + shape + "</g>")
        for c, tok in enumerate(r.tokens):
            x = left + c * col_w + col_w / 2
            out.append(f'<text x="{x:.1f}" y="{height - 26}" text-anchor="middle" fill="#111827">'
                       f'{_text(_short(_shown(tok), 11))}</text>'
                       f'<text x="{x:.1f}" y="{height - 12}" text-anchor="middle" fill="#9ca3af" font-size="9">{c}</text>')
        out.append("</svg></div>")
        return "".join(out)

    def node_choices(self, session: Session) -> list[tuple[str, str]]:
        """(label, node id) of kept features, most influential first, for the pickers."""
        return [(_short(session.describe(session.index[n]), 80), n) for n in session.kept_features()]

    # -- interventions ---------------------------------------------------------------------------------
    def intervene(self, session: Session, features: Sequence[str] = (), supernodes: Sequence[str] = (), *,
                  how: Literal["multiply", "set"] = "multiply", amount: float = 0.0,
                  mode: Literal["constrained", "open"] = "constrained", new_tokens: int | None = None, top: int = 8,
                  report: Progress = _quiet) -> InterventionOutcome:
        """Set or scale the picked features (each at its own position) and supernodes' members."""
        from clt_hub.attribution.interventions import generate, intervene
        from clt_hub.attribution.supernodes import interventions_for

        if how not in ("multiply", "set"):
            raise ConfigError(f"choose multiply or set, not {how!r}")
        if amount is None or not math.isfinite(float(amount)):
            raise ConfigError("give a finite number to set or multiply by")
        new_tokens = min(8, self.limits.max_new_tokens) if new_tokens is None else int(new_tokens)
        if not 0 <= new_tokens <= self.limits.max_new_tokens:
            raise ConfigError(f"the continuation is at most {self.limits.max_new_tokens} tokens on this Space "
                              f"($CLT_SPACE_MAX_NEW_TOKENS), not {new_tokens}")
        kind: dict[str, float] = {"scale" if how == "multiply" else "value": float(amount)}
        ivs = []
        if features:
            kept = set(session.kept_features())
            bad = [f for f in features if f not in kept]
            if bad:
                raise ConfigError(f"{', '.join(bad)} not kept features of this graph; trace again or pick from the list")
            ivs += interventions_for([["picked", *features]], "picked", **kind)
        for name in supernodes:
            ivs += interventions_for(session.supernodes, name, **kind)
        if not ivs:
            raise ConfigError("pick at least one feature or supernode to intervene on")
        loaded = self.load(session.source, report)
        tok = loaded.tokenizer
        ids = torch.tensor(tok(session.result.prompt)["input_ids"], dtype=torch.long)
        report(0.2, "intervening")
        with loaded.lock:
            res = intervene(loaded.model, loaded.transcoder, ids, ivs, mode=mode)
            report(0.4, "generating the original continuation")
            plain = generate(loaded.model, loaded.transcoder, ids, [], max_new_tokens=new_tokens)
            report(0.7, "generating with the interventions held on")
            steered = generate(loaded.model, loaded.transcoder, ids, ivs, max_new_tokens=new_tokens)

        def text(out: torch.Tensor) -> str:
            new = out[len(ids):].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id) + 1]
            return str(tok.decode(new))

        def tops(original: bool) -> list[tuple[str, float]]:
            return [(str(tok.decode([t])), p) for t, p in res.top_tokens(top, original=original)]

        return InterventionOutcome(session.result.prompt, mode, len(ivs), tops(True), tops(False), text(plain),
                                   text(steered))

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
            from paper_cases.common import Subject
        except ImportError:
            raise ConfigError("the case studies live in the repository's paper_cases/ folder; run the app from "
                              "the clt_hub repository root") from None
        loaded = self.load(source, report)
        subject = Subject(loaded.model, loaded.tokenizer, loaded.transcoder, source.name)
        report(0.3, f"running {CASES[case]}")
        folder = self._new_folder(case)
        with loaded.lock:
            try:
                result = run_case(case, subject, source.organism, None, int(n), folder)
            except CltHubError:
                raise
            except (ValueError, KeyError, IndexError) as exc:
                raise ConfigError(f"the {CASES[case]} check cannot run on {source.name}: {exc}") from None
        columns: list[str] = []
        for row in result.rows:
            columns += [c for c in row if c not in columns]
        rows = [[_shown(str(row.get(c, ""))) for c in columns] for row in result.rows]

        def mean(v: list[float]) -> float | None:
            return sum(v) / len(v) if v else None

        return CaseOutcome(case, result.verdict, result.passed, result.tried, result.control_passed, columns, rows,
                           [f for f in result.files if Path(f).exists()], mean(result.replacement),
                           mean(result.completeness))

    # -- transcoder info -----------------------------------------------------------------------------------
    def info(self, source: Source) -> InfoOutcome:
        """Facts from the transcoder's config and model card (no weights loaded); model facts once loaded."""
        from clt_hub.loading.hub import describe, resolve

        path = resolve(source.transcoder, local_files_only=source.local_files_only)
        facts = describe(path)
        card_file = path / "README.md"
        front, body = _strip_front_matter(card_file.read_text()) if card_file.exists() else ("", "(no model card)")
        model_facts: dict[str, Any] = {"source": source.model}
        if self.is_loaded(source):
            cfg = self._cache[source].model.config
            model_facts.update({"type": cfg.model_type, "layers": getattr(cfg, "num_hidden_layers", "?"),
                                "d_model": getattr(cfg, "hidden_size", "?"), "vocab": getattr(cfg, "vocab_size", "?")})
        return InfoOutcome(facts, front, body, model_facts)


def user_message(exc: BaseException) -> str | None:
    """The message to show for an exception a user can cause; None for bugs (logged, shown generically)."""
    if isinstance(exc, CltHubError):
        return str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "out of memory: trace a shorter prompt or fewer feature nodes"
    return None


GRAPH_CSS = """
.clt-scroll { overflow: auto; max-height: 680px; border: 1px solid #e5e7eb; border-radius: 6px; background: #fff; }
.clt-hover { min-height: 1.5em; font: 12px monospace; color: #374151; padding: 2px 4px; white-space: nowrap;
             overflow: hidden; text-overflow: ellipsis; }
.clt-svg [data-node] { cursor: pointer; }
.clt-svg [data-node]:hover > circle, .clt-svg [data-node]:hover > rect { stroke: #f59e0b; stroke-width: 2.5; }
.clt-svg [data-node].sel > circle, .clt-svg [data-node].sel > rect { stroke: #111827; stroke-width: 3; }
.clt-svg.focus .edge { stroke-opacity: 0.05; }
.clt-svg.focus .edge.hl { stroke-opacity: 0.9; }
"""

# Event delegation on the component root, so it keeps working when the SVG is replaced by a new trace.
GRAPH_JS = """
element.addEventListener('mouseover', (e) => {
  const n = e.target.closest('[data-node]');
  const h = element.querySelector('.clt-hover');
  if (n && h) { h.textContent = n.dataset.label; }
});
element.addEventListener('click', (e) => {
  const n = e.target.closest('[data-node]');
  if (!n) { return; }
  const svg = n.closest('svg');
  const id = n.dataset.node;
  svg.querySelectorAll('.sel').forEach((x) => x.classList.remove('sel'));
  svg.querySelectorAll('.hl').forEach((x) => x.classList.remove('hl'));
  n.classList.add('sel');
  svg.classList.add('focus');
  svg.querySelectorAll('.edge').forEach((x) => {
    if (x.dataset.s === id || x.dataset.t === id) { x.classList.add('hl'); }
  });
  trigger('click', {node: id});
});
"""
