"""Pruning and graph scores (the paper's definitions, on `clt_hub.attribution.graph`'s influence)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from clt_hub.attribution.graph import (
    Graph,
    gather_block,
    influence,
    logit_weights,
    normalized,
    scatter_rows,
)
from clt_hub.attribution.options import TraceOptions


def cutoff(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the top scores that together hold `fraction` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)).item()),
            len(ordered) - 1)
    return ordered[i]


@dataclass
class Pruned:
    """What pruning keeps. Edges are stored like the graph's: `edges` [n_rows, n_nodes] for the graph's
    `row_nodes`; `edge_mask` is the dense square view, built when asked for."""

    node_mask: torch.Tensor       # [n_nodes] bool
    edges: torch.Tensor           # [n_rows, n_nodes] bool
    cumulative: torch.Tensor      # [n_nodes] cumulative influence fraction of each node
    row_nodes: torch.Tensor       # [n_rows] the node each edge row enters

    @property
    def edge_mask(self) -> torch.Tensor:
        """[n_nodes, n_nodes] bool, rows are targets."""
        return scatter_rows(self.edges, self.row_nodes, len(self.node_mask))

    def incoming(self, node: int) -> torch.Tensor:
        """[n_nodes] bool: the kept edges into `node`."""
        hit = (self.row_nodes == node).nonzero()
        return self.edges[int(hit[0])] if len(hit) else torch.zeros(len(self.node_mask), dtype=torch.bool)

    def block(self, nodes: torch.Tensor) -> torch.Tensor:
        """[k, k] bool: the kept edges among `nodes` (rows are targets)."""
        return gather_block(self.edges, self.row_nodes, len(self.node_mask), nodes)

    def kept_edges(self, graph: Graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target nodes, source nodes, weights) of every kept edge."""
        r, src = self.edges.nonzero(as_tuple=True)
        return self.row_nodes[r], src, graph.rows[r, src]


def _influence(a: torch.Tensor, row_nodes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Influence over all nodes on the weighted nodes `w`, from normalised rows `a` of `row_nodes`."""
    return influence(a, w[row_nodes], row_nodes)


def prune(graph: Graph, node_threshold: float = TraceOptions.node_threshold,
          edge_threshold: float = TraceOptions.edge_threshold) -> Pruned:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    rows, row_nodes = graph.rows, graph.row_nodes
    w = logit_weights(graph)
    node_inf = _influence(normalized(rows), row_nodes, w)
    keep = node_inf >= cutoff(node_inf, node_threshold)
    first_token = graph.token_index(0)
    keep[first_token:] = True  # tokens and logits are always kept
    sub_norm = normalized(rows * keep[row_nodes][:, None] * keep[None, :])
    edge_scores = sub_norm * (_influence(sub_norm, row_nodes, w) + w)[row_nodes][:, None]
    edges = edge_scores >= cutoff(edge_scores.flatten(), edge_threshold)
    nf = graph.n_features
    while True:  # drop features/errors left without outputs, features left without inputs
        before = keep.clone()
        edges &= keep[row_nodes][:, None] & keep[None, :]
        keep[:first_token] &= edges[:, :first_token].any(0)
        has_inputs = torch.zeros_like(keep)
        has_inputs[row_nodes] = edges.any(1)
        keep[:nf] &= has_inputs[:nf]
        if torch.equal(before, keep):
            break
    order = node_inf.argsort(descending=True)
    cum = torch.zeros_like(node_inf)
    cum[order] = node_inf[order].cumsum(0) / node_inf.sum().clamp(min=1e-30)
    return Pruned(keep, edges & keep[row_nodes][:, None] & keep[None, :], cum, row_nodes)


class Scores(NamedTuple):
    replacement: float   # token influence / (token + error influence)
    completeness: float  # influence-weighted share of node inputs not coming from error nodes


def _completeness(a: torch.Tensor, row_nodes: torch.Tensor, weight: torch.Tensor, unexplained: torch.Tensor
                  ) -> torch.Tensor:
    """Sum over nodes of (1 - share of its normalised inputs from `unexplained` nodes) * weight, over the total
    weight. A node without inputs (a row of zeros) has no unexplained share."""
    share = torch.zeros_like(weight)
    share[row_nodes] = a[:, unexplained].sum(1)
    return ((1 - share) * weight).sum() / weight.sum()


def scores(graph: Graph) -> Scores:
    w = logit_weights(graph)
    a = normalized(graph.rows)
    inf = _influence(a, graph.row_nodes, w)
    e0, e1 = graph.n_features, graph.n_features + graph.n_errors
    t1 = e1 + graph.n_pos
    token_inf, error_inf = inf[e1:t1].sum(), inf[e0:e1].sum()
    replacement = token_inf / (token_inf + error_inf).clamp(min=1e-30)
    errors = torch.zeros(graph.n_nodes, dtype=torch.bool)
    errors[e0:e1] = True
    return Scores(float(replacement), float(_completeness(a, graph.row_nodes, inf + w, errors)))


def subgraph_scores(graph: Graph, features: torch.Tensor | list[int]) -> Scores:
    """Scores of a chosen set of feature nodes (indices into graph.features), as if every feature
    outside it were an error node: how much of the token-to-logit influence the chosen circuit
    carries, and how completely its nodes' inputs are explained. With every feature chosen this is
    `scores(graph)`."""
    chosen = torch.zeros(graph.n_nodes, dtype=torch.bool)
    chosen[torch.as_tensor(features, dtype=torch.long)] = True
    first_token = graph.token_index(0)
    explained = chosen.clone()
    explained[first_token:] = True                      # tokens and logits
    a = normalized(graph.rows) * explained[graph.row_nodes][:, None]  # only chosen nodes and logits pass influence on
    w = logit_weights(graph)
    inf = _influence(a, graph.row_nodes, w)
    token_inf = inf[first_token:graph.logit_index(0)].sum()
    unexplained = ~explained
    unexplained_inf = inf[unexplained].sum()
    replacement = token_inf / (token_inf + unexplained_inf).clamp(min=1e-30)
    # outside nodes count like error nodes: no explained inputs, full own share
    return Scores(float(replacement), float(_completeness(a, graph.row_nodes, inf + w, unexplained)))
