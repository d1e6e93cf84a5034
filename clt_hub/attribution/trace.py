"""One call from a prompt to a pruned, scored, exported attribution graph (what `clt-hub trace` runs)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.descriptions import Context, clerps, top_contexts
from clt_hub.attribution.graph import Graph
from clt_hub.attribution.graph_json import save, to_json
from clt_hub.attribution.options import DEFAULT_OPTIONS, TraceOptions
from clt_hub.attribution.pruning import Pruned, Scores, prune, scores
from clt_hub.attribution.qk import QKSelection, check_supported, qk_json, record_qk, select_qk
from clt_hub.attribution.supernodes import feature_node_ids, suggest
from clt_hub.attribution.targets import Target, logit_difference_target, token_target
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
    qk: list[QKSelection] = field(default_factory=list)  # the scores QK tracing explained (options.qk)

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
        if self.qk:
            lines += ["", "QK tracing (heads carrying the most cross-position influence; graph.json qk_tracing_results):"]
            lines += [f"  L{c.layer} head {c.head}: {self.tokens[c.query]!r}@{c.query} -> {self.tokens[c.key]!r}@{c.key}"
                      f"  influence {c.influence:.4f}, on {self.node_name(c.node)}" for c in self.qk]
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


def trace(prompt: str, model: Any, tokenizer: Any, transcoder: Transcoder, options: TraceOptions = DEFAULT_OPTIONS,
          *, context_texts: Iterable[str] | None = None, transcoder_name: str = "", scan: str = "",
          progress: bool = False) -> TraceResult:
    """Attribute `prompt`, prune, label, group and export: everything `clt-hub trace` writes. `options`: how (checked
    when made); `context_texts`: documents to find each kept feature's top activating contexts in;
    `transcoder_name` and `scan` (default: the transcoder's model) name the inputs in the graph JSON."""
    ids = encode_prompt(tokenizer, prompt, context_length(model))  # a long prompt is refused before tokenising
    custom = custom_targets(model, tokenizer, options)
    if options.qk:
        check_supported(model, transcoder)  # before attribution, which a refusal would waste
    graph = attribute(model, transcoder, ids, max_logits=options.max_logits, logit_cumulative=options.logit_cumulative,
                      batch_size=options.batch_size, max_memory_bytes=options.max_memory_bytes,
                      custom_targets=custom or None, progress=progress, max_feature_nodes=options.max_feature_nodes)
    pruned = prune(graph, options.node_threshold, options.edge_threshold)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    logit_texts = [t.label for t in custom] or [tokenizer.decode([t]) for t in graph.logit_tokens.tolist()]
    kept_features = graph.features[pruned.node_mask[: graph.n_features]]
    found = _contexts(model, tokenizer, transcoder, kept_features, context_texts, options.max_context_texts, progress)
    labels = clerps(model, tokenizer, transcoder, kept_features, contexts=found) if len(kept_features) else {}
    groups = suggest(graph, pruned, labels=labels)
    chosen, qk = _trace_qk(model, transcoder, ids, graph, pruned, options.qk)
    data = to_json(graph, tokens, prompt=prompt, slug=options.slug, clerps=labels,
                   supernodes=groups if options.supernodes else (), scan=scan or transcoder.cfg.model_name,
                   transcoder_list=[transcoder_name] if transcoder_name else [], node_threshold=options.node_threshold,
                   edge_threshold=options.edge_threshold, logit_texts=logit_texts, pruned=pruned, qk=qk)
    return TraceResult(prompt, tokens, graph, pruned, scores(graph), logit_texts, data, groups,
                       _by_node(found, kept_features), chosen)


def _trace_qk(model: Any, transcoder: Transcoder, ids: torch.Tensor, graph: Graph, pruned: Pruned,
              n: int) -> tuple[list[QKSelection], dict[str, Any] | None]:
    """The `n` (layer, head, query, key) that carry the most kept cross-position influence, explained (n = 0:
    nothing, not even the recording pass). One more forward pass, then one `qk_query` per (layer, query)."""
    if not n:
        return [], None
    rec = record_qk(model, transcoder, ids)
    chosen = select_qk(graph, pruned, rec, n)
    return chosen, qk_json(rec, graph, pruned, chosen)


def custom_targets(model: Any, tokenizer: Any, options: TraceOptions) -> list[Target]:
    """The output nodes `options` asks for (its targets, then its logit differences); empty: the top logits."""
    target_tokens, diff_tokens = target_ids(tokenizer, list(options.targets), list(options.logit_diffs))
    custom = [token_target(model, tid, repr(t)) for t, tid in zip(options.targets, target_tokens, strict=True)]
    custom += [logit_difference_target(model, ia, ib, f"{a!r} - {b!r}")
               for (a, b), (ia, ib) in zip(options.logit_diffs, diff_tokens, strict=True)]
    return custom


def _by_node(found: dict[tuple[int, int], list[Context]], kept_features: torch.Tensor) -> dict[str, list[dict[str, Any]]]:
    """The contexts found, by graph JSON node id ({} when none were searched for)."""
    if not found:
        return {}
    return {f"{l}_{f}_{p}": [asdict(c) for c in found.get((l, f), [])] for l, p, f in kept_features.tolist()}


def _contexts(model: Any, tokenizer: Any, transcoder: Transcoder, kept_features: torch.Tensor,
              context_texts: Iterable[str] | None, max_texts: int, progress: bool) -> dict[tuple[int, int], list[Context]]:
    """Each kept feature's top activating contexts in `context_texts` ({} without texts or kept features)."""
    if context_texts is None or not len(kept_features):
        return {}
    pairs = [(l, f) for l, _, f in kept_features.tolist()]
    return top_contexts(model, tokenizer, transcoder, context_texts, pairs, max_texts=max_texts, progress=progress)


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
