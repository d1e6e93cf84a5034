"""The attribution graph and the functions over it that everything else shares (normalisation, influence).

Node order is [features | errors | tokens | logits] and adjacency[target, source], as circuit-tracer's,
so a graph pruned here keeps the same nodes circuit-tracer would keep.
"""

from __future__ import annotations

import torch


class Graph:
    """An attribution graph over nodes [features | errors | tokens | logits].

    Only features and logits have incoming edges, so the edges are stored as `rows` [n_rows, n_nodes], the
    incoming edges of the nodes `row_nodes`: rows[r, j] is the direct effect of node j on node row_nodes[r].
    `adjacency` is the same as a dense square matrix [n_nodes, n_nodes] (rows are targets), built when asked
    for: the square over a long prompt's error and token nodes would not fit in memory, and pruning, scores
    and graph JSON never need it. A graph can also be made from a dense `adjacency` (then every node has a row).

    Features are (layer, pos, feature); errors are (layer, pos) flattened layer-major; tokens are positions;
    logits are token ids at the last position. `constants[i]` is what node i's value is made of besides its
    edges (biases, positional embeddings): value = sum of incoming edges + constant (+ dropped)."""

    def __init__(self, *, input_ids: torch.Tensor, features: torch.Tensor, activations: torch.Tensor,
                 logit_tokens: torch.Tensor, logit_probabilities: torch.Tensor, values: torch.Tensor,
                 constants: torch.Tensor, n_layers: int, n_pos: int, adjacency: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, row_nodes: torch.Tensor | None = None,
                 dropped: torch.Tensor | None = None, meta: dict | None = None):
        self.input_ids = input_ids
        self.features = features                      # [n_features, 3] (layer, pos, feature id)
        self.activations = activations                # [n_features]
        self.logit_tokens = logit_tokens              # [n_logits]
        self.logit_probabilities = logit_probabilities  # [n_logits]
        self.values = values                          # [n_nodes]: feature pre-activations, logits, 0 otherwise
        self.constants = constants                    # [n_nodes]
        self.n_layers, self.n_pos = n_layers, n_pos
        self.dropped = dropped                        # [n_nodes] effect of features left out by max_feature_nodes
        self.meta = meta if meta is not None else {}
        if (adjacency is None) == (rows is None):
            raise ValueError("give the edges as either adjacency (dense, square) or rows (+ row_nodes)")
        if adjacency is not None:
            rows, row_nodes = adjacency, torch.arange(adjacency.shape[0])
        elif row_nodes is None:  # features then logits, as attribution computes them
            row_nodes = torch.cat([torch.arange(self.n_features),
                                   torch.arange(self.logit_index(0), self.logit_index(self.n_logits))])
        assert rows is not None and row_nodes is not None
        self.rows, self.row_nodes = rows, row_nodes
        self._dense = adjacency

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return int(self.rows.shape[1])

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + i

    @property
    def adjacency(self) -> torch.Tensor:
        """[n_nodes, n_nodes], rows are targets (built from `rows` on first use; n_nodes^2 floats)."""
        if self._dense is None:
            self._dense = scatter_rows(self.rows, self.row_nodes, self.n_nodes)
        return self._dense

    def incoming(self, node: int) -> torch.Tensor:
        """[n_nodes]: the direct effect of every node on `node` (zeros for a node without inputs)."""
        hit = (self.row_nodes == node).nonzero()
        return self.rows[int(hit[0])] if len(hit) else torch.zeros(self.n_nodes, dtype=self.rows.dtype)


    def outgoing(self, nodes: torch.Tensor | int) -> torch.Tensor:
        """[n_nodes]: the summed direct effect of `nodes` on every node."""
        out = torch.zeros(self.n_nodes, dtype=self.rows.dtype)
        out[self.row_nodes] = self.rows[:, nodes].reshape(len(self.row_nodes), -1).sum(1)
        return out

    def block(self, nodes: torch.Tensor) -> torch.Tensor:
        """[k, k]: the edges among `nodes` (rows are targets), without building the square over all nodes."""
        return gather_block(self.rows, self.row_nodes, self.n_nodes, nodes)


def gather_block(rows: torch.Tensor, row_nodes: torch.Tensor, n_nodes: int, nodes: torch.Tensor) -> torch.Tensor:
    """The square matrix of `rows` (the rows of nodes `row_nodes`) restricted to `nodes`, in their order."""
    where = torch.full((n_nodes,), -1, dtype=torch.long)
    where[nodes] = torch.arange(len(nodes))
    has = where[row_nodes] >= 0
    out = torch.zeros(len(nodes), len(nodes), dtype=rows.dtype)
    out[where[row_nodes[has]]] = rows[has][:, nodes]
    return out


def scatter_rows(rows: torch.Tensor, row_nodes: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """The square matrix whose rows `row_nodes` are `rows` and whose other rows are zero."""
    dense = torch.zeros(n_nodes, rows.shape[1], dtype=rows.dtype)
    dense[row_nodes] = rows
    return dense


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
    w = torch.zeros(graph.n_nodes, dtype=graph.rows.dtype)
    w[graph.logit_index(0):] = graph.logit_probabilities.to(w.dtype)
    return w
