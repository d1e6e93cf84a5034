"""Graph conventions shared by the peer scripts (imports clt_hub only, so a process measuring clt_hub loads
nothing of the other tool)."""

from __future__ import annotations

from clt_hub.attribution.graph import Graph


def bos_errors_zeroed(graph: Graph) -> Graph:
    """A copy without edges from the position-0 error nodes: circuit-tracer zeroes the error vectors at BOS
    (as well as the features there), clt_hub keeps them so that every value is the sum of its edges; scores
    are compared under circuit-tracer's convention."""
    rows = graph.rows.clone()
    rows[:, [graph.error_index(l, 0) for l in range(graph.n_layers)]] = 0
    return Graph(input_ids=graph.input_ids, features=graph.features, activations=graph.activations,
                 logit_tokens=graph.logit_tokens, logit_probabilities=graph.logit_probabilities, values=graph.values,
                 constants=graph.constants, n_layers=graph.n_layers, n_pos=graph.n_pos, rows=rows,
                 row_nodes=graph.row_nodes, dropped=graph.dropped, meta=graph.meta)
