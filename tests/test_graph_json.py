from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_attribution import IDS, _setup

from clt_hub import ArtifactError
from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.graph_json import NODE_FIELDS, load, save, to_json
from clt_hub.attribution.pruning import prune


@pytest.fixture(scope="module")
def graph():
    model, tc = _setup("gpt2", "clt")
    return attribute(model, tc, IDS, batch_size=32)


def test_export_import_round_trip(graph, tmp_path: Path) -> None:
    tokens = [f"t{i}" for i in IDS.tolist()]
    pruned = prune(graph, 0.8, 0.98)
    data = to_json(graph, tokens, prompt="p", slug="s", scan="gpt2", transcoder_list=["x/y"], pruned=pruned)
    save(data, tmp_path / "g.json")
    gf = load(tmp_path / "g.json")
    assert len(gf.nodes) == int(pruned.node_mask.sum()) and len(gf.links) == int(pruned.edge_mask.sum())
    for node in data["nodes"]:
        assert set(node) == set(NODE_FIELDS)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    # every exported weight is the graph's edge
    index = {r: i for i, r in enumerate(ids)}
    order, adj = gf.adjacency()
    assert order == ids
    kept = pruned.node_mask.nonzero().squeeze(-1)
    full = graph.adjacency[kept][:, kept] * pruned.edge_mask[kept][:, kept]
    torch.testing.assert_close(adj, full)
    assert data["metadata"]["schema_version"] == 1 and data["metadata"]["prompt_tokens"] == tokens
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert logits and logits[0]["is_target_logit"] and index  # the top logit is the target


def test_error_ids_never_collide_with_layer0_features(graph) -> None:
    data = to_json(graph, ["x"] * len(IDS), node_threshold=1.0, edge_threshold=1.0)
    errors = [n["node_id"] for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errors and all("_-1_" in e for e in errors)


def test_supernodes_and_bad_files(graph, tmp_path: Path) -> None:
    data = to_json(graph, ["x"] * len(IDS))
    feats = [n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"][:2]
    data = to_json(graph, ["x"] * len(IDS), supernodes=[["group", *feats]])
    assert data["qParams"]["supernodes"] == [["group", *feats]]
    with pytest.raises(ValueError, match="not in the pruned graph"):
        to_json(graph, ["x"] * len(IDS), supernodes=[["g", "99_99_99"]])
    (tmp_path / "bad.json").write_text(json.dumps({"metadata": {}, "nodes": [{"node_id": "a"}, {"node_id": "a"}], "links": []}))
    with pytest.raises(ArtifactError, match="duplicate node_id 'a'"):
        load(tmp_path / "bad.json")
    with pytest.raises(ArtifactError, match="missing top-level 'links'"):
        load({"metadata": {}, "nodes": []})
