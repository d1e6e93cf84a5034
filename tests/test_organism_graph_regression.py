"""The organism's attribution graph for one fixed prompt equals a saved reference: the same active
features and pruned node ids, and every kept edge, row sum, value and score to float32 rounding. Pins tracing
behaviour across refactors (the reference is rewritten only on purpose, by make_organism_graph_reference.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import sum_rounding_bound
from make_organism_graph_reference import DATA, PROMPT, organism_graph
from safetensors.torch import load_file

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


def test_organism_graph_regression() -> None:
    saved = load_file(str(DATA / "organism_graph.safetensors"))
    meta = json.loads((DATA / "organism_graph.json").read_text())
    assert meta["prompt"] == PROMPT
    now = organism_graph()
    assert torch.equal(now["features"], saved["features"])
    assert torch.equal(now["logit_tokens"], saved["logit_tokens"])
    assert now["node_ids"] == meta["node_ids"]
    assert torch.equal(now["edge_targets"], saved["edge_targets"])
    assert torch.equal(now["edge_sources"], saved["edge_sources"])
    # the reference was computed by one CPU's kernels; another's sum in other orders. The longest sum behind
    # a value is a layer's input from every earlier layer's features (4 x 512 terms), each no larger than the
    # largest value of its kind; so two runs agree to that many roundings of that scale (tests/TOLERANCES.md)
    n_terms = 4 * 512
    for key in ("activations", "values", "constants", "edge_weights", "row_sums"):
        tol = float(sum_rounding_bound(n_terms, saved[key].abs().max().item()))
        torch.testing.assert_close(now[key], saved[key], rtol=0, atol=tol, msg=key)
    torch.testing.assert_close(torch.tensor(now["scores"]), torch.tensor(meta["scores"]), rtol=0,
                               atol=float(sum_rounding_bound(n_terms, 1.0)))  # fractions: magnitude 1
