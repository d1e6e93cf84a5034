"""One call from a prompt to a pruned, scored, exported attribution graph (what `clt-hub trace` runs)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clt_hub.attribution.attribute import attribute, check_counts
from clt_hub.attribution.graph import Graph
from clt_hub.attribution.graph_json import save, to_json
from clt_hub.attribution.pruning import Pruned, Scores, prune, scores
from clt_hub.attribution.supernodes import feature_node_ids
from clt_hub.errors import ConfigError
from clt_hub.models.loading import context_length, encode_prompt
from clt_hub.transcoders.transcoder import Transcoder


@dataclass
class TraceResult:
    prompt: str
    tokens: list[str]
    graph: Graph
    pruned: Pruned
    scores: Scores
    logit_texts: list[str]
    json: dict[str, Any]
    suggested_supernodes: list[list[str]]
    contexts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # node id -> top contexts

    def summary(self, top: int = 10) -> str:
        g, p = self.graph, self.pruned
        lines = [f"prompt: {self.prompt!r} ({len(self.tokens)} tokens)", "", "targets (weight):"]
        for text, prob in zip(self.logit_texts, g.logit_probabilities.tolist(), strict=True):
            lines.append(f"  {text!r:>16}  p={prob:.3f}")
        lines += ["", f"replacement score {self.scores.replacement:.3f}   completeness score {self.scores.completeness:.3f}",
                  f"nodes: {g.n_features} active features, kept {int(p.node_mask[:g.n_features].sum())} features; "
                  f"{int(p.edges.sum())} edges kept", "", "most influential features (layer, position, feature):"]
        feats = sorted(range(g.n_features), key=lambda i: float(p.cumulative[i]))[:top]
        for i in feats:
            layer, pos, feat = g.features[i].tolist()
            lines.append(f"  L{layer} pos {pos} ({self.tokens[pos]!r}) #{feat}  act {float(g.activations[i]):.3f}  "
                         f"cumulative influence {float(p.cumulative[i]):.3f}")
        lines += ["", "strongest path into the top logit:"]
        lines.append("  " + " <- ".join(self._path()))
        if self.suggested_supernodes:
            lines += ["", "suggested supernodes (features with alike outgoing effects):"]
            lines += [f"  {g[0]}: {', '.join(g[1:])}" for g in self.suggested_supernodes[:top]]
        return "\n".join(lines)

    def node_name(self, i: int) -> str:
        """Short name of node i: L{layer}#{feature}@{pos}, err L{layer}@{pos}, tok 'x', logit 'x'."""
        g = self.graph
        if i < g.n_features:
            layer, pos, feat = g.features[i].tolist()
            return f"L{layer}#{feat}@{pos}"
        if i < g.token_index(0):
            layer, pos = divmod(i - g.n_features, g.n_pos)
            return f"err L{layer}@{pos}"
        if i < g.logit_index(0):
            return f"tok {self.tokens[i - g.token_index(0)]!r}"
        return f"logit {self.logit_texts[i - g.logit_index(0)]!r}"

    def _path(self) -> list[str]:
        g, p = self.graph, self.pruned
        node = g.logit_index(0)
        path = [self.node_name(node)]
        for _ in range(g.n_layers + 3):
            weights = g.incoming(node).abs() * p.incoming(node)
            if not bool(weights.any()):
                break
            node = int(weights.argmax())
            path.append(self.node_name(node))
            if node >= g.token_index(0):
                break
        return path


def single_token(tokenizer: Any, text: str) -> int:
    """The one token `text` is, refusing text of several tokens, of none, or that the tokenizer does not know (a
    word-level vocabulary reads it as its unknown token: a target nobody asked for)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"target {text!r} is {len(ids)} tokens {pieces}, not one; pick a single token "
                          "(often with a leading space, e.g. ' Austin')")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and text.strip() != tokenizer.unk_token:
        raise ConfigError(f"target {text!r} is not in this tokenizer's vocabulary (it would read as "
                          f"{tokenizer.unk_token!r}); pick a word the model knows")
    return int(ids[0])


def check_fraction(name: str, value: Any) -> None:
    """A pruning threshold: a fraction of influence, 0 to 1 (NaN and infinities refused). The CLI, the Python API
    and the Space check the same rule with this."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} is a fraction of influence between 0 and 1, not {value!r}")


def check_options(node_threshold: float, edge_threshold: float, max_logits: int = 10, batch_size: int = 64,
                  max_feature_nodes: int | None = None, targets: list[str] | None = None,
                  logit_diffs: list[tuple[str, str]] | None = None) -> None:
    """Tracing options, checked before any work (a bad one would otherwise fail after attribution). Targets are
    checked here as texts (distinct, not empty); `target_ids` checks them against the tokenizer."""
    check_fraction("node_threshold", node_threshold)
    check_fraction("edge_threshold", edge_threshold)
    check_counts(max_logits, batch_size, max_feature_nodes)
    seen: set[Any] = set()
    for text in targets or []:
        if text in seen:
            raise ConfigError(f"target {text!r} is given twice; give each target once")
        seen.add(text)
    for a, b in logit_diffs or []:
        if a == b:
            raise ConfigError(f"logit difference {a!r} - {b!r} compares a token with itself (always 0); give two "
                              "different tokens, e.g. ' Austin| Dallas'")
        if (a, b) in seen:
            raise ConfigError(f"logit difference {a!r} - {b!r} is given twice; give each once")
        seen.add((a, b))


def target_ids(tokenizer: Any, targets: list[str] | None = None,
               logit_diffs: list[tuple[str, str]] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """The token of each target and of each side of each logit difference, each a single token the tokenizer
    knows; two texts that are the same token count as the same target (refused)."""
    ids = [single_token(tokenizer, t) for t in targets or []]
    pairs = [(single_token(tokenizer, a), single_token(tokenizer, b)) for a, b in logit_diffs or []]
    names: dict[int, str] = {}
    for text, tid in zip(targets or [], ids, strict=True):
        if tid in names:
            raise ConfigError(f"targets {names[tid]!r} and {text!r} are the same token; give each target once")
        names[tid] = text
    for (a, b), (ia, ib) in zip(logit_diffs or [], pairs, strict=True):
        if ia == ib:
            raise ConfigError(f"logit difference {a!r} - {b!r} compares a token with itself (both are token "
                              f"{ia}); give two different tokens")
    if len(set(pairs)) < len(pairs):
        raise ConfigError("two logit differences are the same pair of tokens; give each once")
    return ids, pairs


def trace(prompt: str, model: Any, tokenizer: Any, transcoder: Transcoder, *, node_threshold: float = 0.8,
          edge_threshold: float = 0.98, max_logits: int = 10, batch_size: int = 64, slug: str = "graph",
          scan: str = "", transcoder_name: str = "", targets: list[str] | None = None,
          logit_diffs: list[tuple[str, str]] | None = None, progress: bool = False,
          supernodes: bool = False, max_feature_nodes: int | None = None,
          context_texts: Iterable[str] | None = None, max_context_texts: int = 1000) -> TraceResult:
    """`targets`: single-token texts to attribute instead of the top logits; `logit_diffs`: (a, b) pairs;
    `context_texts`: documents to find each kept feature's top activating contexts in."""
    from clt_hub.attribution.targets import Target, logit_difference_target, token_target

    check_options(node_threshold, edge_threshold, max_logits, batch_size, max_feature_nodes, targets, logit_diffs)
    ids = encode_prompt(tokenizer, prompt, context_length(model))  # a long prompt is refused before tokenising
    target_tokens, diff_tokens = target_ids(tokenizer, targets, logit_diffs)
    custom: list[Target] = [token_target(model, tid, repr(t)) for t, tid in zip(targets or [], target_tokens, strict=True)]
    custom += [logit_difference_target(model, ia, ib, f"{a!r} - {b!r}")
               for (a, b), (ia, ib) in zip(logit_diffs or [], diff_tokens, strict=True)]
    graph = attribute(model, transcoder, ids, max_logits=max_logits, batch_size=batch_size,
                      custom_targets=custom or None, progress=progress, max_feature_nodes=max_feature_nodes)
    pruned = prune(graph, node_threshold, edge_threshold)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    logit_texts = ([t.label for t in custom] if custom else
                   [tokenizer.decode([t]) for t in graph.logit_tokens.tolist()])
    from clt_hub.attribution.descriptions import clerps

    kept_features = graph.features[pruned.node_mask[: graph.n_features]]
    found = {}
    if context_texts is not None and len(kept_features):
        from clt_hub.attribution.descriptions import top_contexts

        pairs = [(l, f) for l, _, f in kept_features.tolist()]
        found = top_contexts(model, tokenizer, transcoder, context_texts, pairs, max_texts=max_context_texts,
                             progress=progress)
    labels = clerps(model, tokenizer, transcoder, kept_features, contexts=found) if len(kept_features) else {}
    by_node = {f"{l}_{f}_{p}": [asdict(c) for c in found.get((l, f), [])] for l, p, f in kept_features.tolist()}
    from clt_hub.attribution.supernodes import suggest

    groups = suggest(graph, pruned, labels=labels)
    data = to_json(graph, tokens, prompt=prompt, slug=slug, clerps=labels, supernodes=groups if supernodes else (), scan=scan or transcoder.cfg.model_name,
                   transcoder_list=[transcoder_name] if transcoder_name else [], node_threshold=node_threshold,
                   edge_threshold=edge_threshold, logit_texts=logit_texts, pruned=pruned)
    return TraceResult(prompt, tokens, graph, pruned, scores(graph), logit_texts, data, groups,
                       by_node if found else {})


def write(result: TraceResult, out_dir: str | os.PathLike[str]) -> Path:
    """graph.json, summary.txt, graph.png (without matplotlib: skipped) and contexts.json when found."""
    from clt_hub.attribution.graph_png import plot_graph

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save(result.json, out / "graph.json")
    (out / "summary.txt").write_text(result.summary() + "\n")
    nodes = {n: i for i, n in enumerate(feature_node_ids(result.graph))}
    groups = {g[0]: [nodes[m] for m in g[1:] if m in nodes] for g in result.json["qParams"]["supernodes"]}
    plot_graph(result.graph, result.pruned, result.tokens, out / "graph.png", supernodes=groups,
               title=result.prompt.replace("\n", " \\n ")[:90], logit_texts=result.logit_texts)
    if result.contexts:
        import json

        (out / "contexts.json").write_text(json.dumps(result.contexts, indent=1, ensure_ascii=False) + "\n")
    return out
