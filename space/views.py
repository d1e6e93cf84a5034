"""What the Space's panels show, as plain data with a `markdown()` each: node details, intervention and
case-study outcomes, transcoder info."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, Literal

from space.config import CASES
from space.text import md, shown


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
    de_embedding: list[tuple[str, float]] = field(default_factory=list)  # tokens whose embeddings drive it most
    by_weights: list[tuple[str, float]] = field(default_factory=list)    # upstream features by virtual weight
    by_global: list[tuple[str, float]] = field(default_factory=list)     # ... by global weight (TWERA) over texts
    global_tokens: int = 0                                               # the tokens of text TWERA was taken over
    note: str = ""
    qk_head: str = ""                    # the attention score QK tracing explained on this node ("": none)
    qk_pairs: list[tuple[str, str, float]] = field(default_factory=list)  # (query writer, key writer, value)
    qk_query: list[tuple[str, float]] = field(default_factory=list)       # query-side marginals
    qk_key: list[tuple[str, float]] = field(default_factory=list)         # key-side marginals

    def markdown(self) -> str:
        lines = [f"### {md(self.title)}", f"`{self.node_id}`" + (f" — {md(self.label)}" if self.label else "")]
        facts = [text for value, text in ((self.activation, f"activation **{self.activation or 0:.4g}**"),
                                          (self.influence, f"cumulative influence {self.influence or 0:.3f}"),
                                          (self.probability, f"probability **{self.probability or 0:.3f}**"))
                 if value is not None]
        if facts:
            lines.append(" · ".join(facts))
        if self.note and self.kind != "feature":
            lines.append(f"({md(self.note)})")
        if self.members:
            lines += ["", "**Members**: " + ", ".join(f"`{m}`" for m in self.members)]
        if self.promotes:
            lines += ["", "**Top logit effects** (direct, decoder → unembedding)", "",
                      "| pushes up | effect | pushes down | effect |", "|---|---:|---|---:|"]
            for (a, x), (b, y) in zip(self.promotes, self.suppresses, strict=False):
                lines.append(f"| {md(repr(a))} | {x:+.3f} | {md(repr(b))} | {y:+.3f} |")
        if self.kind == "feature":
            lines += ["", "**Top activating contexts**", "", *self._contexts_table()]
        for title, rows in (("Strongest inputs", self.inputs), ("Strongest outputs", self.outputs)):
            if rows:
                lines += ["", f"**{title}** (direct effect)", "", "| node | weight |", "|---|---:|"]
                lines += [f"| {md(name)} | {w:+.4g} |" for name, w in rows]
        return "\n".join(lines + self._weights_table() + self._qk_tables())

    def _qk_tables(self) -> list[str]:
        """The attention score explained on this node (QK tracing): top pairs, then each side's marginals."""
        if not self.qk_head:
            return []
        lines = ["", f"**Why the head attends** (exact QK attribution): {md(self.qk_head)}", "",
                 "| query writer | key writer | q·k part |", "|---|---|---:|"]
        lines += [f"| {md(q)} | {md(k)} | {v:+.4g} |" for q, k, v in self.qk_pairs]
        for side, rows in (("query", self.qk_query), ("key", self.qk_key)):
            lines += ["", f"| {side} writer | against the whole {'key' if side == 'query' else 'query'} |",
                      "|---|---:|"]
            lines += [f"| {md(name)} | {v:+.4g} |" for name, v in rows]
        return lines

    def _weights_table(self) -> list[str]:
        """A feature's de-embedding beside its strongest upstream features by virtual weight (none: no lines)."""
        if not (self.de_embedding or self.by_weights):
            return []
        glob = f", and by global weight (TWERA) over {self.global_tokens:,} tokens of context texts" \
            if self.by_global else ""
        lines = ["", "**By the weights alone** (any prompt): tokens whose embedding drives it, and upstream features "
                 f"by virtual weight (decoder · encoder through the residual stream){glob}", "",
                 "| token | weight | upstream feature | virtual weight |" + (" upstream feature | TWERA |" if glob else ""),
                 "|---|---:|---|---:|" + ("---|---:|" if glob else "")]
        columns = (self.de_embedding, self.by_weights) + ((self.by_global,) if glob else ())
        for row in zip_longest(*columns):  # a layer-0 feature has no upstream features
            cells = [f"{md(repr(t[0]) if i == 0 else t[0])} | {t[1]:+.3g}" if t else " | " for i, t in enumerate(row)]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def _contexts_table(self) -> list[str]:
        """Each top activating context with its token in bold, or why there are none."""
        if not self.contexts:
            return [self.note or "none found"]
        lines = ["| activation | context (… **token**) |", "|---:|---|"]
        for c in self.contexts:
            text, tok = shown(str(c["text"])), shown(str(c["token"]))
            head = text[: len(text) - len(tok)] if text.endswith(tok) else text
            lines.append(f"| {float(c['activation']):.3f} | …{md(head)}**{md(tok)}** |")
        return lines


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
        change = (f"top token **{md(repr(self.before[0][0]))} → {md(repr(self.after[0][0]))}**"
                  if self.top_changed else f"top token unchanged ({md(repr(self.before[0][0]))})")
        return (f"{self.n_interventions} feature interventions, {self.mode} mode: {change}\n\n"
                f"| | greedy continuation (open-loop replacement model, interventions held on) |\n|---|---|\n"
                f"| original | {md(shown(self.continuation_before))} |\n"
                f"| intervened | {md(shown(self.continuation_after))} |")


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
        from clt_hub.artifacts.hub import human_size

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
