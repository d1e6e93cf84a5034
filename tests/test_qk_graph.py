"""QK tracing in attribution graphs (issue 40, items 2 to 4): which (layer, head, query, key) carry the kept
cross-position influence, their exact QK attribution in Neuronpedia's graph JSON shape, the round trip through
save/load, TraceOptions.qk and `clt-hub trace --qk N`. On the tiny GPT-2 and CLT of tests/test_trace_cli.py.

Tolerance (tests/TOLERANCES.md's kind): the reference below computes the head split in float64 from the
dense adjacency (influence by a matrix inverse) and transformers' own eager attention weights; the library in
float32 from the sparse rows (influence as a series) and the recorded pattern. The longest chains of sums are the
influence series (depth <= n_layers + 2 products, each summing n_nodes terms) and a softmax over the T keys of a
d_head dot product; with every influence a fraction of the logits' total weight (at most 1), two computations
differ by at most 2 gamma_n with n = n_nodes (n_layers + 3) + T d_head: an assumption on the magnitude (no
term of a sum above 1), as the organism's row there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import sum_rounding_bound
from test_trace_cli import runner, save_tiny_model_and_clt

from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.graph import Graph
from clt_hub.attribution.graph_json import load, node_records, save, to_json
from clt_hub.attribution.options import TraceOptions
from clt_hub.attribution.pruning import Pruned, prune
from clt_hub.attribution.qk import (
    QKRecording,
    QKScore,
    QKSelection,
    qk_influence,
    qk_json,
    qk_query,
    record_qk,
    select_qk,
    top_qk,
)
from clt_hub.cli import app
from clt_hub.errors import ArtifactError, ConfigError
from clt_hub.models.loading import load as load_pair

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md

PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8"
Case = tuple[Any, Any, torch.Tensor, Graph, Pruned, QKRecording]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_model_and_clt(tmp_path_factory.mktemp("qk_graph"))


@pytest.fixture(scope="module")
def pair(artifacts: tuple[Path, Path]) -> tuple[Any, Any, Any, torch.Tensor]:
    lm, tok, tc = load_pair(str(artifacts[0]), str(artifacts[1]), local_files_only=True)
    return lm, tok, tc, torch.tensor(tok(PROMPT)["input_ids"])


def _case(pair: tuple[Any, Any, Any, torch.Tensor], node_threshold: float, edge_threshold: float) -> Case:
    lm, _, tc, ids = pair
    graph = attribute(lm, tc, ids, batch_size=64)
    return lm, tc, ids, graph, prune(graph, node_threshold, edge_threshold), record_qk(lm, tc, ids)


@pytest.fixture(scope="module", params=[(0.8, 0.98), (1.0, 1.0)], ids=["default", "everything"])
def case(pair: tuple[Any, Any, Any, torch.Tensor], request: pytest.FixtureRequest) -> Case:
    return _case(pair, *request.param)


def _places(graph: Graph) -> list[tuple[int, int, int]]:
    """(position, first attention layer reading the node's write, last attention layer before it reads), by node,
    written out from each node kind's definition."""
    L, out = graph.n_layers, []
    for i in range(graph.n_nodes):
        if i < graph.n_features:
            layer, pos, _ = graph.features[i].tolist()
            out.append((pos, layer + 1, layer))
        elif i < graph.token_index(0):
            layer, pos = divmod(i - graph.n_features, graph.n_pos)
            out.append((pos, layer + 1, -1))
        elif i < graph.logit_index(0):
            out.append((i - graph.token_index(0), 0, -1))
        else:
            out.append((graph.n_pos - 1, L, L - 1))
    return out


def _reference(lm: Any, ids: torch.Tensor, graph: Graph, pruned: Pruned) -> tuple[dict, dict, float]:
    """The selection rule computed edge by edge in float64: influence over the kept nodes by (I - A)^-1, each kept
    edge from an earlier position split over its carrying heads by transformers' own attention weights."""
    import transformers as T

    eager = T.AutoModelForCausalLM.from_pretrained(lm.name_or_path, attn_implementation="eager")
    with torch.no_grad():
        att = torch.stack(eager(ids[None], output_attentions=True).attentions)[:, 0].double()  # [L, H, T, T]
    keep = pruned.node_mask
    adj = graph.adjacency.double() * keep[:, None] * keep[None, :]
    a = adj.abs() / adj.abs().sum(1, keepdim=True).clamp(min=1e-300)
    w = torch.zeros(graph.n_nodes, dtype=torch.float64)
    w[graph.logit_index(0):] = graph.logit_probabilities.double()
    eye = torch.eye(graph.n_nodes, dtype=torch.float64)
    inf = w @ (torch.linalg.inv(eye - a) - eye) + w
    places, units, into, total = _places(graph), {}, {}, 0.0
    for t, s in pruned.edge_mask.nonzero().tolist():
        (q, _, hi), (k, lo, _) = places[t], places[s]
        if k >= q or lo > hi:
            continue
        score = float(a[t, s] * inf[t])
        carried = att[lo:hi + 1, :, q, k]
        if score == 0 or float(carried.sum()) == 0:
            continue
        total += score
        for m in range(lo, hi + 1):
            for h in range(att.shape[1]):
                part = score * float(carried[m - lo, h] / carried.sum())
                units[(m, h, q, k)] = units.get((m, h, q, k), 0.0) + part
                into[(m, h, q, k, t)] = into.get((m, h, q, k, t), 0.0) + part
    return units, into, total


def _tolerance(graph: Graph, T: int, d_head: int) -> float:
    return float(sum_rounding_bound(graph.n_nodes * (graph.n_layers + 3) + T * d_head, 1.0))


def test_head_influence_is_the_rule_computed_edge_by_edge(case: Case) -> None:
    lm, _, ids, graph, pruned, rec = case
    units, into, total = _reference(lm, ids, graph, pruned)
    found = qk_influence(graph, pruned, rec)
    tol = _tolerance(graph, len(ids), rec.shape(0)[2])
    assert total > 0 and len(units) > 1, "the graph has kept cross-position edges"
    got = {tuple(u): float(v) for u, v in zip(found.units.tolist(), found.influence, strict=True)}
    assert {u for u, v in units.items() if v > tol} <= set(got) <= set(units)
    for u, v in units.items():
        assert abs(got.get(u, 0.0) - v) <= tol, u
    assert abs(found.total - total) <= tol and abs(float(found.influence.sum()) - total) <= tol
    assert found.influence.tolist() == sorted(found.influence.tolist(), reverse=True)
    for i in range(min(len(found.units), 12)):
        nodes, parts = found.into(i)
        m, h, q, k = found.units[i].tolist()
        assert q > k
        for node, part in zip(nodes.tolist(), parts.tolist(), strict=True):
            assert abs(part - into.get((m, h, q, k, node), 0.0)) <= tol  # 0: no edge into it that m carries
        assert abs(float(parts.sum()) - float(found.influence[i])) <= tol


def test_selection_takes_the_largest_units_each_on_a_node_of_its_own(case: Case) -> None:
    _, _, _, graph, pruned, rec = case
    found = qk_influence(graph, pruned, rec)
    chosen = select_qk(graph, pruned, rec, 3)
    assert 1 <= len(chosen) <= 3
    first = chosen[0]
    assert (first.layer, first.head, first.query, first.key) == tuple(found.units[0].tolist())
    assert first.node == int(found.into(0)[0][0])
    every = select_qk(graph, pruned, rec, 10**6)
    assert every[:len(chosen)] == chosen  # greedy: asking for more extends the list
    units = [(c.layer, c.head, c.query, c.key) for c in every]
    nodes = [c.node for c in every]
    assert len(set(units)) == len(units) and len(set(nodes)) == len(nodes)
    targets = set(found.target.tolist())
    assert set(nodes) <= targets and (len(every) == len(found.units) or set(nodes) == targets)
    for c in every:
        assert c.influence >= c.into_node > 0
        pos = graph.features[c.node, 1] if c.node < graph.n_features else graph.n_pos - 1
        assert int(pos) == c.query and bool(pruned.node_mask[c.node])
    assert [c.influence for c in every] == sorted((c.influence for c in every), reverse=True)
    with pytest.raises(ConfigError, match="at least one"):
        select_qk(graph, pruned, rec, 0)


def _rows(results: dict[str, list[list[Any]]]) -> list[Any]:
    return [row for rows in results.values() for row in rows]


def _split(lm: Any, tc: Any, ids: torch.Tensor, layer: int, head: int, query: int, key: int
           ) -> tuple[QKScore, float, float]:
    """The score split again from a recording of its own, with 2 gamma_n times its terms' magnitude (as in
    tests/test_qk.py: the projections, the dot product, the pairs summed) and the same for a softmax weight."""
    rec = record_qk(lm, tc, ids)
    scores = qk_query(rec, layer, query)
    s = scores.pair(head, key)
    magnitude = float((s.q_vectors.abs().sum(0) * s.k_vectors.abs().sum(0)).sum()) * scores.scaling
    n = s.q_residuals.shape[1] + s.q_vectors.shape[1] + s.pairs.numel() + 2 * rec.setup.L
    return s, float(sum_rounding_bound(n, magnitude)), float(sum_rounding_bound(len(ids) * s.q_vectors.shape[1], 1.0))


def test_qk_json_is_the_exact_split_with_every_id_resolved(case: Case) -> None:
    lm, tc, ids, graph, pruned, rec = case
    chosen = select_qk(graph, pruned, rec, 4)
    qk = qk_json(rec, graph, pruned, chosen, top=10**6)  # every contributor
    tokens = [f"t{i}" for i in ids.tolist()]
    data = to_json(graph, tokens, pruned=pruned, qk=qk)
    nodes = {n["node_id"]: n for n in data["nodes"]}
    only = data.get("qk_only_nodes", {})
    assert set(only).isdisjoint(nodes) and all(d["node_id"] == key for key, d in only.items())
    assert len([n for n in data["nodes"] if "qk_tracing_results" in n]) == len(chosen)
    ids_of = [r["node_id"] for r in node_records(graph, tokens)]
    for c in chosen:
        node = nodes[ids_of[c.node]]
        head = node["qk_head"]
        assert (head["layer"], head["head"], head["query"], head["key"]) == (c.layer, c.head, c.query, c.key)
        results = node["qk_tracing_results"]
        assert all(i in nodes or i in only for row in _rows(results) for i in row[:-1])
        real, tol, weight_tol = _split(lm, tc, ids, c.layer, c.head, c.query, c.key)
        assert abs(head["score"] - real.real) <= tol
        for name in ("pair_wise_contributors", "top_q_marginal_contributors", "top_k_marginal_contributors"):
            assert abs(sum(row[-1] for row in results[name]) - real.real) <= tol, name  # every part is there
        assert abs(head["attention"] - real.weight) <= weight_tol
        assert (head["influence"], head["into_node"]) == (c.influence, c.into_node)
    kinds = {d["feature_type"] for d in only.values()}
    assert {"embedding", "bias"} <= kinds  # GPT-2: its position embeddings, the q/k side biases
    assert ("unknown" in kinds) == any(c.layer > 0 for c in chosen)  # earlier layers' heads
    assert all(i.startswith("E_position_") for i, d in only.items() if d["feature_type"] == "embedding")


def test_top_lists_are_top_qk(case: Case) -> None:
    lm, tc, ids, graph, pruned, rec = case
    c = select_qk(graph, pruned, rec, 1)[0]
    qk = qk_json(rec, graph, pruned, [c], top=5)
    results = next(iter(qk["nodes"].values()))["qk_tracing_results"]
    real, tol, _ = _split(lm, tc, ids, c.layer, c.head, c.query, c.key)
    report = top_qk(real, 5)
    for name, key in (("pair_wise_contributors", "top_pairs"), ("top_q_marginal_contributors", "top_query"),
                      ("top_k_marginal_contributors", "top_key")):
        assert len(results[name]) == len(report[key]) == min(5, len(real.pairs.flatten() if key == "top_pairs" else
                                                                 real.query_marginals if key == "top_query" else
                                                                 real.key_marginals))
        assert [row[-1] for row in results[name]] == pytest.approx([r["value"] for r in report[key]], rel=0, abs=tol)
    for row, r in zip(results["pair_wise_contributors"], report["top_pairs"], strict=True):
        for name, side in ((row[0], r["query"]), (row[1], r["key"])):  # graph nodes keep their ids
            assert name == side.get("node_id", name)
    with pytest.raises(ConfigError, match="at least one contributor"):
        qk_json(rec, graph, pruned, [c], top=0)


def test_round_trip_and_unchanged_without_qk(case: Case, tmp_path: Path) -> None:
    _, _, ids, graph, pruned, rec = case
    tokens = [f"t{i}" for i in ids.tolist()]
    plain = to_json(graph, tokens, pruned=pruned)
    assert "qk_only_nodes" not in plain and not any("qk_tracing_results" in n for n in plain["nodes"])
    assert json.dumps(to_json(graph, tokens, pruned=pruned, qk=None)) == json.dumps(plain)
    qk = qk_json(rec, graph, pruned, select_qk(graph, pruned, rec, 3))
    data = to_json(graph, tokens, pruned=pruned, qk=qk)
    assert data["qk_only_nodes"]
    stripped = {k: v for k, v in data.items() if k != "qk_only_nodes"}
    stripped["nodes"] = [{k: v for k, v in n.items() if not k.startswith("qk_")} for n in data["nodes"]]
    assert json.dumps(stripped) == json.dumps(plain)  # the rest of the document is as it was
    gf = load(save(data, tmp_path / "g.json"))
    assert gf.qk_only_nodes == data["qk_only_nodes"]
    assert [gf.nodes[n["node_id"]] for n in data["nodes"]] == data["nodes"]
    assert load(save(plain, tmp_path / "plain.json")).qk_only_nodes == {}
    with pytest.raises(ValueError, match="not in the pruned graph"):
        to_json(graph, tokens, pruned=pruned, qk={"nodes": {"9_9_9": {}}, "qk_only_nodes": {}})


def _document(results: dict[str, Any], only: dict[str, Any] | None = None) -> dict[str, Any]:
    """An upstream-shaped file (Neuronpedia's graph server for OpenMOSS CRM graphs): a lorsa node with results."""
    nodes = [{"node_id": "E_5_0", "feature_type": "embedding", "layer": "E", "ctx_idx": 0},
             {"node_id": "3_lor_12_2", "feature_type": "lorsa", "layer": 3, "ctx_idx": 2, "feature": 12,
              "qk_tracing_results": results}]
    doc: dict[str, Any] = {"metadata": {}, "qParams": {}, "nodes": nodes, "links": []}
    if only is not None:
        doc["qk_only_nodes"] = only
    return doc


BIAS = {"node_id": "1_bias_attn_bO_0", "jsNodeId": "1_bias_attn_bO_0", "feature": None, "feature_type": "bias",
        "layer": 1, "ctx_idx": 0, "clerp": "L1 Bias (attn_bO)", "activation": None, "token": "x"}
GOOD = {"pair_wise_contributors": [["E_5_0", "1_bias_attn_bO_0", 0.5]],
        "top_q_marginal_contributors": [["E_5_0", 1]], "top_k_marginal_contributors": [["1_bias_attn_bO_0", -0.25]]}


def test_upstream_files_load_and_bad_qk_is_one_error(tmp_path: Path) -> None:
    gf = load(_document(GOOD, {"1_bias_attn_bO_0": BIAS}))
    assert gf.nodes["3_lor_12_2"]["qk_tracing_results"] == GOOD and gf.qk_only_nodes == {"1_bias_attn_bO_0": BIAS}
    bad = [
        (_document(GOOD), "names '1_bias_attn_bO_0', which is neither a node nor in qk_only_nodes"),
        (_document({**GOOD, "pair_wise_contributors": [["E_5_0", 0.5]]}, {"1_bias_attn_bO_0": BIAS}),
         "a row is \\[node_id, node_id, value\\]"),
        (_document({**GOOD, "top_q_marginal_contributors": [["E_5_0", float("nan")]]}, {"1_bias_attn_bO_0": BIAS}),
         "with a finite value"),
        (_document({**GOOD, "top_q_marginal_contributors": [["E_5_0", "0.5"]]}, {"1_bias_attn_bO_0": BIAS}),
         "a row is \\[node_id, value\\]"),
        (_document(GOOD, {"1_bias_attn_bO_0": {**BIAS, "node_id": "x"}}), "key each by its id"),
        (_document(GOOD, {"1_bias_attn_bO_0": BIAS, "E_5_0": {**BIAS, "node_id": "E_5_0"}}),
         "is a node of the graph"),
        (_document({k: v for k, v in GOOD.items() if k != "pair_wise_contributors"}, {"1_bias_attn_bO_0": BIAS}),
         "pair_wise_contributors"),
    ]
    for doc, message in bad:
        with pytest.raises(ArtifactError, match=message):
            load(doc)
    (tmp_path / "g.json").write_text(json.dumps(bad[0][0]))
    with pytest.raises(ArtifactError, match=r"g\.json: node '3_lor_12_2'"):
        load(tmp_path / "g.json")


@pytest.mark.parametrize(("qk", "ok"), [(0, True), (7, True), (-1, False), (True, False), (2.0, False), ("3", False)])
def test_trace_options_qk(qk: object, ok: bool) -> None:
    if ok:
        assert TraceOptions(qk=qk).qk == qk  # type: ignore[arg-type]
        return
    with pytest.raises(ConfigError, match=r"qk is how many \(layer, head, query, key\) to explain"):
        TraceOptions(qk=qk)  # type: ignore[arg-type]


def test_trace_options_qk_is_off_by_default() -> None:
    assert TraceOptions().qk == 0


def _strip(raw: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in raw.items() if k != "qk_only_nodes"}
    out["nodes"] = [{k: v for k, v in n.items() if not k.startswith("qk_")} for n in raw["nodes"]]
    return out


def test_trace_cli_qk(artifacts: tuple[Path, Path], pair: tuple[Any, Any, Any, torch.Tensor], tmp_path: Path) -> None:
    model, clt = artifacts
    base = ["trace", PROMPT, "--model", str(model), "--transcoder", str(clt), "--offline"]
    off = runner.invoke(app, [*base, "--out", str(tmp_path / "off")])
    on = runner.invoke(app, [*base, "--out", str(tmp_path / "on"), "--qk", "3"])
    assert off.exit_code == 0 and on.exit_code == 0, off.output + on.output
    plain = (tmp_path / "off" / "graph.json").read_text()
    raw = json.loads((tmp_path / "on" / "graph.json").read_text())
    assert '"qk_' not in plain and json.dumps(_strip(raw)) == plain  # the rest byte for byte
    explained = [n for n in raw["nodes"] if "qk_tracing_results" in n]
    assert 1 <= len(explained) <= 3 and raw["qk_only_nodes"]
    heads = {(n["qk_head"]["layer"], n["qk_head"]["head"], n["qk_head"]["query"], n["qk_head"]["key"])
             for n in explained}
    assert len(heads) == len(explained)
    lm, _, tc, ids = pair
    for node in explained:  # each list is top_qk's, from a recording of its own
        h = node["qk_head"]
        real, tol, _ = _split(lm, tc, ids, h["layer"], h["head"], h["query"], h["key"])
        values = [row[-1] for row in node["qk_tracing_results"]["pair_wise_contributors"]]
        assert values == pytest.approx([r["value"] for r in top_qk(real, 10)["top_pairs"]], rel=0, abs=tol)
    assert "QK tracing" in on.output and "QK tracing" not in off.output
    assert "QK tracing" in (tmp_path / "on" / "summary.txt").read_text()
    load(tmp_path / "on" / "graph.json")
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--qk", "-1"])
    assert bad.exit_code == 2 and "--qk" in bad.output and "greater than or equal to 0" in bad.output


def test_trace_qk_python_api(pair: tuple[Any, Any, Any, torch.Tensor]) -> None:
    from clt_hub.attribution.trace import trace

    lm, tok, tc, _ = pair
    result = trace(PROMPT, lm, tok, tc, TraceOptions(qk=2))
    assert 1 <= len(result.qk) <= 2 and all(isinstance(c, QKSelection) for c in result.qk)
    explained = {n["node_id"] for n in result.json["nodes"] if "qk_head" in n}
    assert len(explained) == len(result.qk)
    assert trace(PROMPT, lm, tok, tc).qk == []
