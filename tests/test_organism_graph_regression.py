"""The organism's attribution graph for one fixed prompt equals a saved reference: the same active
features, the same pruned node ids and scores, every kept edge and every row sum to 1e-6. Pins tracing
behaviour across refactors (the reference is rewritten only on purpose, by make_organism_graph_reference.py)."""

from __future__ import annotations

import json

import torch
from make_organism_graph_reference import DATA, PROMPT, organism_graph
from safetensors.torch import load_file


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
    for key in ("activations", "values", "constants", "edge_weights", "row_sums"):
        torch.testing.assert_close(now[key], saved[key], rtol=1e-6, atol=1e-6, msg=key)
    torch.testing.assert_close(torch.tensor(now["scores"]), torch.tensor(meta["scores"]), rtol=1e-6, atol=1e-6)
