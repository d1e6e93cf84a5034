"""Component-level circuits (clt_hub.circuits): invariants of the disentangled forward on every family, EAP against
gradients computed without it, ground-truth recovery on a hand-built model, Edge Pruning resume, task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from clt_hub.circuits import (
    EapConfig,
    EdgeModel,
    EdgePruningConfig,
    eap_scores,
    edge_pruning,
    evaluate,
    keep_top,
)
from clt_hub.circuits.components import component_graph
from clt_hub.circuits.edge_model import check_memory, estimate_bytes
from clt_hub.circuits.edge_pruning import CHECKPOINT_STATE
from clt_hub.circuits.tasks import Batch, logit_diff
from clt_hub.circuits.truth import TRUTH, known_circuit_batches, known_circuit_model
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numeric]  # numeric: tests/TOLERANCES.md


def random_batch(vocab: int = 64, B: int = 3, T: int = 7, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, vocab, (B, T), generator=g)
    corrupted = torch.randint(3, vocab, (B, T), generator=g)
    last = torch.tensor([T - 1 - (i % 3) for i in range(B)])  # right padding: rows end at different positions
    answers = torch.randint(3, vocab, (B, 2), generator=g)
    wrong = torch.randint(3, vocab, (B, 1), generator=g)
    return Batch(clean, corrupted, last, answers, torch.tensor([[True, i % 2 == 0] for i in range(B)]), wrong,
                 torch.ones(B, 1, dtype=torch.bool))


def tolerance(family: str) -> float:
    # Gemma's RMSNorms compute in float32 even in a float64 model, so re-summed inputs round differently there
    return 1e-5 if family.startswith("gemma") else 1e-10


# --- (a) all edges kept = the model; none kept = the corrupted run -------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_masked_model_is_the_model_and_the_corrupted_run(family: str) -> None:
    model = tiny_model(family).double()
    em = EdgeModel(model)
    b = random_batch()
    rows = torch.arange(len(b))
    with torch.no_grad():
        clean = model(b.clean).logits[rows, b.last]
        corrupted = model(b.corrupted).logits[rows, b.last]
        cor = em.run(b.corrupted, b.last)
        ones = torch.ones(em.graph.n_edges, dtype=torch.float64)
        kept = em.run(b.clean, b.last, mask=ones, corrupt=cor.writers).logits
        removed = em.run(b.clean, b.last, mask=torch.zeros_like(ones), corrupt=cor.writers).logits
    tol = tolerance(family)
    assert torch.allclose(kept, clean, atol=tol, rtol=0), (kept - clean).abs().max()
    assert torch.allclose(removed, corrupted, atol=tol, rtol=0), (removed - corrupted).abs().max()
    assert not torch.allclose(clean, corrupted, atol=1e-3)  # the two runs differ, so the check has teeth


@pytest.mark.parametrize("family", FAMILIES)
def test_writers_sum_to_the_residual_stream(family: str) -> None:
    """The components are a decomposition: embedding + every head + every MLP = the final norm's input."""
    model = tiny_model(family).double()
    em = EdgeModel(model)
    ad = adapter_for(model)
    b = random_batch()
    seen: dict[str, torch.Tensor] = {}
    handle = get_module(model, ad.final_norm).register_forward_pre_hook(
        lambda m, args: seen.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        model(b.clean)
        handle.remove()
        writers = em.run(b.clean, b.last).writers
    total = sum(w.sum(0) for w in writers)
    assert sum(w.shape[0] for w in writers) == len(em.graph.writers)
    assert torch.allclose(total, seen["x"], atol=tolerance(family), rtol=0)


def test_graph_shape_and_grouped_query_readers() -> None:
    g = component_graph(tiny_model("llama", n_layers=2))  # 4 query heads, 2 key/value heads
    assert [n.name for n in g.readers[:8]] == [f"a0.h{h}<q>" for h in range(4)] + ["a0.g0<k>", "a0.g1<k>",
                                                                                    "a0.g0<v>", "a0.g1<v>"]
    assert len(g.writers) == 1 + 2 * (4 + 1)
    # layer-0 attention readers read only the embedding; m0 reads embed + layer-0 heads; logits read all
    per_reader = torch.bincount(g.edge_reader, minlength=len(g.readers))
    assert per_reader[:8].tolist() == [1] * 8 and int(per_reader[8]) == 5 and int(per_reader[-1]) == len(g.writers)
    assert all(g.writers[w].layer < g.readers[r].layer or (g.readers[r].kind == "mlp" and g.writers[w].kind == "head"
                                                           and g.writers[w].layer == g.readers[r].layer)
               for w, r in zip(g.edge_writer.tolist(), g.edge_reader.tolist(), strict=True))
    gpt2 = component_graph(tiny_model("gpt2", n_layers=2))
    assert "a1.h3<k>" in {n.name for n in gpt2.readers}  # no grouping: one key reader per head


# --- (b) EAP = (corrupted - clean) . gradient, checked without the EAP code --------------------------------

def _mean_ld(em: EdgeModel, b: Batch, mask: torch.Tensor, corrupt: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(logit_diff(em.run(b.clean, b.last, mask=mask, corrupt=corrupt).logits, b).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_eap_equals_finite_differences(family: str) -> None:
    """EAP's score of an edge is -d(mean logit difference)/d(its mask) at the clean run: finite differences of
    the masked model (five-point stencil, h = 0.01: the HF norms compute in float32 even in a float64 model, so
    smaller steps drown in rounding), for edges into every kind of reader."""
    model = tiny_model(family, n_layers=2).double()
    em = EdgeModel(model)
    b = random_batch()
    scores = eap_scores(em, [b], progress=False)
    corrupt = em.run(b.corrupted, b.last).writers
    names = em.graph.edge_index()
    kv = "h" if family == "gpt2" else "g"
    picked = ["embed->a0.h1<q>", f"embed->a0.{kv}1<k>", f"a0.h2->a1.{kv}0<v>", "a0.h3->m0", "m0->a1.h0<q>",
              "a1.h2->logits", "embed->logits", "m1->logits"]
    h = 1e-2

    def at(e: int, value: float) -> float:
        mask = torch.ones(em.graph.n_edges, dtype=torch.float64)
        mask[e] = value
        return _mean_ld(em, b, mask, corrupt)

    for name in picked:
        e = names[name]
        fd = -(-at(e, 1 + 2 * h) + 8 * at(e, 1 + h) - 8 * at(e, 1 - h) + at(e, 1 - 2 * h)) / (12 * h)
        assert abs(float(scores[e]) - fd) < 1e-6 + 1e-3 * abs(fd), (name, float(scores[e]), fd)
    assert max(abs(float(scores[names[n]])) for n in picked) > 1e-3  # not all vanishing


def test_eap_equals_gradients_of_the_plain_model() -> None:
    """For MLP and logit readers, the gradient with respect to a reader's input is taken on the plain HF model
    (a zero added to the MLP's norm input, or the final norm's, on its own path) and the writers' outputs are
    read by hooks: (corrupted - clean) . gradient matches EAP's score."""
    model = tiny_model("llama", n_layers=3).double()
    ad = adapter_for(model)
    em = EdgeModel(model)
    b = random_batch()
    n_layers = ad.n_layers(model)

    def writers(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        hs = [ad.blocks(model)[0].register_forward_pre_hook(
            lambda m, a, k: out.__setitem__("embed", (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)]
        for l in range(n_layers):
            path, _ = ad.hook_point("hook_mlp_out")
            hs.append(get_module(ad.blocks(model)[l], path).register_forward_hook(
                lambda m, a, o, l=l: out.__setitem__(f"m{l}", o.detach())))
        with torch.no_grad():
            model(ids)
        for h in hs:
            h.remove()
        return out

    clean, corrupt = writers(b.clean), writers(b.corrupted)
    deltas = {f"m{l}": torch.zeros(*b.clean.shape, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
              for l in range(n_layers)}
    deltas["logits"] = torch.zeros_like(deltas["m0"], requires_grad=True)
    hs = [get_module(ad.blocks(model)[l], ad.mlp_in_norm).register_forward_pre_hook(
        lambda m, a, l=l: (a[0] + deltas[f"m{l}"],)) for l in range(n_layers)]
    hs.append(get_module(model, ad.final_norm).register_forward_pre_hook(lambda m, a: (a[0] + deltas["logits"],)))
    logits = model(b.clean).logits[torch.arange(len(b)), b.last]
    for h in hs:
        h.remove()
    grads = dict(zip(deltas, torch.autograd.grad(logit_diff(logits, b).sum(), list(deltas.values())), strict=True))

    scores = eap_scores(em, [b], progress=False)
    names = em.graph.edge_index()
    checked = 0
    for writer in ["embed"] + [f"m{l}" for l in range(n_layers)]:
        for reader in [f"m{l}" for l in range(n_layers)] + ["logits"]:
            if f"{writer}->{reader}" not in names:
                continue
            expected = float(((corrupt[writer] - clean[writer]) * grads[reader]).sum()) / len(b)
            assert abs(float(scores[names[f"{writer}->{reader}"]]) - expected) < 1e-9 * max(1, abs(expected))
            checked += 1
    assert checked == 10  # every (embed | MLP) -> (MLP | logits) edge with the writer earlier


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_mask_gradient_is_minus_eap_on_every_edge(family: str) -> None:
    """Two separate gradient paths agree on every edge: EAP (gradients with respect to each reader's input on
    the unmasked run, dotted with writer differences) and the gradient of the masked run with respect to the
    mask at 1 (through the one-matrix mixing and its hand-written backward pass)."""
    em = EdgeModel(tiny_model(family, n_layers=3).double())
    b = random_batch()
    corrupt = em.run(b.corrupted, b.last).writers
    mask = torch.ones(em.graph.n_edges, dtype=torch.float64, requires_grad=True)
    ld = logit_diff(em.run(b.clean, b.last, mask=mask, corrupt=corrupt).logits, b).mean()
    (grad,) = torch.autograd.grad(ld, mask)
    scores = eap_scores(em, [b], progress=False)
    assert torch.allclose(-grad, scores, atol=1e-7, rtol=1e-6), (grad + scores).abs().max()
    assert scores.abs().max() > 1e-2


def test_eap_ig_with_one_step_is_eap() -> None:
    em = EdgeModel(tiny_model("qwen3", n_layers=2).double())
    b = random_batch()
    assert torch.allclose(eap_scores(em, [b], EapConfig(1), progress=False),
                          eap_scores(em, [b], progress=False), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="steps"):
        EapConfig(0)


# --- (c) ground truth --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def truth() -> tuple[EdgeModel, list[Batch], list[Batch]]:
    return EdgeModel(known_circuit_model()), known_circuit_batches(32, 8, seed=0), known_circuit_batches(16, 8, seed=1)


def precision_recall(em: EdgeModel, keep: torch.Tensor) -> tuple[float, float]:
    found = {em.graph.edge_names()[i] for i in keep.nonzero().flatten().tolist()}
    hits = len(found & set(TRUTH))
    return hits / max(1, len(found)), hits / len(TRUTH)


def test_the_known_circuit_is_the_truth(truth: tuple) -> None:
    """Patching any one of the four edges flips every answer; patching any other edge changes the logit
    difference by less than 1e-6; the four alone reproduce the model."""
    em, train, _ = truth
    b = train[0]
    corrupt = em.run(b.corrupted, b.last).writers
    full = _mean_ld(em, b, torch.ones(em.graph.n_edges, dtype=torch.float64), corrupt)
    names = em.graph.edge_names()
    for e, name in enumerate(names):
        mask = torch.ones(em.graph.n_edges, dtype=torch.float64)
        mask[e] = 0
        change = _mean_ld(em, b, mask, corrupt) - full
        assert (change < -15) if name in TRUTH else (abs(change) < 1e-6), (name, change)
    only = torch.tensor([n in TRUTH for n in names], dtype=torch.float64)
    assert abs(_mean_ld(em, b, only, corrupt) - full) < 1e-6


@pytest.mark.parametrize("steps", [1, 5])
def test_eap_and_eap_ig_recover_the_known_circuit(truth: tuple, steps: int) -> None:
    em, train, test = truth
    scores = eap_scores(em, train, EapConfig(steps), progress=False)
    keep = keep_top(scores.abs(), 1 - len(TRUTH) / em.graph.n_edges)
    assert precision_recall(em, keep) == (1.0, 1.0)
    m = evaluate(em, test, keep)
    assert m.edges_kept == 4 and m.kl < 1e-6 and m.accuracy == 1.0 and abs(m.logit_diff_recovered - 1) < 1e-6


def test_edge_pruning_recovers_the_known_circuit(truth: tuple) -> None:
    em, train, test = truth
    sparsity = 1 - len(TRUTH) / em.graph.n_edges
    result = edge_pruning(em, train, EdgePruningConfig(sparsity=sparsity, steps=150, seed=0), progress=False)
    assert precision_recall(em, result.keep) == (1.0, 1.0)
    assert evaluate(em, test, result.keep).kl < 1e-6
    # the learned gates themselves separate the truth: every truth edge's log alpha beats every other edge's
    truth_idx = [em.graph.edge_index()[n] for n in TRUTH]
    others = torch.ones(em.graph.n_edges, dtype=torch.bool)
    others[truth_idx] = False
    assert result.log_alpha[truth_idx].min() > result.log_alpha[others].max()


# --- Edge Pruning: seeded, resumable -------------------------------------------------------------------------

def test_edge_pruning_resumes_to_identical_masks(tmp_path: Path) -> None:
    em = EdgeModel(tiny_model("llama", n_layers=2).double())
    batches = [random_batch(seed=s) for s in range(3)]
    cfg = EdgePruningConfig(sparsity=0.8, steps=24, checkpoint_every=5, seed=3)
    straight = edge_pruning(em, batches, cfg, progress=False)

    class Killed(Exception):
        pass

    def kill_at_13(row: dict) -> None:
        if row["step"] == 12:  # after 13 steps; the last checkpoint is at step 10
            raise Killed

    with pytest.raises(Killed):
        edge_pruning(em, batches, cfg, checkpoint=tmp_path / "ckpt", progress=False, on_step=kill_at_13)
    at_kill = json.loads((tmp_path / "ckpt" / CHECKPOINT_STATE).read_text())
    assert at_kill["step"] == 10 and at_kill["seconds"] > 0
    resumed = edge_pruning(em, batches, cfg, checkpoint=tmp_path / "ckpt", progress=False)
    assert resumed.resumed_from == 10
    assert torch.equal(resumed.log_alpha, straight.log_alpha)
    assert torch.equal(resumed.keep, straight.keep)
    assert [r["kl"] for r in resumed.history] == [r["kl"] for r in straight.history]
    # a finished checkpoint is a no-op resume; other settings are refused, naming the difference
    again = edge_pruning(em, batches, cfg, checkpoint=tmp_path / "ckpt", progress=False)
    assert torch.equal(again.log_alpha, straight.log_alpha)
    assert again.seconds == resumed.seconds > at_kill["seconds"]  # training time counts the steps before a resume
    with pytest.raises(ConfigError, match="lr: 0.1 -> 0.2"):
        edge_pruning(em, batches, EdgePruningConfig(sparsity=0.8, steps=24, checkpoint_every=5, seed=3, lr=0.2),
                     checkpoint=tmp_path / "ckpt", progress=False)
    with pytest.raises(ConfigError, match="other training examples"):
        edge_pruning(em, batches[:2], cfg, checkpoint=tmp_path / "ckpt", progress=False)


def test_edge_pruning_is_seeded() -> None:
    em = EdgeModel(tiny_model("gpt2", n_layers=2).double())
    batches = [random_batch()]
    a = edge_pruning(em, batches, EdgePruningConfig(sparsity=0.5, steps=6, seed=1), progress=False)
    b = edge_pruning(em, batches, EdgePruningConfig(sparsity=0.5, steps=6, seed=1), progress=False)
    c = edge_pruning(em, batches, EdgePruningConfig(sparsity=0.5, steps=6, seed=2), progress=False)
    assert torch.equal(a.log_alpha, b.log_alpha) and not torch.equal(a.log_alpha, c.log_alpha)


@pytest.mark.parametrize("bad", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"steps": 0}, {"lr": 0.0},
                                 {"warmup": 2.0}, {"steps": 1.5}, {"sparsity": float("nan")}])
def test_edge_pruning_config_is_checked(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        EdgePruningConfig(**bad)


# --- memory ---------------------------------------------------------------------------------------------------

def test_memory_estimate_grows_linearly_and_refuses_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    g = component_graph(tiny_model("llama", n_layers=2))
    one = estimate_bytes(g, 1, 10, grad=True)
    assert estimate_bytes(g, 4, 10, grad=True) == 4 * one
    t10, t20, t40 = (estimate_bytes(g, 1, t, grad=True) for t in (10, 20, 40))
    assert t40 - t10 == 3 * (t20 - t10) > 0
    bigger = component_graph(tiny_model("llama", n_layers=4))
    assert estimate_bytes(bigger, 1, 10, grad=True) > one
    monkeypatch.setenv("CLT_HUB_MAX_MEMORY_GB", "0.0000001")
    with pytest.raises(ConfigError, match=r"needs about .* GiB .* use --batch-size"):
        check_memory(g, 64, 512, grad=True)
    em = EdgeModel(tiny_model("llama", n_layers=2).double())
    steps: list[dict] = []
    with pytest.raises(ConfigError, match="GiB"):  # refused before the first step
        edge_pruning(em, [random_batch()], EdgePruningConfig(steps=1), progress=False, on_step=steps.append)
    assert steps == []


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_masked_real_model_is_the_model_and_the_corrupted_run(name: str) -> None:
    """The same invariant on real float32 weights, on an IOI pair: every edge kept = the model's logits, none
    kept = the corrupted run's (to float32 rounding of re-summed inputs)."""
    from test_real_models import _skip_unless_installed

    from clt_hub.circuits import ioi
    from clt_hub.circuits.api import task_batches
    from clt_hub.models.loading import load_model

    _skip_unless_installed(name)
    model, tok = load_model(name)
    train, _ = task_batches(tok, ioi(tok, n=4), 2, None)
    b = train[0]
    em = EdgeModel(model)
    rows = torch.arange(len(b))
    with torch.no_grad():
        clean = model(b.clean).logits[rows, b.last]
        corrupted = model(b.corrupted).logits[rows, b.last]
        cor = em.run(b.corrupted, b.last).writers
        ones = torch.ones(em.graph.n_edges)
        kept = em.run(b.clean, b.last, mask=ones, corrupt=cor).logits
        removed = em.run(b.clean, b.last, mask=torch.zeros_like(ones), corrupt=cor).logits
    scale = clean.abs().max()
    assert (kept - clean).abs().max() < 1e-3 * scale and (removed - corrupted).abs().max() < 1e-3 * scale
    assert (clean - corrupted).abs().max() > 0.1 * scale


KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_circuits import random_batch
from tiny_models import tiny_model
from clt_hub.circuits import EdgeModel, EdgePruningConfig, edge_pruning
em = EdgeModel(tiny_model("llama", n_layers=2).double())
edge_pruning(em, [random_batch(seed=s) for s in range(3)], EdgePruningConfig(sparsity=0.8, steps=400,
             checkpoint_every=5, seed=3), checkpoint={ckpt!r}, progress=False)
"""


@pytest.mark.slow
def test_edge_pruning_killed_process_resumes_to_identical_masks(tmp_path: Path) -> None:
    """SIGKILL a training process once a checkpoint exists; a new run on the same folder goes on from it and ends
    with the masks of an uninterrupted run, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ckpt = tmp_path / "ckpt"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        state = ckpt / CHECKPOINT_STATE
        if state.is_file() and json.loads(state.read_text())["step"] >= 10:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the training process ended before it could be killed"
    stopped_at = json.loads((ckpt / CHECKPOINT_STATE).read_text())["step"]
    assert 10 <= stopped_at < 400
    em = EdgeModel(tiny_model("llama", n_layers=2).double())
    batches = [random_batch(seed=s) for s in range(3)]
    cfg = EdgePruningConfig(sparsity=0.8, steps=400, checkpoint_every=5, seed=3)
    resumed = edge_pruning(em, batches, cfg, checkpoint=ckpt, progress=False)
    straight = edge_pruning(em, batches, cfg, progress=False)
    assert resumed.resumed_from == stopped_at
    assert torch.equal(resumed.log_alpha, straight.log_alpha) and torch.equal(resumed.keep, straight.keep)
