"""Influence, pruning and scores on hand-built graphs whose answers are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from clt_hub.attribution.graph import Graph, influence, normalized
from clt_hub.attribution.pruning import prune, scores

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


def hand_graph(adj_edges: dict[tuple[int, int], float], n_features: int, n_layers: int, n_pos: int,
               probs: list[float]) -> Graph:
    n = n_features + n_layers * n_pos + n_pos + len(probs)
    adj = torch.zeros(n, n)
    for (t, s), w in adj_edges.items():
        adj[t, s] = w
    return Graph(input_ids=torch.zeros(n_pos, dtype=torch.long),
                 features=torch.zeros(n_features, 3, dtype=torch.long), activations=torch.ones(n_features),
                 logit_tokens=torch.arange(len(probs)), logit_probabilities=torch.tensor(probs),
                 adjacency=adj, values=torch.zeros(n), constants=torch.zeros(n), n_layers=n_layers, n_pos=n_pos)


# nodes: f0 f1 | e(0,0) | tok0 | logit0 ; f0 <- tok0 (1.0), f1 <- tok0 (1.0),
# logit <- f0 (3.0), f1 (-1.0), e (0.0 -> later), tok0 directly (0)
F0, F1, E, TOK, LOGIT = 0, 1, 2, 3, 4


def test_influence_by_hand() -> None:
    g = hand_graph({(F0, TOK): 1.0, (F1, TOK): 2.0, (LOGIT, F0): 3.0, (LOGIT, F1): -1.0}, 2, 1, 1, [1.0])
    a = normalized(g.adjacency)
    torch.testing.assert_close(a[LOGIT, :4], torch.tensor([0.75, 0.25, 0.0, 0.0]))
    inf = influence(a, torch.tensor([0, 0, 0, 0, 1.0]))
    # f0: 0.75, f1: 0.25, token: 0.75 * 1 + 0.25 * 1 = 1.0 (each feature's only input is the token)
    torch.testing.assert_close(inf, torch.tensor([0.75, 0.25, 0.0, 1.0, 0.0]))


def test_scores_by_hand() -> None:
    # logit <- f0 (3), error (1); f0 <- token (1) : token influence 0.75, error influence 0.25
    g = hand_graph({(F0, TOK): 1.0, (LOGIT, F0): 3.0, (LOGIT, E): 1.0}, 2, 1, 1, [1.0])
    s = scores(g)
    assert abs(s.replacement - 0.75) < 1e-6
    # completeness: weights (influence + logit weight): f0 0.75, error 0.25, token 0.75, logit 1
    # non-error fraction of inputs: f0 1, logit 0.75, error/token 1 (no inputs)
    expected = (1 * 0.75 + 1 * 0.25 + 1 * 0.75 + 0.75 * 1.0) / (0.75 + 0.25 + 0.75 + 1.0)
    assert abs(s.completeness - expected) < 1e-6
    perfect = scores(hand_graph({(F0, TOK): 1.0, (LOGIT, F0): 1.0}, 2, 1, 1, [1.0]))
    assert perfect == (1.0, 1.0)


def test_prune_drops_weak_and_dangling_nodes() -> None:
    # f0 carries 90% of the logit, f1 10%; f1 falls under an 0.8 node threshold
    g = hand_graph({(F0, TOK): 1.0, (F1, TOK): 1.0, (LOGIT, F0): 9.0, (LOGIT, F1): 1.0}, 2, 1, 1, [1.0])
    p = prune(g, node_threshold=0.8, edge_threshold=0.98)
    assert p.node_mask.tolist() == [True, False, False, True, True]
    assert p.edge_mask[LOGIT, F0] and p.edge_mask[F0, TOK] and not p.edge_mask[LOGIT, F1]
    # with thresholds 1.0 everything with influence stays
    assert prune(g, 1.0, 1.0).node_mask[[F0, F1]].all()


def test_subgraph_scores() -> None:
    from clt_hub.attribution.pruning import subgraph_scores

    # logit <- f0 (3), f1 (1); f0, f1 <- token
    g = hand_graph({(F0, TOK): 1.0, (F1, TOK): 1.0, (LOGIT, F0): 3.0, (LOGIT, F1): 1.0}, 2, 1, 1, [1.0])
    full = subgraph_scores(g, [F0, F1])
    assert full == scores(g)
    only_f0 = subgraph_scores(g, [F0])
    # f1 becomes unexplained: token influence 0.75 (through f0), unexplained 0.25
    assert abs(only_f0.replacement - 0.75) < 1e-6
    # completeness, weights influence + logit weight: f0 0.75 (explained), f1 0.25 (counted like an error
    # node, as scores() counts errors), token 0.75 (no inputs), logit 1 (75% of its input explained)
    assert abs(only_f0.completeness - (0.75 + 0.25 + 0.75 + 0.75) / (0.75 + 0.25 + 0.75 + 1.0)) < 1e-6


def test_subgraph_of_everything_matches_graph_scores_on_a_real_graph() -> None:
    from test_attribution import IDS, _setup

    from clt_hub.attribution.attribute import attribute
    from clt_hub.attribution.pruning import subgraph_scores

    model, tc = _setup("gpt2", "clt")
    g = attribute(model, tc, IDS)
    a, b = subgraph_scores(g, list(range(g.n_features))), scores(g)
    assert abs(a.replacement - b.replacement) < 1e-6 and abs(a.completeness - b.completeness) < 1e-6
