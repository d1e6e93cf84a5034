from __future__ import annotations

import pytest
import torch
from test_pruning import hand_graph

from clt_hub.attribution.pruning import prune
from clt_hub.attribution.supernodes import collapse, suggest

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


def test_suggestion_groups_features_with_the_same_role() -> None:
    # features 0 and 1 only drive feature 3; feature 2 drives feature 3 and the logit equally;
    # feature 3 drives only the logit. Profiles: f0 = f1 = [1, 0], f2 = [1, 1]/sqrt2, f3 = [0, 1]
    n_feat, tok, logit = 4, 4 + 1 * 1, 4 + 1 + 1
    edges = {(0, tok): 1.0, (1, tok): 1.0, (2, tok): 1.0, (3, 0): 2.0, (3, 1): 4.0, (3, 2): 1.0,
             (logit, 3): 3.0, (logit, 2): 1.0}
    g = hand_graph(edges, n_feat, 1, 1, [1.0])
    g.features = torch.tensor([[0, 0, 10], [0, 0, 11], [0, 0, 12], [1, 0, 13]])
    groups = suggest(g, prune(g, 1.0, 1.0), labels={"0_10_0": "Texas", "0_11_0": "Texas"})
    assert groups == [["Texas", "0_10_0", "0_11_0"]]


def test_collapse_sums_edges() -> None:
    adj = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]])
    merged, members = collapse(adj, [[1, 2]])
    assert members == [[1, 2], [0]]
    torch.testing.assert_close(merged, torch.tensor([[0.0, 3.0], [0.0, 0.0]]))
