"""Sparse decoding in training (TopK/BatchTopK), AuxK, and the JumpReLU coefficient per d_model.

The sparse step must be the dense step's function: the same products, summed in other orders. So gradients and
parameters are compared to bounds derived from the sums' rounding (tests/TOLERANCES.md): a first-order forward
error bound of a chain of sums is gamma_N times the same chain evaluated on the terms' absolute values, N the
number of terms summed along it (Higham, 2nd ed., 3.1 and 3.5). `_magnitudes` evaluates that chain: the
trainer's loss on absolute values, differentiated.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from helpers import decode_rounding_bound, random_transcoder, sum_rounding_bound

from clt_hub.config import Architecture
from clt_hub.errors import ConfigError
from clt_hub.training.config import TrainConfig, config_changes
from clt_hub.training.trainer import Trainer, _schedule
from clt_hub.transcoders.sparse import ActiveIndex

pytestmark = pytest.mark.numeric

L, D, F, K, B = 3, 8, 16, 4, 32


def _trainer(kind: str = "clt", skip: bool = False, sparse: bool | None = None, batch_topk: bool = False,
             **fields: object) -> Trainer:
    cfg = TrainConfig(model="m", dataset="d", n_tokens=B * 100, batch_size=B, lr=1e-2, warmup_steps=1,
                      max_grad_norm=1e9,  # no clipping: its factor would be computed from the rounded norms
                      transcoder=Architecture(kind=kind, d_sae=F, activation="topk", topk=K, skip=skip),  # type: ignore[arg-type]
                      sparse_decode=sparse, batch_topk=batch_topk, **fields)  # type: ignore[arg-type]
    return Trainer(cfg, n_layers=L, d_model=D)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)


def _training_units(tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * tr.scale_in[None, :, None], y * tr.scale_out[None, :, None]


def _gradients(tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of the trainer's loss on (x, y) in training units, and the step's activations."""
    tr.optimizer.zero_grad(set_to_none=True)
    terms = tr.loss_terms(x, y)
    terms["loss"].backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in tr.tc.named_parameters()}
    tr.optimizer.zero_grad(set_to_none=True)
    return grads, terms["acts"].detach()


def _chain_terms(tr: Trainer) -> int:
    """Terms summed along the longest chain behind a gradient: a reconstruction (every source layer's features,
    the bias, the skip path's d_model products, then the residual), then the backward sums: an active value's
    gradient (its row's targets x d_model products) and a weight's gradient (the batch's tokens)."""
    return L * F + 1 + D + 1 + L * D + B


def _magnitudes(tr: Trainer, x: torch.Tensor, y: torch.Tensor, acts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per gradient element, the sum of the absolute values of the terms behind it: the MSE's gradient with every
    weight, input and target replaced by its absolute value and the chosen features' activations by the
    magnitude of their pre-activation sums (|x| @ |W_enc|.T + |b_enc|), at the step's own choice of features."""
    tc, cfg = tr.tc, tr.tc_cfg
    params = {n: p.detach().abs().requires_grad_(True) for n, p in tc.named_parameters()}
    fired = acts > 0
    with torch.enable_grad():
        a = torch.stack([(x[:, l].abs() @ params[f"W_enc.{l}"].T + params[f"b_enc.{l}"]) * fired[:, l]
                         for l in range(L)], dim=1)
        recon = []
        for t in range(L):
            r = params[f"b_dec.{t}"].expand(B, D)
            for s in cfg.source_layers(t):
                r = r + a[:, s] @ params[f"W_dec.{s}"][:, t - s]
            if cfg.skip:
                r = r + x[:, t].abs() @ params[f"W_skip.{t}"].T
            recon.append(r)
        loss = (torch.stack(recon, dim=1) + y.abs()).pow(2).sum(-1).sum(-1).mean()
        names = list(params)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads, strict=True)}


CASES = [("clt", False), ("clt", True), ("plt", False), ("plt", True)]


@pytest.mark.parametrize("batch_topk", [False, True], ids=["topk", "batch_topk"])
@pytest.mark.parametrize(("kind", "skip"), CASES)
def test_one_step_gradients_of_the_sparse_decode_equal_the_dense(kind: str, skip: bool, batch_topk: bool) -> None:
    dense, sparse = _trainer(kind, skip, False, batch_topk), _trainer(kind, skip, None, batch_topk)
    assert sparse.sparse_decode and not dense.sparse_decode
    x, y = _batch()
    with torch.no_grad():  # non-zero skips and biases, so their paths count
        for t in (dense, sparse):
            for p in [*t.tc.W_skip, *t.tc.b_dec, *t.tc.b_enc]:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
            for l in range(L):  # 4 features per layer that never fire
                t.tc.b_enc[l][:4] = -1e3
    for t in (dense, sparse):
        t.fit_scales(x, y)
    xs, ys = _training_units(dense, x, y)
    g_dense, acts = _gradients(dense, xs, ys)
    g_sparse, acts_sparse = _gradients(sparse, xs, ys)
    assert torch.equal(acts, acts_sparse)  # the same features chosen, the same values (one dense encoder pass)
    bound = _magnitudes(dense, xs, ys, acts)
    n = _chain_terms(dense)
    for name, g in g_dense.items():
        tol = sum_rounding_bound(n, bound[name])
        assert ((g - g_sparse[name]).abs() <= tol).all(), (name, float((g - g_sparse[name]).abs().max()))
    # decoder rows of features that fired nowhere get exactly no gradient on either path
    for l in range(L):
        silent = ~(acts[:, l] > 0).any(0)
        assert silent.any() and (g_sparse[f"W_dec.{l}"][silent] == 0).all()
        assert (g_sparse[f"W_enc.{l}"][silent] == 0).all()


def _adam_bound(tr: Trainer, grads: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
                state: dict[str, dict[str, torch.Tensor]], drift: dict[str, torch.Tensor]) -> None:
    """Carry per-element bounds through one AdamW step (betas 0.9/0.999, eps 1e-8, no weight decay): with the
    gradient g known to within delta, m and v within dm, dv (kept in `state`), the update m_hat/(sqrt(v_hat)+eps)
    is within |dm_hat|/den_low + |m_hat| ds/(den den_low) of the dense one (ds bounds |sqrt(v_hat) -
    sqrt(v_hat')|, den_low the smallest denominator in that range); `drift` accumulates lr times that, plus the
    rounding of the update itself (4 operations on |theta| + |lr * update|)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    lr = tr.optimizer.param_groups[0]["lr"]   # the step about to be taken (train_step sets it first)
    step = tr.step + 1
    for name, p in tr.tc.named_parameters():
        g, dg = grads[name], deltas[name]
        st = state.setdefault(name, {k: torch.zeros_like(g) for k in ("m", "v", "dm", "dv")})
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        st["dm"] = b1 * st["dm"] + (1 - b1) * dg
        st["dv"] = b2 * st["dv"] + (1 - b2) * (2 * g.abs() * dg + dg * dg)
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        m_hat, v_hat, dm_hat, dv_hat = st["m"] / bc1, st["v"] / bc2, st["dm"] / bc1, st["dv"] / bc2
        s = v_hat.sqrt()
        low_sum = s + (v_hat - dv_hat).clamp(min=0).sqrt()
        ds = torch.where(low_sum > 0, dv_hat / low_sum.clamp(min=1e-300), dv_hat.sqrt())
        den, den_low = s + eps, (s - ds).clamp(min=0) + eps
        update = m_hat.abs() / den
        d_update = dm_hat / den_low + m_hat.abs() * ds / (den * den_low)
        drift[name] = drift.get(name, torch.zeros_like(g)) + lr * d_update \
            + sum_rounding_bound(4, p.detach().abs() + lr * update)


@pytest.mark.parametrize(("kind", "skip"), CASES)
def test_several_sparse_steps_end_where_the_dense_steps_do(kind: str, skip: bool) -> None:
    """Five train_steps (AdamW, lr 1e-2), each on a new batch: the parameters stay within the rounding bound of
    each step's gradients carried through AdamW (`_adam_bound`). The propagation is first order and leaves out
    how a parameter difference changes the next gradients (a term lr x curvature smaller than the one kept): an
    assumption, as the organism regression's magnitude is; the measured differences sit far inside it."""
    dense, sparse = _trainer(kind, skip, False), _trainer(kind, skip, None)
    x0, y0 = _batch(0)
    for t in (dense, sparse):
        t.fit_scales(x0, y0)
    state: dict[str, dict[str, torch.Tensor]] = {}
    drift: dict[str, torch.Tensor] = {}
    n = _chain_terms(dense)
    moved = 0.0
    for step in range(5):
        x, y = _batch(step)
        xs, ys = _training_units(dense, x, y)
        grads, acts = _gradients(dense, xs, ys)
        mags = _magnitudes(dense, xs, ys, acts)
        deltas = {k: sum_rounding_bound(n, m) for k, m in mags.items()}
        for group in dense.optimizer.param_groups:   # the lr train_step is about to set
            group["lr"] = dense.cfg.lr * _schedule(dense.step, dense.cfg)
        _adam_bound(dense, grads, deltas, state, drift)  # type: ignore[arg-type]
        before = {k: p.detach().clone() for k, p in dense.tc.named_parameters()}
        dense.train_step(x, y)
        sparse.train_step(x, y)
        moved = max(moved, max(float((p.detach() - before[k]).abs().max()) for k, p in dense.tc.named_parameters()))
    worst = 0.0
    for name, p in dense.tc.named_parameters():
        diff = (p.detach() - dict(sparse.tc.named_parameters())[name].detach()).abs()
        assert (diff <= drift[name]).all(), (name, float(diff.max()), float(drift[name].max()))
        worst = max(worst, float(diff.max()))
    assert moved > 1e-3 and worst < 1e-3 * moved   # the steps did move the weights, by far more than the bound


def test_decode_active_equals_decode_with_a_reduce_hook() -> None:
    """The feature-parallel hook (`reduce`, the all-reduce over ranks) is applied to the summed writes before the
    biases, on both paths; the writes alone (`biases=False`) are AuxK's decode."""
    for kind in ("clt", "plt"):
        tc = random_transcoder(kind, "topk", n_layers=L, d_model=D, d_sae=F, seed=3)
        x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
        acts = tc.encode(x)
        values, index = [], []
        for l in range(L):
            pos, feat = acts[:, l].nonzero(as_tuple=True)
            index.append(ActiveIndex.from_entries(pos, feat, B, F))
            values.append(acts[:, l][pos, feat])
        def double(t: torch.Tensor) -> torch.Tensor:
            return 2 * t
        got = tc.decode_active(values, index, reduce=double)
        want = tc.decode(acts, reduce=double, dense=True)
        bound = 2 * decode_rounding_bound(tc, acts)   # `double` doubles the summed writes and their rounding
        assert ((got - want).abs() <= bound).all()
        writes = tc.decode_active(values, index, biases=False)
        assert ((writes + torch.stack(list(tc.b_dec)) - tc.decode(acts, dense=True)).abs()
                <= 2 * decode_rounding_bound(tc, acts)).all()


def test_topk_loss_skips_the_decoder_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = _trainer()
    x, y = _batch()
    tr.fit_scales(x, y)

    def forbidden() -> torch.Tensor:
        raise AssertionError("decoder_norms computed for TopK")

    monkeypatch.setattr(tr.tc, "decoder_norms", forbidden)
    for sparse in (True, False):
        tr.cfg.sparse_decode = sparse
        terms = tr.loss_terms(*_training_units(tr, x, y))
        assert float(terms["sparsity"]) == 0.0 and float(terms["preact"]) == 0.0
        assert torch.equal(terms["loss"], terms["mse"])


# ----------------------------------------------------------------------------- AuxK
def _dead_problem(auxk_coeff: float) -> tuple[int, int, float]:
    """A TopK transcoder (64 features, k=2) on tokens that each sum 2 of 48 unit directions in d_model 16, half
    of the features started with encoder bias -0.5, so they lose the top-k from the start. Returns the dead
    features (silent in the last 10 steps) after 10 and after 120 steps, and the last step's FVU."""
    cfg = TrainConfig(model="m", dataset="d", n_tokens=64 * 120, batch_size=64, lr=1e-2, warmup_steps=1,
                      transcoder=Architecture(kind="plt", d_sae=64, activation="topk", topk=2),
                      auxk_coeff=auxk_coeff, auxk_k=16, dead_after_tokens=10 * 64)
    tr = Trainer(cfg, n_layers=1, d_model=16)
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=-1)
    with torch.no_grad():
        tr.tc.b_enc[0][:32] = -0.5
    counts, fvu = [], 0.0
    for step in range(120):
        which = torch.stack([torch.randperm(48, generator=g)[:2] for _ in range(64)])
        x = ((torch.rand(64, 2, generator=g) + 0.5)[..., None] * directions[which]).sum(1)[:, None, :]
        if step == 0:
            tr.fit_scales(x, x)
        fvu = tr.train_step(x, x)["fvu"]
        if step + 1 in (10, 120):
            counts.append(int(((tr.step - tr.last_fired) >= 10).sum()))
    return counts[0], counts[1], fvu


def test_auxk_revives_features_a_plain_topk_run_leaves_dead() -> None:
    plain_early, plain, plain_fvu = _dead_problem(0.0)
    aux_early, aux, aux_fvu = _dead_problem(1 / 32)
    assert plain_early == aux_early >= 20     # the same start (AuxK waits for a window of silence): many dead
    assert plain >= 30                        # without AuxK, most stay dead (measured here: 43 of 64)
    assert aux <= plain - 15, (plain, aux)    # AuxK revives them (measured here: 14)
    assert aux_fvu < plain_fvu                # and the revived features reconstruct what the others missed


def test_auxk_is_off_by_default_and_counts_only_dead_features() -> None:
    tr = _trainer(auxk_coeff=0.5, auxk_k=3, dead_after_tokens=B)   # dead after one silent step
    x, y = _batch()
    tr.fit_scales(x, y)
    xs, ys = _training_units(tr, x, y)
    assert float(tr.loss_terms(xs, ys)["auxk"]) == 0.0   # step 0: nothing has been silent for a window yet
    tr.train_step(x, y)
    tr.train_step(x, y)
    tr.last_fired[:, :6] = 0   # as if features 0..5 had not fired since the start: dead after a 1-step window
    dead = tr._dead_mask()
    assert dead[:, :6].all() and not dead[:, 6:].any()
    terms = tr.loss_terms(xs, ys)
    assert float(terms["auxk"].detach()) > 0
    assert torch.allclose(terms["loss"], terms["mse"] + 0.5 * terms["auxk"], rtol=1e-6)
    # only dead features get gradient from it: with the main loss's gradient removed, live rows get none
    tr.optimizer.zero_grad(set_to_none=True)
    (tr.loss_terms(xs, ys)["auxk"]).backward()
    for l in range(L):
        live = ~dead[l]
        assert (tr.tc.W_enc[l].grad[live] == 0).all() and (tr.tc.W_dec[l].grad[live] == 0).all()
        assert tr.tc.W_dec[l].grad[dead[l]].abs().sum() > 0
    assert "auxk" not in _trainer().train_step(x, y)   # logs as before when off


# ----------------------------------------------------------------------------- the sparsity coefficient's units
def _jumprelu_trainer(d_model: int, per_d_model: bool) -> Trainer:
    cfg = TrainConfig(model="m", dataset="d", n_tokens=B * 4, batch_size=B, sparsity_coeff=1e-2, sparsity_c=1e4,
                      sparsity_warmup_fraction=0.0, preact_coeff=0.0, sparsity_per_d_model=per_d_model,
                      transcoder=Architecture(kind="clt", d_sae=F, activation="jumprelu"))
    return Trainer(cfg, n_layers=L, d_model=d_model)


@pytest.mark.parametrize("per_d_model", [False, True])
def test_sparsity_per_d_model_makes_the_coefficient_mean_the_same_at_any_width(per_d_model: bool) -> None:
    """One problem at d_model 8 and, embedded, at 32 (inputs and targets zero-padded and scaled by 2, so each
    layer's mean squared norm is still d_model; weights mapped so the features and their activations are the
    same). The loss over n_layers x d_model is then the same at both widths with sparsity_per_d_model (tanh
    saturated by a large sparsity_c, so the penalty counts active features), and 4 times apart without."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, L, 8, generator=g), torch.randn(B, L, 8, generator=g)
    x, y = x * (8 / x.pow(2).sum(-1).mean(0, keepdim=True)).sqrt()[..., None], y * 0.7
    small, wide = _jumprelu_trainer(8, per_d_model), _jumprelu_trainer(32, per_d_model)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([2 * t, torch.zeros(*t.shape[:-1], 24)], dim=-1)

    with torch.no_grad():
        for l in range(L):
            small.tc.threshold[l].fill_(0.05)
            wide.tc.threshold[l].copy_(small.tc.threshold[l])
            wide.tc.b_enc[l].copy_(small.tc.b_enc[l])
            wide.tc.W_enc[l].copy_(pad(small.tc.W_enc[l]) / 4)     # (2 x) . (2 w / 4) = x . w
            wide.tc.W_dec[l].copy_(pad(small.tc.W_dec[l]))
            wide.tc.b_dec[l].copy_(pad(small.tc.b_dec[l]))
    with torch.no_grad():
        a, b = small.loss_terms(x, y), wide.loss_terms(pad(x), pad(y))
    assert torch.equal(a["acts"] > 0, b["acts"] > 0) and float(a["sparsity"]) > 0
    assert math.isclose(float(a["sparsity"]), float(b["sparsity"]), rel_tol=1e-3)   # both count active features
    assert math.isclose(float(a["mse"]) / (L * 8), float(b["mse"]) / (L * 32), rel_tol=1e-5)
    penalty_a = float(a["loss"] - a["mse"]) / (L * 8)
    penalty_b = float(b["loss"] - b["mse"]) / (L * 32)
    if per_d_model:
        assert math.isclose(penalty_a, penalty_b, rel_tol=1e-3)
        assert math.isclose(penalty_a, 1e-2 * float(a["sparsity"]) / L, rel_tol=1e-5)   # the stated meaning
    else:
        assert math.isclose(penalty_a, 4 * penalty_b, rel_tol=1e-3)   # the raw coefficient weighs 4x less at 32


# ----------------------------------------------------------------------------- config and resume
def test_config_boundaries() -> None:
    arch = Architecture(d_sae=16)
    topk = Architecture(d_sae=16, activation="topk", topk=4)
    for bad, message in ((dict(transcoder=arch, sparse_decode=True), "sparse_decode needs"),
                         (dict(transcoder=topk, sparse_decode="yes"), "'sparse_decode' must be"),
                         (dict(transcoder=arch, auxk_coeff=0.1), "auxk_coeff needs"),
                         (dict(transcoder=topk, auxk_coeff=-1.0), "'auxk_coeff' must be"),
                         (dict(transcoder=topk, auxk_k=0), "'auxk_k' must be"),
                         (dict(transcoder=arch, sparsity_per_d_model=1), "'sparsity_per_d_model' must be")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(model="m", dataset="d", **bad)  # type: ignore[arg-type]
    plain = TrainConfig(model="m", dataset="d", transcoder=topk)
    assert plain.sparse_decode is None and plain.auxk_coeff == 0 and not plain.sparsity_per_d_model
    # dead_after_tokens is free on resume unless it chooses AuxK's features
    saved = plain.to_dict()
    assert config_changes(saved, dataclasses.replace(plain, dead_after_tokens=5)) == {}
    aux = dataclasses.replace(plain, auxk_coeff=0.03)
    assert "dead_after_tokens" in config_changes(aux.to_dict(), dataclasses.replace(aux, dead_after_tokens=5))
    assert config_changes(saved, dataclasses.replace(plain, sparse_decode=False)) == {}


def test_checkpoint_resume_with_auxk_is_bit_identical(tmp_path: Path) -> None:
    """AuxK reads the dead features from `last_fired`, which checkpoints hold: a run cut in two and resumed from
    its checkpoint ends with the uninterrupted run's weights, bit for bit."""
    def make(out: Path) -> Trainer:
        return _trainer(auxk_coeff=1 / 32, auxk_k=4, dead_after_tokens=B, out_dir=str(out))

    batches = [_batch(i) for i in range(12)]
    whole = make(tmp_path / "whole")
    whole.fit_scales(*batches[0])
    logged = [whole.train_step(x, y) for x, y in batches]
    assert any(s["auxk"] > 0 for s in logged)
    first = make(tmp_path / "cut")
    first.fit_scales(*batches[0])
    for x, y in batches[:6]:
        first.train_step(x, y)
    saved = first.save_checkpoint()
    assert saved is not None
    second = make(tmp_path / "cut")
    second.load_checkpoint(saved)
    for x, y in batches[6:]:
        second.train_step(x, y)
    for (name, a), b in zip(whole.tc.named_parameters(), second.tc.parameters(), strict=True):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- data-parallel
def _data_parallel_worker(rank: int, port: int, out: str) -> None:
    import math
    import os

    import torch.distributed as dist

    from clt_hub.training.checkpoints import SHARDED
    from clt_hub.training.distributed import sync_and_clip_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tr = _trainer("clt", True)
        x, y = _batch()
        tr.fit_scales(x, y)
        xs, ys = _training_units(tr, x, y)
        part = B // 2
        tr.optimizer.zero_grad(set_to_none=True)
        tr.loss_terms(xs[rank * part:(rank + 1) * part], ys[rank * part:(rank + 1) * part])["loss"].backward()
        # what train_step does between backward and the optimiser, without the clipping (an infinite norm)
        sync_and_clip_gradients(tr.tc, SHARDED, math.inf, average=True, sharded_across_ranks=False)
        if rank == 0:
            torch.save({n: p.grad for n, p in tr.tc.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


def test_sparse_gradients_all_reduce_across_data_parallel_ranks(tmp_path: Path) -> None:
    """Two gloo processes, each with half the batch: the averaged sparse-decode gradients (dense buffers, so the
    all-reduce sums them like any gradient) equal one process's on the whole batch, within the rounding bound
    (one more term: the average of the two halves)."""
    import os

    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_data_parallel_worker, args=(29700 + os.getpid() % 200, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    single = _trainer("clt", True)
    x, y = _batch()
    single.fit_scales(x, y)
    xs, ys = _training_units(single, x, y)
    want, acts = _gradients(single, xs, ys)
    bound = _magnitudes(single, xs, ys, acts)
    for name, g in want.items():
        assert ((g - got[name]).abs() <= sum_rounding_bound(_chain_terms(single) + 1, bound[name])).all(), name
