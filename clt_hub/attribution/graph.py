"""The attribution graph and the functions over it that everything else shares (normalisation, influence).

Node order is [features | errors | tokens | logits] and adjacency[target, source], as circuit-tracer's,
so a graph pruned here keeps the same nodes circuit-tracer would keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Graph:
    """Dense adjacency over nodes [features | errors | tokens | logits]; rows are targets.

    adjacency[i, j] is the direct effect of node j on node i. Features are (layer, pos, feature);
    errors are (layer, pos) flattened layer-major; tokens are positions; logits are token ids at the
    last position. `constants[i]` is what row i's value is made of besides its edges (biases,
    positional embeddings): value = sum(adjacency[i]) + constants[i]."""

    input_ids: torch.Tensor
    features: torch.Tensor           # [n_features, 3] (layer, pos, feature id)
    activations: torch.Tensor        # [n_features]
    logit_tokens: torch.Tensor       # [n_logits]
    logit_probabilities: torch.Tensor  # [n_logits]
    adjacency: torch.Tensor          # [n_nodes, n_nodes]
    values: torch.Tensor             # [n_nodes]: pre-activation of features, logit of logits, 0 otherwise
    constants: torch.Tensor          # [n_nodes]
    n_layers: int
    n_pos: int
    dropped: torch.Tensor | None = None  # [n_nodes] effect of features left out by max_feature_nodes
    meta: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + i


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with each target's incoming weights scaled to sum to one."""
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(a: torch.Tensor, weights: torch.Tensor, row_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """weights @ (A + A^2 + ...): each node's total influence on the weighted targets, over paths of any
    length (A normalised, rows are targets). The graph is acyclic, so the series ends after its depth.

    With `row_nodes`, `a` holds only the rows of those nodes (every other row is zero) and `weights`
    lives on them: attribution ranks features this way from the rows it has computed so far.
    Pass A transposed to propagate the other way (from sources towards targets)."""
    total = torch.zeros(a.shape[1], dtype=a.dtype)
    term = weights @ a
    for _ in range(a.shape[0] + 1):
        if not bool(term.any()):
            return total
        total = total + term
        term = (term if row_nodes is None else term[row_nodes]) @ a
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def logit_weights(graph: Graph) -> torch.Tensor:
    """Each node's weight as an output: the logit probabilities on logit nodes, zero elsewhere."""
    w = torch.zeros(graph.adjacency.shape[0], dtype=graph.adjacency.dtype)
    w[graph.logit_index(0):] = graph.logit_probabilities.to(w.dtype)
    return w
