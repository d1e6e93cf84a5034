"""Our pruning and scores against circuit-tracer's on the same random attribution-shaped graphs.

Run in circuit-tracer's venv (`python3 -m nox -s peer`). Exits non-zero on any disagreement. `--smoke`: 3 graphs
instead of 20.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from circuit_tracer.graph import compute_graph_scores, prune_graph

sys.path.insert(0, str(Path(__file__).parents[1]))
from clt_hub.attribution.graph import Graph  # noqa: E402
from clt_hub.attribution.pruning import prune, scores  # noqa: E402


def random_graph(seed: int, n_features: int = 60, n_layers: int = 3, n_pos: int = 6, n_logits: int = 4) -> Graph:
    g = torch.Generator().manual_seed(seed)
    n = n_features + n_layers * n_pos + n_pos + n_logits
    adj = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.3)
    # acyclic: features/logits read only from lower indices among features, any error/token
    order = torch.arange(n)
    src_is_feature = order[None, :] < n_features
    adj = adj * ((order[None, :] < order[:, None]) | ~src_is_feature)
    adj[n_features:n_features + n_layers * n_pos + n_pos] = 0  # errors and tokens have no inputs
    adj[:, n - n_logits:] = 0                                 # logits have no outputs
    probs = torch.rand(n_logits, generator=g)
    probs = probs / probs.sum() * 0.9
    i = torch.arange(n_features)  # distinct (layer, position, feature) triples: node ids must be unique
    features = torch.stack([i % n_layers, i % n_pos, i], dim=1)
    return Graph(input_ids=torch.zeros(n_pos, dtype=torch.long), features=features,
                 activations=torch.ones(n_features), logit_tokens=torch.arange(n_logits), logit_probabilities=probs,
                 adjacency=adj, values=torch.zeros(n), constants=torch.zeros(n), n_layers=n_layers, n_pos=n_pos)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="3 random graphs instead of 20")
    n_graphs = 3 if ap.parse_args().smoke else 20
    worst_scores, mismatched = 0.0, 0
    for seed in range(n_graphs):
        ours = random_graph(seed)
        theirs = SimpleNamespace(input_tokens=ours.input_ids, logit_targets=list(range(ours.n_logits)),
                                 selected_features=torch.zeros(ours.n_features), adjacency_matrix=ours.adjacency,
                                 logit_probabilities=ours.logit_probabilities, cfg=SimpleNamespace(n_layers=ours.n_layers))
        for nt, et in ((0.8, 0.98), (0.5, 0.9)):
            a, b = prune(ours, nt, et), prune_graph(theirs, nt, et)
            mismatched += int(not torch.equal(a.node_mask, b.node_mask)) + int(not torch.equal(a.edge_mask, b.edge_mask))
        s, t = scores(ours), compute_graph_scores(theirs)
        worst_scores = max(worst_scores, abs(s.replacement - t[0]), abs(s.completeness - t[1]))
    # our graph JSON validates against circuit-tracer's own pydantic schema for the frontend
    from circuit_tracer.frontend.graph_models import Model

    from clt_hub.attribution.graph_json import to_json

    graph = random_graph(0)
    Model.model_validate(to_json(graph, [f"t{i}" for i in range(graph.n_pos)]))
    print("graph JSON validates against circuit_tracer.frontend.graph_models.Model")
    print(f"{n_graphs} random graphs x 2 threshold pairs: node/edge mask mismatches {mismatched}; "
          f"max |score difference| {worst_scores:.2e}")
    return 0 if mismatched == 0 and worst_scores < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
