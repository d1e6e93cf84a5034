"""Pruning and graph scores (the paper's definitions, on `clt_hub.attribution.graph`'s influence)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from clt_hub.attribution.graph import Graph, influence, logit_weights, normalized


def cutoff(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the top scores that together hold `fraction` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)).item()),
            len(ordered) - 1)
    return ordered[i]


class Pruned(NamedTuple):
    node_mask: torch.Tensor       # [n_nodes] bool
    edge_mask: torch.Tensor       # [n_nodes, n_nodes] bool
    cumulative: torch.Tensor      # [n_nodes] cumulative influence fraction of each node


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    w = logit_weights(graph)
    node_inf = influence(normalized(graph.adjacency), w)
    keep = node_inf >= cutoff(node_inf, node_threshold)
    first_token = graph.token_index(0)
    keep[first_token:] = True  # tokens and logits are always kept
    sub = graph.adjacency * keep[:, None] * keep[None, :]
    sub_norm = normalized(sub)
    edge_scores = sub_norm * (influence(sub_norm, w) + w)[:, None]
    edges = edge_scores >= cutoff(edge_scores.flatten(), edge_threshold)
    nf = graph.n_features
    while True:  # drop features/errors left without outputs, features left without inputs
        before = keep.clone()
        edges &= keep[:, None] & keep[None, :]
        keep[:first_token] &= edges[:, :first_token].any(0)
        keep[:nf] &= edges[:nf].any(1)
        if torch.equal(before, keep):
            break
    order = node_inf.argsort(descending=True)
    cum = torch.zeros_like(node_inf)
    cum[order] = node_inf[order].cumsum(0) / node_inf.sum().clamp(min=1e-30)
    return Pruned(keep, edges & keep[:, None] & keep[None, :], cum)


class Scores(NamedTuple):
    replacement: float   # token influence / (token + error influence)
    completeness: float  # influence-weighted share of node inputs not coming from error nodes


def scores(graph: Graph) -> Scores:
    w = logit_weights(graph)
    a = normalized(graph.adjacency)
    inf = influence(a, w)
    e0, e1 = graph.n_features, graph.n_features + graph.n_errors
    t1 = e1 + graph.n_pos
    token_inf, error_inf = inf[e1:t1].sum(), inf[e0:e1].sum()
    replacement = token_inf / (token_inf + error_inf).clamp(min=1e-30)
    weight = inf + w
    completeness = ((1 - a[:, e0:e1].sum(1)) * weight).sum() / weight.sum()
    return Scores(float(replacement), float(completeness))


def subgraph_scores(graph: Graph, features: torch.Tensor | list[int]) -> Scores:
    """Scores of a chosen set of feature nodes (indices into graph.features), as if every feature
    outside it were an error node: how much of the token-to-logit influence the chosen circuit
    carries, and how completely its nodes' inputs are explained. With every feature chosen this is
    `scores(graph)`."""
    chosen = torch.zeros(graph.adjacency.shape[0], dtype=torch.bool)
    chosen[torch.as_tensor(features, dtype=torch.long)] = True
    first_token = graph.token_index(0)
    explained = chosen.clone()
    explained[first_token:] = True                      # tokens and logits
    a = normalized(graph.adjacency)
    a = a * explained[:, None]                          # only chosen nodes and logits pass influence on
    w = logit_weights(graph)
    inf = influence(a, w)
    token_inf = inf[first_token:graph.logit_index(0)].sum()
    unexplained = ~explained
    unexplained_inf = inf[unexplained].sum()
    replacement = token_inf / (token_inf + unexplained_inf).clamp(min=1e-30)
    weight = inf + w  # outside nodes count like error nodes: no explained inputs, full own share
    completeness = ((1 - a[:, unexplained].sum(1)) * weight).sum() / weight.sum()
    return Scores(float(replacement), float(completeness))
