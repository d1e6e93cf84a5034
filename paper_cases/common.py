"""What the three checks share: loading a model + transcoder, tracing, finding feature groups from
the graph (never from hand-written ids), measuring interventions, controls, tables and figures.

A feature group is scored by influence in the pruned graph: how much the feature drives the target
(A + A^2 + ... from the target's row) times, when sources are given, how much those source nodes
drive the feature. The top-scoring active features form the group; the control is a group of the
same size drawn at random from the other active features at the same layers and positions.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.graph import Graph, influence, normalized
from clt_hub.attribution.interventions import Intervention, generate, intervene
from clt_hub.attribution.options import TraceOptions
from clt_hub.attribution.pruning import Pruned, prune, scores
from clt_hub.attribution.targets import Target, logit_difference_target, token_target
from clt_hub.models.loading import encode_prompt
from clt_hub.transcoders.transcoder import Transcoder

OUT = Path("paper_cases_out")
GROUP_MASS = 0.6   # a group holds this share of its candidates' total score ...
GROUP_MAX = 32     # ... with at most this many features
# feature nodes per graph on a real model: a trained CLT there has thousands of active features per prompt
# (Gemma, TopK 32 x 18 layers x ~10 positions), and attribution time grows with the nodes kept
REAL_FEATURE_NODES = 512
Feature = tuple[int, int, int]  # (layer, position, feature id)
T = TypeVar("T")


@dataclass
class Subject:
    """The model under study: a transformers causal LM, its tokenizer and a transcoder."""

    model: Any
    tokenizer: Any
    transcoder: Transcoder
    name: str = "organism"
    max_feature_nodes: int | None = None  # graph budget (None: every active feature, as on the organism)
    _top: dict[str, int] = field(default_factory=dict, repr=False)  # prompt -> the model's top next token

    def ids(self, text: str) -> torch.Tensor:
        return encode_prompt(self.tokenizer, text)

    def token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is not a single token for this tokenizer")
        return int(ids[0])

    def first_token(self, text: str) -> int:
        return int(self.tokenizer(text, add_special_tokens=False)["input_ids"][0])

    def word(self, token: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens([int(token)])[0])

    def tokens(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids.tolist())

    def next_token_probs(self, text: str) -> torch.Tensor:
        """The model's own next-token distribution (no transcoder)."""
        with torch.no_grad():
            logits = self.model(self.ids(text)[None]).logits[0, -1].float()
        return torch.softmax(logits, -1)

    def gets_right(self, prompt: str, answer: str) -> bool:
        """The model's top next token is the answer's first token: which variants a real model can do.
        Remembered per prompt: choosing variants asks about most prompts twice (as itself and as a partner)."""
        if prompt not in self._top:
            self._top[prompt] = int(self.next_token_probs(prompt).argmax())
        return self._top[prompt] == self.first_token(answer)


@functools.lru_cache(maxsize=4)
def load_subject(model: str | None = None, transcoder: str | None = None) -> Subject:
    """The bundled organism by default; any local/Hub model + transcoder otherwise."""
    from clt_hub.models.loading import load
    from paper_cases.organism import CLT_DIR, MODEL_DIR

    lm, tok, tc = load(str(model or MODEL_DIR), str(transcoder or CLT_DIR), local_files_only=model is None)
    return subject_for(lm, tok, tc, None if model is None else str(model))


def subject_for(model: Any, tokenizer: Any, transcoder: Transcoder, name: str | None = None) -> Subject:
    """The organism (name None: every active feature becomes a node) or a real model (REAL_FEATURE_NODES)."""
    if name is None:
        return Subject(model, tokenizer, transcoder)
    return Subject(model, tokenizer, transcoder, name, max_feature_nodes=REAL_FEATURE_NODES)


def load_artifacts(folder: str | None) -> Subject:
    """A model and CLT saved side by side as `folder`/model and `folder`/clt, the layout the organism
    build writes (None: the bundled organism). For comparing rebuilt organisms with the bundled one."""
    return load_subject(f"{folder}/model" if folder else None, f"{folder}/clt" if folder else None)


@dataclass
class Traced:
    prompt: str
    ids: torch.Tensor
    graph: Graph
    pruned: Pruned
    replacement: float
    completeness: float
    labels: list[str] = field(default_factory=list)  # the output nodes' words


def trace(subject: Subject, prompt: str | torch.Tensor, target: str | int | None = None,
          rivals: list[int] | None = None) -> Traced:
    """Attribution graph of `prompt` (text or token ids); with `target` (text of one token, or a token
    id), attributed to that token's (demeaned) logit, or with `rivals` to its logit minus theirs
    (what favours this answer over the others, not what the answers share)."""
    ids = subject.ids(prompt) if isinstance(prompt, str) else prompt
    text = prompt if isinstance(prompt, str) else str(subject.tokenizer.decode(ids.tolist()))
    custom: list[Target] | None = None
    if target is not None:
        tid = subject.token(target) if isinstance(target, str) else int(target)
        custom = [logit_difference_target(subject.model, tid, rivals, f"{subject.word(tid)} - rivals") if rivals
                  else token_target(subject.model, tid, subject.word(tid))]
    options = TraceOptions(max_feature_nodes=subject.max_feature_nodes)  # the CLI's and the Space's defaults
    graph = attribute(subject.model, subject.transcoder, ids, custom_targets=custom, batch_size=options.batch_size,
                      max_logits=options.max_logits, max_feature_nodes=options.max_feature_nodes)
    pruned = prune(graph, options.node_threshold, options.edge_threshold)
    s = scores(graph)
    labels = ([c.label for c in custom] if custom else
              [str(subject.tokenizer.decode([int(tok)])) for tok in graph.logit_tokens.tolist()])
    return Traced(text, ids, graph, pruned, s.replacement, s.completeness, labels)


def find_group(t: Traced, mass: float = GROUP_MASS, sources: list[int] | None = None,
               positions: set[int] | None = None, target_row: int | None = None,
               max_size: int = GROUP_MAX) -> list[Feature]:
    """Top features by (influence on the target) x (influence from `sources`), optionally only at
    `positions`: the fewest that hold `mass` of the total score (at most `max_size`). The group's size
    is set by the graph, not chosen per case: a mechanism spread over many features gets a big group."""
    g = t.graph
    a = normalized(g.adjacency) * t.pruned.edge_mask
    w = torch.zeros(a.shape[0])
    w[g.logit_index(0) if target_row is None else target_row] = 1.0
    to_target = influence(a, w)
    score = to_target[: g.n_features].clone()
    if sources:
        s = torch.zeros(a.shape[0])
        s[sources] = 1.0
        score = score * influence(a.T, s)[: g.n_features]
    score = score * t.pruned.node_mask[: g.n_features]
    if positions is not None:
        keep = torch.tensor([int(p) in positions for p in g.features[:, 1]])
        score = score * keep
    order = score.argsort(descending=True)
    cumulative = score[order].cumsum(0) / score.sum().clamp(min=1e-30)
    size = min(max_size, int((cumulative < mass).sum().item()) + 1)
    return [tuple(g.features[i].tolist()) for i in order[:size] if score[i] > 0]  # type: ignore[misc]


def control_group(t: Traced, group: list[Feature], seed: int = 0) -> list[Feature]:
    """Same size, random among the other active features: at the same (layer, position) where
    possible, else at the same position in another layer (an intervention copied from another prompt
    needs a position that prompt has), else anywhere."""
    rng = random.Random(seed)
    taken = set(group)
    pool = [tuple(f) for f in t.graph.features.tolist() if tuple(f) not in taken]
    out: list[Feature] = []
    for layer, pos, _ in group:
        free = [f for f in pool if f not in out]
        same_pos = [f for f in free if f[1] == pos]
        choice = rng.choice([f for f in same_pos if f[0] == layer] or same_pos or free)
        out.append(choice)  # type: ignore[arg-type]
    return out


def scaled(group: list[Feature], factor: float) -> list[Intervention]:
    return [Intervention(l, f, p, scale=factor) for l, p, f in group]


def values_from(subject: Subject, ids: torch.Tensor, group: list[Feature], position_map: dict[int, int] | None = None
                ) -> list[Intervention]:
    """Set each feature of `group` (traced on `ids`) to its activation there, at the mapped position."""
    acts = intervene(subject.model, subject.transcoder, ids, [], mode="open").original_activations
    pm = position_map or {}
    return [Intervention(l, f, pm.get(p, p), value=float(acts[p, l, f])) for l, p, f in group]


def next_probs(subject: Subject, ids: torch.Tensor, ivs: list[Intervention]) -> torch.Tensor:
    r = intervene(subject.model, subject.transcoder, ids, ivs, mode="open", freeze_attention=False)
    return torch.softmax(r.logits[-1].float(), -1)


def continuation_ids(subject: Subject, ids: torch.Tensor, ivs: list[Intervention], n: int,
                     stop: set[int] | None = None) -> torch.Tensor:
    """Greedy new tokens with the interventions held on, cut at EOS or a `stop` token (kept)."""
    new = generate(subject.model, subject.transcoder, ids, ivs, max_new_tokens=n)[len(ids):]
    eos = subject.tokenizer.eos_token_id
    for i, t in enumerate(new.tolist()):
        if t == eos:
            return new[:i]
        if stop and t in stop:
            return new[: i + 1]
    return new


def continuation(subject: Subject, ids: torch.Tensor, ivs: list[Intervention], n: int) -> list[str]:
    return subject.tokens(continuation_ids(subject, ids, ivs, n))


def node_indices(t: Traced, group: list[Feature]) -> list[int]:
    index = {tuple(f): i for i, f in enumerate(t.graph.features.tolist())}
    return [index[f] for f in group if f in index]


@dataclass
class CaseResult:
    case: str
    passed: int = 0
    tried: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    control_passed: int = 0
    files: list[str] = field(default_factory=list)
    replacement: list[float] = field(default_factory=list)
    completeness: list[float] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # the evidence table's columns, in order
    selection: str = ""  # on a real model: Chosen.describe() of its variants ("12 of 32 right, 12 run")

    def record(self, t: Traced, row: dict[str, Any], ok: bool, control_ok: bool) -> None:
        """One prompt variant: its table row, whether it and its random-group control passed."""
        self.passed += ok
        self.control_passed += control_ok
        self.tried += 1
        self.replacement.append(t.replacement)
        self.completeness.append(t.completeness)
        self.rows.append({**row, "result": "pass" if ok else "FAIL"})

    @property
    def verdict(self) -> str:
        # the mechanism holds when most variants pass and clearly more than the random-group control
        ok = self.tried > 0 and self.passed >= 0.75 * self.tried and self.passed > self.control_passed
        return "PASS" if ok else "FAIL"


def write_figure(subject: Subject, t: Traced, groups: dict[str, list[Feature]], path: Path, title: str) -> str:
    from clt_hub.attribution.graph_json import save, to_json
    from clt_hub.attribution.graph_png import plot_graph
    from clt_hub.attribution.supernodes import feature_node_ids

    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = subject.tokens(t.ids)
    ids = feature_node_ids(t.graph)
    supernodes = [[name, *[ids[i] for i in node_indices(t, g)]] for name, g in groups.items() if g]
    save(to_json(t.graph, tokens, prompt=t.prompt, slug=path.stem, supernodes=supernodes, pruned=t.pruned,
                 scan=subject.transcoder.cfg.model_name, logit_texts=t.labels), path.with_suffix(".json"))
    plot_graph(t.graph, t.pruned, tokens, path.with_suffix(".png"),
               supernodes={name: node_indices(t, g) for name, g in groups.items()}, title=title,
               logit_texts=t.labels)
    return str(path.with_suffix(".png"))


def print_table(result: CaseResult, console: Any = None) -> None:
    """The case's evidence table: one row per prompt variant, its controls and the verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(width=200)
    chosen = f"; variants: {result.selection}" if result.selection else ""
    table = Table(*result.columns, title=f"{result.case}: {result.passed}/{result.tried} pass "
                                          f"(random-group control {result.control_passed}/{result.tried}) -> {result.verdict}"
                                          f"{chosen}")
    for row in result.rows:
        table.add_row(*[escape(str(row.get(c, ""))) for c in result.columns])
    console.print(table)
    if result.replacement:
        console.print(f"replacement score {sum(result.replacement) / len(result.replacement):.3f}, completeness "
                      f"{sum(result.completeness) / len(result.completeness):.3f} (mean over prompts)")


class Chosen(list[T]):
    """The variants a real-model check runs: those the model gets right, spread over their range, with how many
    were `right` of how many `candidates` were tried, so that what was left out is counted, not hidden."""

    def __init__(self, items: Iterable[T], right: int, candidates: int):
        super().__init__(items)
        self.right, self.candidates = right, candidates

    def describe(self) -> str:
        return f"{self.right} of {self.candidates} right, {len(self)} run"


def spread(items: list[T], n: int | None) -> list[T]:
    """`n` items evenly spaced over the list (all of them when n is None or larger), first and last
    included: a sample that covers the list instead of its first few entries."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 1:
        return list(items[:n])
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def variants(items: list[T], case: str) -> Iterator[T]:
    """The variants of a check, with a progress bar (on stderr, so tables on stdout stay clean)."""
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=case, unit="prompt", leave=False)


FIGURES = ("first", "all", "none")


def figure_wanted(n: int, figures: str) -> bool:
    """Whether variant `n` gets a graph figure: the first only (default), all of them, or none."""
    if figures not in FIGURES:
        raise ValueError(f"figures must be one of {', '.join(FIGURES)}, not {figures!r}")
    return figures == "all" or (figures == "first" and n == 0)


def figure_path(out: Path, n: int, figures: str) -> Path:
    return out / ("graph" if figures == "first" else f"graph_{n:02d}")
