"""QK attribution (clt_hub.attribution.qk): a head's pre-softmax score split over the writers at its query and
key positions. Exact against the real pass on every family, removal effects equal marginals, and a hand-built
model whose head attends by a known feature pair.

Tolerance (tests/TOLERANCES.md's kind): float32 throughout. A score is a bilinear sum of products q_i[e] k_j[e]
after a chain of sums (the d_model projection, the writers on each side, the d_head dot product, the residual
adds of the real pass), so two computations of it in two orders differ by at most 2 gamma_n M, with n those
sums' terms and M = scaling x sum_e (sum_i |q_i[e]|)(sum_j |k_j[e]|), the score's terms in absolute value.
M leaves out cancellation inside the projections, so this is an assumption, not a bound (as the organism's
row there): on these models the largest difference measured was 4.8e-7 M, 2 gamma_n M is at least 8e-6 M.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers as T
from helpers import random_transcoder, sum_rounding_bound
from tiny_models import FAMILIES, tiny_model

from clt_hub import Transcoder
from clt_hub.attribution.qk import QKQuery, QKRecording, QKScore, qk_query, record_qk, top_qk
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.frozen import FrozenForward

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md

IDS = torch.tensor([0, 5, 9, 17, 33, 8, 12, 40])


def _setup(family: str, kind: str = "clt", skip: bool = False) -> tuple[torch.nn.Module, Transcoder]:
    model = tiny_model(family, n_layers=3, d_model=32)
    tc = random_transcoder(kind, "jumprelu", skip, n_layers=3, d_model=32, d_sae=24, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():  # projection biases start at 0: random, so none can hide
            if name.endswith("bias") and "norm" not in name and ".ln_" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for t in tc.threshold:
            t.fill_(0.5)
        for w in tc.W_skip:
            w.mul_(0.1)
    return model, tc


def _tolerance(s: QKScore, scaling: float, rec: QKRecording) -> float:
    magnitude = float((s.q_vectors.abs().sum(0) * s.k_vectors.abs().sum(0)).sum()) * scaling
    return float(sum_rounding_bound(_chain_terms(s, rec), magnitude))


def _attn(model: torch.nn.Module, l: int) -> torch.nn.Module:
    adapter = adapter_for(model)
    return get_module(adapter.blocks(model)[l], adapter.attn)


def _real_qk(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's query [H, T, dh] and key [KV, T, dh] as its attention kernel got them on a pass of its own."""
    ff = FrozenForward(model)
    with torch.no_grad(), ff.recording():
        model(ids[None])
    n = adapter_for(model).n_layers(model)
    return {l: (ff.patterns[id(_attn(model, l))].query[0], ff.patterns[id(_attn(model, l))].key[0]) for l in range(n)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("kind", "skip"), [("clt", False), ("plt", True)])
def test_the_split_sums_to_the_real_score(family: str, kind: str, skip: bool) -> None:
    model, tc = _setup(family, kind, skip)
    rec = record_qk(model, tc, IDS)
    real = _real_qk(model, IDS)
    kinds: set[str] = set()
    for l in range(3):
        H, KV, _ = rec.shape(l)
        assert (H > KV) == (family != "gpt2"), "the tiny models other than GPT-2 use grouped-query attention"
        scaling = float(_attn(model, l).scaling)  # type: ignore[arg-type]
        for q in (0, 4, 7):
            Q = qk_query(rec, l, q)
            assert Q.softcap == (50.0 if family == "gemma2" else None)  # the tiny Gemma-2's attention softcap
            for h in range(H):
                for k in range(q + 1):
                    s = Q.pair(h, k)
                    expected = float(real[l][0][h, q] @ real[l][1][h // (H // KV), k]) * scaling
                    tol = _tolerance(s, scaling, rec)
                    assert abs(float(s.pairs.sum()) - expected) <= tol, (l, h, q, k)
                    assert abs(s.total - expected) <= tol
                    assert abs(float(s.query_marginals.sum()) - expected) <= tol
                    assert abs(float(s.key_marginals.sum()) - expected) <= tol
                    kinds |= {c.kind for c in s.k_contributors}
                _check_pattern(Q, h, q, scaling, real[l][0][h, q], real[l][1][h // (H // KV)])
    expected_kinds = {"token", "attention", "feature", "error", "decoder_bias", "bias"}
    expected_kinds |= {"skip"} if skip else set()
    expected_kinds |= {"position"} if family == "gpt2" else set()
    assert expected_kinds <= kinds


def _check_pattern(Q: QKQuery, h: int, q: int, scaling: float, query: torch.Tensor, keys: torch.Tensor) -> None:
    """The softmax of the scores as the kernel sees them (`logit`: through Gemma-2's softcap; `masked` keys at
    -inf) is the real attention pattern: each logit within 2 gamma_{d_head} of its terms' magnitude (a dot
    product in another order), which the softmax does not enlarge, plus the softmax's own float32 sums."""
    scores = [Q.pair(h, k) for k in range(q + 1)]
    logits = torch.tensor([s.logit for s in scores]).masked_fill(Q.masked, float("-inf"))
    magnitude = float((query.abs() * keys[: q + 1].abs()).sum(-1).max()) * scaling
    atol = float(sum_rounding_bound(query.shape[-1], magnitude)) + float(sum_rounding_bound(q + 1, 1.0))
    torch.testing.assert_close(logits.softmax(0), Q.weights[h].float(), rtol=0, atol=atol)
    assert [s.weight for s in scores] == Q.weights[h].tolist()


def _biases(model: torch.nn.Module, l: int) -> list[torch.nn.Parameter]:
    """The affine constants of layer l's query and key: its attention input norm's and projections' biases."""
    adapter = adapter_for(model)
    block, attn = adapter.blocks(model)[l], _attn(model, l)
    modules = [get_module(block, adapter.attn_norms[0])] + [get_module(attn, p) for p in adapter.qkv]
    return [m.bias for m in modules if isinstance(getattr(m, "bias", None), torch.nn.Parameter)]


@contextmanager
def _frozen_layer(model: torch.nn.Module, l: int) -> Iterator[dict]:
    """Layer l's attention input norm, q_norm and k_norm frozen at this pass's denominators on every later pass
    in the block; `control["delta"] = (pos, vector)` subtracts a vector from that norm's input at `pos`."""
    adapter, attn = adapter_for(model), _attn(model, l)
    ff = FrozenForward(model)  # its norm formulas: _scale records a denominator, _apply applies one
    norms = [get_module(adapter.blocks(model)[l], adapter.attn_norms[0])]
    norms += [attn.q_norm, attn.k_norm] if hasattr(attn, "q_norm") else []
    scales: dict[int, torch.Tensor] = {}

    def keep(m: torch.nn.Module, args: tuple, i: int) -> None:
        scales[i] = ff._scale(m, args[0])

    hooks = [n.register_forward_pre_hook(lambda m, a, i=i: keep(m, a, i)) for i, n in enumerate(norms)]
    with torch.no_grad():
        model(IDS[None])
    for h in hooks:
        h.remove()
    control: dict = {"delta": None}

    def frozen(m: torch.nn.Module, args: tuple, out: torch.Tensor, i: int) -> torch.Tensor:
        x = args[0]
        if i == 0 and control["delta"] is not None:
            pos, vector = control["delta"]
            x = x.clone()
            x[0, pos] -= vector.to(x.dtype)
        return ff._apply(m, x, scales[i])

    hooks = [n.register_forward_hook(lambda m, a, o, i=i: frozen(m, a, o, i)) for i, n in enumerate(norms)]
    try:
        yield control
    finally:
        for h in hooks:
            h.remove()


def _layer_qk(model: torch.nn.Module, l: int) -> tuple[torch.Tensor, torch.Tensor]:
    ff = FrozenForward(model)
    with torch.no_grad(), ff.recording():
        model(IDS[None])
    r = ff.patterns[id(_attn(model, l))]
    return r.query[0], r.key[0]


def _chain_terms(s: QKScore, rec: QKRecording) -> int:
    d_model, d_head = s.q_residuals.shape[1], s.q_vectors.shape[1]
    return d_model + d_head + len(s.q_contributors) + len(s.k_contributors) + 2 * rec.setup.L


def _removal_tolerance(s: QKScore, rec: QKRecording, scaling: float, side: str, i: int,
                       real: tuple[torch.Tensor, torch.Tensor], after: torch.Tensor) -> float:
    """2 gamma_n times the terms of both sides of `effect == marginal` for writer i of `side`: the marginal's
    products (writer i's vector against the other side's writers, in absolute value) and the real passes'
    (the other side's real vector against this side's real and changed vectors)."""
    if side == "key":
        terms = s.q_vectors.abs().sum(0) * s.k_vectors[i].abs() + real[0].abs() * (real[1].abs() + after.abs())
    else:
        terms = s.q_vectors[i].abs() * s.k_vectors.abs().sum(0) + real[1].abs() * (real[0].abs() + after.abs())
    return float(sum_rounding_bound(_chain_terms(s, rec), float(terms.sum()) * scaling))


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_writer_changes_the_score_by_its_marginal(family: str) -> None:
    """Each side's largest writer of every kind, taken out of the layer's input before the frozen norm, moves
    the score by exactly its marginal, the other side held at its real value; zeroing the layer's biases (input
    norm, projections) moves it by the biases' terms."""
    model, tc = _setup(family, "plt", skip=True)
    l, q, k = 2, 7, 4
    rec = record_qk(model, tc, IDS)
    Q = qk_query(rec, l, q)
    H, KV, _ = rec.shape(l)
    scaling = float(_attn(model, l).scaling)  # type: ignore[arg-type]
    with _frozen_layer(model, l) as control:
        query, key = _layer_qk(model, l)
        for head in (0, H - 1):
            s, kv = Q.pair(head, k), head // (H // KV)
            real = (query[head, q], key[kv, k])
            base = float(real[0] @ real[1]) * scaling
            checked = 0
            for side, pos, contributors, marginals, residuals in (
                    ("key", k, s.k_contributors, s.key_marginals, s.k_residuals),
                    ("query", q, s.q_contributors, s.query_marginals, s.q_residuals)):
                for kind in {c.kind for c in contributors} - {"bias"}:
                    of_kind = [i for i, c in enumerate(contributors) if c.kind == kind]
                    i = max(of_kind, key=lambda j: abs(float(marginals[j])))
                    control["delta"] = (pos, residuals[i])
                    q2, k2 = _layer_qk(model, l)
                    control["delta"] = None
                    changed = q2[head, q] if side == "query" else k2[kv, k]
                    after = float(changed @ (real[1] if side == "query" else real[0])) * scaling
                    tol = _removal_tolerance(s, rec, scaling, side, i, real, changed)
                    assert abs((base - after) - float(marginals[i])) <= tol, (side, contributors[i])
                    checked += abs(float(marginals[i])) > 100 * tol  # the comparison can fail
            assert checked >= 8, "most writers' marginals are far above their tolerance"
            _check_bias_terms(model, l, s, rec, scaling, (head, kv, q, k), real)
    # a feature's residual vector is its activation times its decoder row into layers below l
    feature = next(i for i, c in enumerate(s.k_contributors) if c.kind == "feature")
    c = s.k_contributors[feature]
    act = rec.setup.feat_acts[((rec.setup.features == torch.tensor([c.layer, c.pos, c.feature])).all(1))]
    torch.testing.assert_close(s.k_residuals[feature], act * tc.W_dec[c.layer][c.feature, 0].detach())


def _check_bias_terms(model: torch.nn.Module, l: int, s: QKScore, rec: QKRecording, scaling: float,
                      where: tuple[int, int, int, int], real: tuple[torch.Tensor, torch.Tensor]) -> None:
    head, kv, q, k = where
    saved = [b.detach().clone() for b in _biases(model, l)]
    with torch.no_grad():
        for b in _biases(model, l):
            b.zero_()
    try:
        q2, k2 = _layer_qk(model, l)
    finally:
        with torch.no_grad():
            for b, v in zip(_biases(model, l), saved, strict=True):
                b.copy_(v)
    base = float(real[0] @ real[1]) * scaling
    n_q, n_k = len(s.q_contributors) - 1, len(s.k_contributors) - 1
    key_effect = base - float(real[0] @ k2[kv, k]) * scaling
    tol = _removal_tolerance(s, rec, scaling, "key", n_k, real, k2[kv, k])
    assert abs(key_effect - s.bias_terms["key_bias"]) <= tol
    query_effect = base - float(q2[head, q] @ real[1]) * scaling
    tol = _removal_tolerance(s, rec, scaling, "query", n_q, real, q2[head, q])
    assert abs(query_effect - s.bias_terms["query_bias"]) <= tol


# --- a hand-built model ----------------------------------------------------------------------------------------

A_TOKEN, B_TOKEN, A_FEATURE, B_FEATURE = 5, 6, 0, 1
D, D_MLP = 16, 32


def _unit(*pairs: tuple[int, float]) -> torch.Tensor:
    v = torch.zeros(D)
    for i, x in pairs:
        v[i] = x
    return v


def _hand_built() -> tuple[torch.nn.Module, Transcoder]:
    """Two GPT-2 layers (ReLU MLPs). Layer 0's MLP neuron A fires on token A and writes u = e0 - e1, neuron B
    fires on token B and writes v = e2 - e3, thirty others fire at random with small writes; layer 1's head 0
    reads u into its query and v into its key (both mean-free, so LayerNorm's centring keeps them), plus noise.
    The transcoder is the MLPs themselves (ReLU, read at ln_2's output): its features are the neurons."""
    cfg = T.GPT2Config(n_layer=2, n_embd=D, n_head=2, n_inner=D_MLP, vocab_size=8, n_positions=16,
                       activation_function="relu", bos_token_id=0, eos_token_id=1)
    cfg._attn_implementation = "eager"
    model = T.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    u, v = _unit((0, 1.0), (1, -1.0)), _unit((2, 1.0), (3, -1.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if ".ln_" in name and name.endswith("weight") else torch.zeros_like(p))
        model.transformer.wte.weight.copy_(torch.randn(8, D, generator=g) * torch.arange(D).ge(8))
        model.transformer.wte.weight[A_TOKEN] = _unit((4, 1.0), (5, -1.0))
        model.transformer.wte.weight[B_TOKEN] = _unit((6, 1.0), (7, -1.0))
        mlp = model.transformer.h[0].mlp
        mlp.c_fc.weight.copy_(torch.randn(D, D_MLP, generator=g) * 0.3)
        mlp.c_fc.bias.copy_(torch.randn(D_MLP, generator=g) * 0.3)
        mlp.c_proj.weight.copy_(torch.randn(D_MLP, D, generator=g) * 0.1)
        mlp.c_fc.weight[:, A_FEATURE], mlp.c_fc.weight[:, B_FEATURE] = _unit((4, 1.0), (5, -1.0)), _unit((6, 1.0), (7, -1.0))
        mlp.c_fc.bias[[A_FEATURE, B_FEATURE]] = -1.0
        mlp.c_proj.weight[A_FEATURE], mlp.c_proj.weight[B_FEATURE] = 2 * u, 2 * v
        attn = model.transformer.h[1].attn
        attn.c_attn.weight.copy_(torch.randn(D, 3 * D, generator=g) * 0.05)
        attn.c_attn.weight[:, 0] += 3 * u      # head 0's query, its first dimension
        attn.c_attn.weight[:, D] += 3 * v      # head 0's key, its first dimension
    tc = random_transcoder("plt", "relu", n_layers=2, d_model=D, d_sae=D_MLP, feature_input_hook="ln2.hook_normalized")
    with torch.no_grad():
        for l, block in enumerate(model.transformer.h):
            tc.W_enc[l].copy_(block.mlp.c_fc.weight.T)
            tc.b_enc[l].copy_(block.mlp.c_fc.bias)
            tc.W_dec[l][:, 0].copy_(block.mlp.c_proj.weight)
            tc.b_dec[l].copy_(block.mlp.c_proj.bias)
    return model, tc


def test_the_top_pair_is_the_feature_pair_the_head_reads() -> None:
    model, tc = _hand_built()
    ids = torch.tensor([0, B_TOKEN, 3, B_TOKEN, 4, A_TOKEN, 2])
    rec = record_qk(model, tc, ids)
    # the transcoder is the MLP: no error past BOS (whose features zero_bos moves into its error node)
    assert float(rec.setup.errors[1:].abs().max()) < 1e-5
    query = 5
    Q = qk_query(rec, 1, query)
    assert float(Q.weights[0, 1] + Q.weights[0, 3]) > 0.9, "head 0 attends to the B tokens"
    for key in (1, 3):
        s = Q.pair(0, key)
        report = top_qk(s, k=3)
        top = report["top_pairs"][0]
        assert top["query"]["node_id"] == f"0_{A_FEATURE}_{query}"
        assert top["key"]["node_id"] == f"0_{B_FEATURE}_{key}"
        assert top["value"] > 0.9 * s.total > 0
        assert report["top_query"][0]["contributor"]["node_id"] == f"0_{A_FEATURE}_{query}"
        assert report["top_key"][0]["contributor"]["node_id"] == f"0_{B_FEATURE}_{key}"
        assert abs(s.total - s.real) <= _tolerance(s, Q.scaling, rec)
    # at a key without token B, feature B is not there to pair with
    s = Q.pair(0, 2)
    assert all(c.feature != B_FEATURE for c in s.k_contributors)


def test_refusals_name_the_problem() -> None:
    model, tc = _setup("llama")
    rec = record_qk(model, tc, IDS)
    with pytest.raises(ConfigError, match="key 6 is out of range 0..4"):
        qk_query(rec, 1, 4).pair(0, 6)
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        qk_query(rec, 3, 4)
    gemma = tiny_model("gemma2", n_layers=3, d_model=32)
    other = random_transcoder("clt", n_layers=3, d_model=32, d_sae=24, feature_output_hook="mlp.hook_out")
    with pytest.raises(ConfigError, match="hook_mlp_out"):
        record_qk(gemma, other, IDS)


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_the_split_sums_to_the_real_score_on_real_weights(name: str) -> None:
    """Real pretrained weights (tests/test_real_models.py's models, prompt and random calibrated CLT): at the
    prompt's last position, in the first, a middle and the last layer, every head's score for every key is
    the real pass's, and its pairs sum to it."""
    from test_real_models import PROMPT, _calibrated_transcoder, _skip_unless_installed

    from clt_hub.models.loading import encode_prompt, load_model

    _skip_unless_installed(name)
    start = time.perf_counter()
    model, tokenizer = load_model(name)
    ids = encode_prompt(tokenizer, PROMPT)
    tc = _calibrated_transcoder(model, ids, name)
    loaded = time.perf_counter()
    rec = record_qk(model, tc, ids)
    real = _real_qk(model, ids)
    q, L = len(ids) - 1, rec.setup.L
    for l in (0, L // 2, L - 1):
        Q = qk_query(rec, l, q)
        H, KV, _ = rec.shape(l)
        scaling = float(_attn(model, l).scaling)  # type: ignore[arg-type]
        for h in range(H):
            for k in range(q + 1):
                s = Q.pair(h, k)
                expected = float(real[l][0][h, q] @ real[l][1][h // (H // KV), k]) * scaling
                tol = _tolerance(s, scaling, rec)
                assert abs(s.total - expected) <= tol, (l, h, k)
                assert abs(float(s.pairs.sum()) - expected) <= tol, (l, h, k)
    print(f"{name}: load and calibrate {loaded - start:.1f} s, QK checks {time.perf_counter() - loaded:.1f} s")
