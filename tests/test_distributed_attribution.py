"""Attribution over two gloo processes equals attribution in one (issue 41): the same nodes, edges within float
tolerance, the same pruning scores; with every feature traced and under a node budget (where the features chosen
depend on the rows of earlier rounds); with the decoders whole on each rank and sharded by feature.

Each case spawns two fresh processes (`torch.multiprocessing`, start method spawn) that join a gloo group on
127.0.0.1, load the same model and transcoder folders, and trace the same prompt; rank 0 writes its graph to a
safetensors file, which is compared with the graph this process traces alone."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from clt_hub import Transcoder
from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.graph import Graph
from clt_hub.attribution.pruning import prune, scores
from clt_hub.models.known import KNOWN
from clt_hub.models.loading import encode_prompt, load_model

pytestmark = pytest.mark.numeric  # tests/TOLERANCES.md

FIELDS = ("features", "activations", "rows", "row_nodes", "values", "constants", "dropped", "logit_tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _trace(model_dir: str, clt_dir: str, prompt: str, budget: int | None, shard: bool, hold: bool = True) -> Graph:
    from clt_hub.attribution import attribute as attribute_module
    from clt_hub.transcoders.sharded import shard_decoders

    model, tokenizer = load_model(model_dir)
    tc = Transcoder.from_pretrained(clt_dir)
    if shard:
        tc = shard_decoders(tc)
    ids = encode_prompt(tokenizer, prompt)
    if not hold:  # as for a CLT whose active rows do not fit the plan: they are read (sharded: exchanged) per pass
        attribute_module.HOLD_DECODERS_FRACTION = 0.0
    graph = attribute(model, tc, ids, max_feature_nodes=budget, batch_size=8)
    assert graph.meta["timings"]["decoders_held"] == hold
    # sharded: what stays exchanged afterwards is the graph's own features' rows (for labels and QK), not every
    # active feature's
    exchanged = sum(len(source._cache) for source in getattr(tc, "_lazy", {}).values() if hasattr(source, "_cache"))
    graph.meta["exchanged_rows"] = exchanged
    assert exchanged <= graph.n_features
    return graph


def _worker(rank: int, world: int, port: int, args: tuple[Any, ...], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        graph = _trace(*args)
        if rank == 0:
            save_file({f: getattr(graph, f).contiguous() for f in FIELDS}, out)
        Path(f"{out}.held{rank}").write_text(str(graph.meta["timings"]["rows_held"]))
    finally:
        dist.destroy_process_group()


def _two_processes(tmp_path: Path, args: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    out = str(tmp_path / "graph.safetensors")
    mp.start_processes(_worker, args=(2, _free_port(), args, out), nprocs=2, start_method="spawn")
    graph = load_file(out)
    held = [int(Path(f"{out}.held{r}").read_text()) for r in range(2)]
    # each rank keeps only the rows it computed: together every row once, each at most half plus one per round
    n_rows = len(graph["row_nodes"])
    assert sum(held) == n_rows and max(held) <= -(-n_rows // 2) + -(-n_rows // 8), (held, n_rows)
    return graph


def _assert_same_graph(one: Graph, two: dict[str, torch.Tensor]) -> None:
    for f in ("features", "row_nodes", "logit_tokens"):
        assert torch.equal(getattr(one, f), two[f]), f
    scale = float(one.rows.abs().max())
    # each edge is one reduction over d_model from the same gradients; backward passes over 4 seeds instead of 8
    # may pick other kernels, so agreement is to float32 rounding of the largest edge, not bit for bit
    for f in ("rows", "values", "constants", "dropped", "activations"):
        torch.testing.assert_close(two[f], getattr(one, f), rtol=1e-5, atol=1e-5 * scale, msg=f)
    rebuilt = Graph(input_ids=one.input_ids, features=two["features"], activations=two["activations"],
                    logit_tokens=two["logit_tokens"], logit_probabilities=one.logit_probabilities,
                    values=two["values"], constants=two["constants"], n_layers=one.n_layers, n_pos=one.n_pos,
                    rows=two["rows"], row_nodes=two["row_nodes"], dropped=two["dropped"])
    a, b = scores(one), scores(rebuilt)
    assert a.replacement == pytest.approx(b.replacement, rel=1e-5)
    assert a.completeness == pytest.approx(b.completeness, rel=1e-5)
    assert torch.equal(prune(one).node_mask, prune(rebuilt).node_mask)


@pytest.mark.parametrize(("budget", "shard", "hold"),
                         [(None, False, True), (None, True, True), (12, False, True), (12, True, True),
                          (None, True, False), (12, True, False)],
                         ids=["all features", "all features, sharded decoders", "node budget",
                              "node budget, sharded decoders", "all features, sharded decoders read per pass",
                              "node budget, sharded decoders read per pass"])
def test_two_processes_trace_the_organism_graph(tmp_path: Path, budget: int | None, shard: bool, hold: bool) -> None:
    from paper_cases.organism import CLT_DIR, MODEL_DIR

    args = (str(MODEL_DIR), str(CLT_DIR), "fact : the capital of the state containing Dallas is", budget, shard, hold)
    one = _trace(*args[:4], shard=False)
    active = one.meta["timings"]["active_features"]
    assert active > 8 * 2 and one.n_features == (budget or active)  # several rounds; the budget binds
    _assert_same_graph(one, _two_processes(tmp_path, args))


def test_gemma_3_270m_on_two_processes(tmp_path: Path) -> None:
    name = "gemma-3-270m"
    if importlib.util.find_spec(KNOWN[name].module) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"{name}'s weights are not installed: {KNOWN[name].install}")
    from test_real_models import PROMPT, _calibrated_transcoder

    model, tok = load_model(name)
    tc: Any = _calibrated_transcoder(model, encode_prompt(tok, PROMPT), name)
    tc.save_pretrained(tmp_path / "clt")
    del model
    args = (name, str(tmp_path / "clt"), PROMPT, 48, True)
    one = _trace(*args[:4], shard=False)
    _assert_same_graph(one, _two_processes(tmp_path, args))


@pytest.mark.parametrize("shard", [False, True], ids=["whole decoders", "--shard-decoders"])
def test_clt_hub_trace_under_torchrun_writes_the_one_process_graph(tmp_path: Path, shard: bool) -> None:
    """`torchrun --nproc_per_node 2 -m clt_hub.cli trace ...` needs nothing else; rank 0 alone writes, and its
    graph.json holds the nodes, links and scores one process writes."""
    import json
    import os
    import subprocess
    import sys

    from test_trace_cli import save_tiny_model_and_clt

    model, clt = save_tiny_model_and_clt(tmp_path)
    common = ["trace", "w1 w2 w3 w4 w5 w6 w7 w8", "--model", str(model), "--transcoder", str(clt), "--batch-size", "4",
              "--max-feature-nodes", "20", "--qk", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "clt_hub.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "clt_hub.cli", *common, "--out", str(tmp_path / "two"),
                          *(["--shard-decoders"] if shard else [])], capture_output=True, text=True, env=env)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert two.stdout.count("replacement score") == 1  # one summary: rank 0's
    a = json.loads((tmp_path / "one" / "graph.json").read_text())
    b = json.loads((tmp_path / "two" / "graph.json").read_text())
    assert [n["node_id"] for n in a["nodes"]] == [n["node_id"] for n in b["nodes"]]
    assert [(e["source"], e["target"]) for e in a["links"]] == [(e["source"], e["target"]) for e in b["links"]]
    scale = max(abs(e["weight"]) for e in a["links"])
    for x, y in zip(a["links"], b["links"], strict=True):
        assert y["weight"] == pytest.approx(x["weight"], rel=1e-5, abs=1e-5 * scale)
    assert (tmp_path / "one" / "summary.txt").read_text() == (tmp_path / "two" / "summary.txt").read_text()
    # QK attribution under torchrun: the same heads, pairs and contributors (it reads only the graph's features'
    # decoder rows, which stay exchanged after attribution when the decoders are sharded)
    qa = [n["qk_tracing_results"] for n in a["nodes"] if "qk_tracing_results" in n]
    qb = [n["qk_tracing_results"] for n in b["nodes"] if "qk_tracing_results" in n]
    assert qa and len(qa) == len(qb) and a.get("qk_only_nodes") == b.get("qk_only_nodes")
    for x, y in zip(qa, qb, strict=True):
        assert [c[:2] for c in x["pair_wise_contributors"]] == [c[:2] for c in y["pair_wise_contributors"]]
        for cx, cy in zip(x["pair_wise_contributors"], y["pair_wise_contributors"], strict=True):
            assert cy[2] == pytest.approx(cx[2], rel=1e-4, abs=1e-5)


def test_shard_decoders_needs_torchrun(tmp_path: Path) -> None:
    from test_trace_cli import save_tiny_model_and_clt
    from typer.testing import CliRunner

    from clt_hub.cli import app

    model, clt = save_tiny_model_and_clt(tmp_path)
    result = CliRunner().invoke(app, ["trace", "w1 w2 w3", "--model", str(model), "--transcoder", str(clt),
                                      "--out", str(tmp_path / "out"), "--shard-decoders"])
    assert result.exit_code != 0 and "torchrun" in result.output and not (tmp_path / "out" / "graph.json").exists()


def test_ranks_checking_one_out_folder_at_once_do_not_trip_each_other(tmp_path: Path) -> None:
    """Every rank under torchrun checks that --out can be written, at the same moment. A probe file of one shared
    name let one rank delete it before the other did, which then reported a writable folder as unwritable (a CI
    failure, one run in several); four threads checking 300 times each made that happen hundreds of times."""
    import threading

    from clt_hub.cli import _writable_folder

    failures: list[Exception] = []

    def check() -> None:
        for _ in range(300):
            try:
                _writable_folder(tmp_path / "out")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                failures.append(exc)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:1]
    assert list((tmp_path / "out").iterdir()) == []  # no probe left behind


def test_exchanged_rows_are_dropped_after_the_block_unless_held_before() -> None:
    """Sharded decoders hold exchanged rows only while they are read: a decode exchanges one source layer's active
    rows at a time and attribution one chunk per pass, so no rank keeps every active feature's rows at once."""
    from clt_hub.artifacts.lazy import exchanged
    from clt_hub.errors import ConfigError
    from clt_hub.transcoders.sharded import ShardedRows

    local = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3) + 1  # rows 0..3 of 10 live here
    source = ShardedRows(local, 0, 10)
    assert source.prefetch(torch.tensor([3, 6])).tolist() == [6]  # row 3 is this rank's own: nothing new held
    with exchanged({0: source}, {0: torch.tensor([6, 7, 2])}):
        assert source.rows([7, 2]).shape == (2, 2, 3)
        assert torch.equal(source.rows([2])[0], local[2])
    assert source.rows([6]).shape == (1, 2, 3)  # held before the block: still held
    with pytest.raises(ConfigError, match="not exchanged"):
        source.rows([7])  # exchanged for the block only
    source.release(torch.tensor([6, 3]))
    with pytest.raises(ConfigError, match="not exchanged"):
        source.rows([6])
    assert torch.equal(source.rows([3])[0], local[3])  # a rank's own rows are never released
