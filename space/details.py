"""The details panel: what a clicked node (feature, error, token, logit or supernode) is and does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from clt_hub.errors import ConfigError
from space.config import capped
from space.text import short, shown
from space.views import NodeDetails

if TYPE_CHECKING:
    from space.config import Limits, Source
    from space.state import LoadedPair, Session


def checked_node_id(node_id: Any, max_name_chars: int) -> str:
    """A node id as the page's click script sends it (a visitor can send anything): text, and not too long."""
    if not isinstance(node_id, str):
        raise ConfigError(f"a node id is text, not {type(node_id).__name__}")
    return capped(node_id, "node id", max_name_chars + len("supernode:"), "MAX_NAME_CHARS")


GLOBAL_TOKENS = 2000  # tokens of the context texts a feature's global weights (TWERA) are taken over: about a second


def node_details(session: Session, node_id: str, load: Callable[[Source], LoadedPair], limits: Limits,
                 k: int = 8, texts: Callable[[LoadedPair], list[str] | None] | None = None) -> NodeDetails:
    """What the clicked node is and does; `load` gives the session's model (for a feature's logit effects), `texts`
    the pair's context texts (for a feature's global weights; None or no texts: not shown)."""
    if node_id.startswith("supernode:"):
        return _supernode_details(session, node_id.removeprefix("supernode:"), k)
    if node_id not in session.index:
        raise ConfigError(f"there is no node {node_id!r} in this graph; trace again")
    g = session.result.graph
    i = session.index[node_id]

    def strongest(values: torch.Tensor, exclude: int) -> list[tuple[str, float]]:
        values = values.clone()
        values[exclude] = 0
        top = values.abs().topk(min(k, len(values)))
        return [(session.describe(j), float(values[j])) for j, v in zip(top.indices.tolist(), top.values.tolist(),
                                                                        strict=True) if v > 0]

    inputs, outputs = strongest(g.incoming(i), i), strongest(g.outgoing(i), i)
    details = _node_details(session, node_id, i, inputs, outputs, load, limits, k, texts)
    return _with_qk(details, session, node_id)


def _with_qk(details: NodeDetails, session: Session, node_id: str) -> NodeDetails:
    """The node's QK tracing result (graph JSON's qk_tracing_results and qk_head), if the trace gave it one,
    each contributor named like other nodes (a graph node's name and label, or the contributor's own)."""
    r = session.result
    found = next((n for n in r.json["nodes"] if n["node_id"] == node_id and "qk_tracing_results" in n), None)
    if found is None:
        return details
    only = r.json.get("qk_only_nodes") or {}

    def name(cid: str) -> str:
        if cid in session.index:
            return session.describe(session.index[cid])
        return f"{cid} {only.get(cid, {}).get('clerp', '')}".strip()

    h, res = found["qk_head"], found["qk_tracing_results"]
    details.qk_head = (f"layer {h['layer']} head {h['head']}, query {h['query']} ({shown(r.tokens[h['query']])!r}) "
                       f"→ key {h['key']} ({shown(r.tokens[h['key']])!r}): score {h['score']:+.4g}, attention "
                       f"{h['attention']:.3f}; it carries {h['influence']:.3g} of the graph's cross-position "
                       "influence")
    details.qk_pairs = [(name(q), name(k), float(v)) for q, k, v in res["pair_wise_contributors"]]
    details.qk_query = [(name(c), float(v)) for c, v in res["top_q_marginal_contributors"]]
    details.qk_key = [(name(c), float(v)) for c, v in res["top_k_marginal_contributors"]]
    return details


def _node_details(session: Session, node_id: str, i: int, inputs: list[tuple[str, float]],
                  outputs: list[tuple[str, float]], load: Callable[[Source], LoadedPair], limits: Limits,
                  k: int, texts: Callable[[LoadedPair], list[str] | None] | None = None) -> NodeDetails:
    r = session.result
    g, p = r.graph, r.pruned
    rec = session.records[i]
    if i < g.n_features:
        layer, pos, feat = g.features[i].tolist()
        loaded = load(session.source)
        from clt_hub.attribution.descriptions import logit_effects
        from clt_hub.attribution.weights import (
            Ranked,
            de_embedding,
            global_weights,
            top_upstream,
            virtual_weights,
        )

        sample = texts(loaded) if texts is not None else None
        with loaded.lock:
            eff = logit_effects(loaded.model, loaded.transcoder, layer, torch.tensor([feat]))[0]
            de = de_embedding(loaded.model, loaded.transcoder, layer, feat, k=k, tokenizer=loaded.tokenizer).top
            ranked = top_upstream(virtual_weights(loaded.transcoder, layer, feat, loaded.model), k)
            glob = global_weights(loaded.model, loaded.tokenizer, loaded.transcoder, sample, layer, feat,
                                  GLOBAL_TOKENS, k=k) if sample and layer > 0 else None

        def strongest_of(r: Ranked) -> list[tuple[str, float]]:
            top = sorted(r.positive + r.negative, key=lambda u: -abs(u.weight))[:k]
            return [(f"L{u.layer}#{u.feature}", u.weight) for u in top]
        up, down = eff.topk(k), (-eff).topk(k)
        decode = loaded.tokenizer.decode
        has_texts = session.source.organism or bool(limits.context_texts)
        return NodeDetails(
            node_id, "feature", f"Feature {feat} at layer {layer}, position {pos} ({shown(r.tokens[pos])!r})",
            label=rec.get("clerp") or "", activation=float(g.activations[i]), influence=float(p.cumulative[i]),
            promotes=[(decode([int(t)]), float(v)) for v, t in zip(up.values, up.indices, strict=True)],
            suppresses=[(decode([int(t)]), -float(v)) for v, t in zip(down.values, down.indices, strict=True)],
            contexts=r.contexts.get(node_id, []), inputs=inputs, outputs=outputs,
            de_embedding=[(t.text or str(t.token), t.weight) for t in de],
            by_weights=strongest_of(ranked), by_global=strongest_of(glob.top_twera) if glob else [],
            global_tokens=glob.tokens if glob else 0,
            note="" if has_texts else "no context texts on this Space for this model (set $CLT_SPACE_CONTEXT_TEXTS)")
    if i < g.token_index(0):
        layer, pos = divmod(i - g.n_features, g.n_pos)
        return NodeDetails(node_id, "error", f"MLP reconstruction error at layer {layer}, position {pos}",
                           label="what the transcoder misses of this MLP output", inputs=inputs, outputs=outputs,
                           influence=float(p.cumulative[i]))
    if i < g.logit_index(0):
        pos = i - g.token_index(0)
        return NodeDetails(node_id, "token", f"Token {shown(r.tokens[pos])!r} at position {pos}", outputs=outputs,
                           influence=float(p.cumulative[i]))
    j = i - g.logit_index(0)
    return NodeDetails(node_id, "logit", f"Output {r.logit_texts[j]!r}", label=rec.get("clerp") or "",
                       probability=float(g.logit_probabilities[j]), inputs=inputs)

def _supernode_details(session: Session, name: str, k: int) -> NodeDetails:
    groups = {s[0]: s[1:] for s in session.supernodes}
    if name not in groups:
        raise ConfigError(f"there is no supernode {name!r}; the graph has: {', '.join(groups) or 'none'}")
    members = [session.index[n] for n in groups[name]]
    g = session.result.graph
    inside = torch.zeros(g.n_nodes, dtype=torch.bool)
    inside[members] = True
    group_out = g.outgoing(torch.tensor(members)) * ~inside   # the members' summed effect on each other node
    group_in = g.rows[inside[g.row_nodes]].sum(0) * ~inside   # each other node's summed effect on the members

    def top(v: torch.Tensor) -> list[tuple[str, float]]:
        t = v.abs().topk(min(k, len(v)))
        return [(session.describe(j), float(v[j])) for j, a in zip(t.indices.tolist(), t.values.tolist(),
                                                                   strict=True) if a > 0]

    acts = g.activations[[m for m in members if m < g.n_features]]
    return NodeDetails(f"supernode:{name}", "supernode", f"Supernode {name!r} ({len(members)} features)",
                       activation=float(acts.sum()) if len(acts) else None, members=groups[name],
                       inputs=top(group_in), outputs=top(group_out), note="activation: the sum over its members")

# -- the graph view --------------------------------------------------------------------------------
def node_choices(session: Session) -> list[tuple[str, str]]:
    """(label, node id) of kept features, most influential first, for the pickers."""
    return [(short(session.describe(session.index[n]), 80), n) for n in session.kept_features()]

