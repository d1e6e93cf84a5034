"""Weights-based circuits (clt_hub.attribution.weights) against brute force through the model's own modules.

Float32 throughout. Tolerances follow tests/TOLERANCES.md: 2·γₙ times the magnitude of the terms summed, where the
magnitude is the same chain of maps taken in absolute values (`_abs_chain`) and n the summed lengths along it plus
a few for the roundings of single products. The brute forces run on a copy of the model and transcoder whose biases
are zero (biases only add constants, never a weight), so every map is exactly linear and no rounding comes from
subtracting a bias back out."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import random_transcoder, sum_rounding_bound, word_lines
from test_trace_cli import word_tokenizer
from tiny_models import tiny_model
from torch import nn

from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.weights import (
    de_embedding,
    factorise,
    global_weights,
    ov_virtual_weights,
    top_upstream,
    virtual_weights,
)
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.frozen import FrozenForward
from clt_hub.models.hooks import mlp_io

pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("one_thread")]  # numeric: tests/TOLERANCES.md

FAMILIES = ("gpt2", "llama", "gemma2", "gemma3")  # llama, gemma2, gemma3: 4 query heads on 2 key/value heads
HOOKS = ("hook_resid_mid", "ln2.hook_normalized")
IDS = torch.tensor([0, 5, 9, 17, 33, 8, 12, 40])
L, D, F = 3, 32, 24


def _setup(family: str, hook: str = "hook_resid_mid", kind: str = "clt") -> tuple[nn.Module, object]:
    model = tiny_model(family, n_layers=L, d_model=D)
    tc = random_transcoder(kind, "jumprelu", n_layers=L, d_model=D, d_sae=F, seed=1, feature_input_hook=hook)
    with torch.no_grad():
        for t in tc.threshold:
            t.fill_(0.5)
    return model, tc


def _without_biases(module: nn.Module) -> nn.Module:
    """A copy whose biases (HF `*.bias`, the transcoder's b_enc/b_dec) are zero."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.split(".")[-1] == "bias" or name.split(".")[0] in ("b_enc", "b_dec"):
                p.zero_()
    return out


@contextmanager
def _fixed_norms(model: nn.Module, scale: float) -> Iterator[None]:
    """Every norm of `model` applies its formula (clt_hub.models.frozen's frozen norms) with `scale` in place of
    its input's own scale, for any input [1, n <= 4096, d]."""
    ff = FrozenForward(model)
    with torch.no_grad(), ff.recording():
        model(IDS[None])
    ff.scales = {p: torch.full((1, 4096, 1), float(scale)) for p in ff.norms}
    with ff.frozen(), torch.no_grad():
        yield


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A module on rows x [n, d] (as a batch of one sequence)."""
    return module(x[None])[0]


def _matrix(fn, d_in: int) -> torch.Tensor:
    """[d_in, d_out]: a linear map (a bias-free module chain) applied to the identity."""
    return fn(torch.eye(d_in))


def _abs_chain(x: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:
    for m in maps:
        x = x.abs() @ m.abs()
    return x


def _assert_within(got: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, n: int) -> None:
    bound = sum_rounding_bound(n, magnitude)
    excess = (got - expected).abs() - bound
    assert bool((excess <= 0).all()), f"off by {float((got - expected).abs().max()):.3g}, bound {bound}"


def _live_scales(model: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
    """[n]: the scale layer's MLP input norm gives each row of x [n, d], read off the live module (its output is
    that scale times what it gives at scale 1): no formula of the library's."""
    norm = _mlp_norm(model, layer)
    with torch.no_grad():
        live = _call(norm, x) - _call(norm, torch.zeros_like(x))
        with _fixed_norms(model, 1.0):
            one = _call(norm, x) - _call(norm, torch.zeros_like(x))
    return (live * one).sum(-1) / (one * one).sum(-1)


def _mlp_norm(model: nn.Module, layer: int) -> nn.Module:
    a = adapter_for(model)
    return get_module(model, f"{a.layers}.{layer}.{a.mlp_in_norm}")


def _read_map(model_nb: nn.Module, tc, layer: int) -> torch.Tensor:
    """[d, d]: the residual stream -> what the encoder of `layer` reads (the MLP input norm at scale 1, or none)."""
    if tc.cfg.feature_input_hook == "hook_resid_mid":
        return torch.eye(D)
    with _fixed_norms(model_nb, 1.0):
        return _matrix(lambda x: _call(_mlp_norm(model_nb, layer), x), D)


# --- de-embedding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", HOOKS)
def test_de_embedding_equals_brute_force(family: str, hook: str) -> None:
    model, tc = _setup(family, hook)
    model_nb, tc_nb = _without_biases(model), _without_biases(tc)
    a = adapter_for(model)
    layer, feature, vocab = 2, 5, model.config.vocab_size
    with torch.no_grad():
        emb = get_module(model, a.embed)(torch.arange(vocab))             # the module's output, every token
        if a.embed_scale_sqrt_d:  # the adapter's sqrt(d_model) is in transformers' Gemma embedding module
            torch.testing.assert_close(emb, get_module(model, a.embed).weight * D ** 0.5, rtol=2e-7, atol=0)
    e = tc.W_enc[layer][feature].detach()
    tok = word_tokenizer() if family == "gpt2" else None
    cases: list[tuple[float | None, float, str]] = []
    if hook == "hook_resid_mid":
        cases.append((None, 1.0, "none"))
        with pytest.raises(ConfigError, match="leave norm_scale out"):
            de_embedding(model, tc, layer, feature, norm_scale=0.5)
    else:
        real = emb.abs().sum(-1) > 0  # a padding token's all-zero row has no scale of its own
        assert family == "gpt2" or not bool(real.all()), "the tiny model has a padding row: the test covers it"
        cases += [(0.37, 0.37, "given"), (None, float(_live_scales(model_nb, layer, emb[real]).median()), "median")]
    for given, scale, source in cases:
        got = de_embedding(model, tc, layer, feature, k=5, norm_scale=given, tokenizer=tok)
        with _fixed_norms(model_nb, scale):
            reads = _call(_mlp_norm(model_nb, layer), emb) if hook != "hook_resid_mid" else emb
            expected = tc_nb.pre_activations(reads, layer)[:, feature]
        magnitude = _abs_chain(emb, _read_map(model_nb, tc, layer), e[:, None])[:, 0] * scale
        _assert_within(got.weights, expected.detach(), magnitude, 2 * D + 8)  # the norm's sum, the dot, the scale
        assert got.norm_scale_source.startswith(source) and got.norm_scale == pytest.approx(scale, rel=1e-5)
        assert [t.token for t in got.top] == got.weights.topk(5).indices.tolist()
        assert [t.token for t in got.bottom] == got.weights.topk(5, largest=False).indices.tolist()
        assert tok is None or got.top[0].text == tok.decode([got.top[0].token])


def test_hooks_without_the_factorisation_and_bad_indices_are_refused() -> None:
    model, _ = _setup("gpt2")
    reads_mlp = random_transcoder("clt", n_layers=L, d_model=D, d_sae=F, feature_input_hook="mlp.hook_in")
    writes_mlp = random_transcoder("clt", n_layers=L, d_model=D, d_sae=F, feature_output_hook="mlp.hook_out")
    with pytest.raises(ConfigError, match="this transcoder reads 'mlp.hook_in'"):
        virtual_weights(reads_mlp, 2, 0, model)
    with pytest.raises(ConfigError, match="this transcoder writes 'mlp.hook_out'"):
        de_embedding(model, writes_mlp, 2, 0)
    _, tc = _setup("gpt2")
    with pytest.raises(ConfigError, match="layer 3 is out of range .* pick a layer in 0..2"):
        virtual_weights(tc, 3, 0)
    with pytest.raises(ConfigError, match="feature 24 is out of range .* pick a feature in 0..23"):
        de_embedding(model, tc, 0, 24)


# --- virtual weights ------------------------------------------------------------------------------------------

def _written_sums(tc, source: int, before: int) -> torch.Tensor:
    """[F, d]: each feature of `source` put into the residual stream at every layer t it writes to, t < before."""
    resid = torch.zeros(F, D)
    for t in tc.cfg.target_layers(source):
        if t < before:
            resid += tc.W_dec[source][:, t - source].detach()
    return resid


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_virtual_weights_equal_brute_force(family: str, hook: str, kind: str) -> None:
    model, tc = _setup(family, hook, kind)
    model_nb, tc_nb = _without_biases(model), _without_biases(tc)
    layer, feature = 2, 7
    got = virtual_weights(tc, layer, feature, model)
    assert got.shape == (layer, F)
    read = _read_map(model_nb, tc, layer)
    for s in range(layer):
        resid = _written_sums(tc, s, layer)
        with _fixed_norms(model_nb, 1.0), torch.no_grad():
            reads = _call(_mlp_norm(model_nb, layer), resid) if hook != "hook_resid_mid" else resid
            expected = tc_nb.pre_activations(reads, layer)[:, feature]
        magnitude = sum(_abs_chain(tc.W_dec[s][:, t - s].detach(), read, tc.W_enc[layer][feature].detach()[:, None])
                        for t in tc.cfg.target_layers(s) if t < layer)[:, 0]
        _assert_within(got[s], expected, magnitude, (L + 1) * D + 8)
    if hook != "hook_resid_mid":
        with pytest.raises(ConfigError, match="pass model="):
            virtual_weights(tc, layer, feature)
    ranked = top_upstream(got, k=3)
    assert [(u.layer, u.feature) for u in ranked.positive] == \
        [divmod(i, F) for i in got.flatten().topk(3).indices.tolist()]
    assert all(u.weight < 0 for u in ranked.negative) and ranked.negative[0].weight == float(got.min())


def _kv_group(attn: nn.Module, head: int, n_heads: int, n_kv: int) -> int:
    """The key/value head a query head reads, from the family's own repeat_kv (GPT-2 has none: its own head)."""
    repeat = getattr(sys.modules[type(attn).__module__], "repeat_kv", None)
    if repeat is None:
        assert n_kv == n_heads
        return head
    return int(repeat(torch.arange(n_kv).float().view(1, n_kv, 1, 1), n_heads // n_kv)[0, head, 0, 0])


def _ov_maps(model_nb: nn.Module, m: int, head: int) -> list[torch.Tensor]:
    """The OV circuit of one head at layer m as matrices through the bias-free model's own modules: attention
    input norm, v projection (the head's key/value group), o projection (the head's slot), output norm if any."""
    a = adapter_for(model_nb)
    block = get_module(model_nb, f"{a.layers}.{m}")
    attn = get_module(block, a.attn)
    cfg = model_nb.config
    n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dh = getattr(cfg, "head_dim", None) or D // n_heads
    g = _kv_group(attn, head, n_heads, n_kv)
    v_at = (n_heads + n_kv) * dh if len(a.qkv) == 1 else 0   # GPT-2's fused [q | k | v]
    v_proj = get_module(attn, a.qkv[-1])
    with _fixed_norms(model_nb, 1.0):
        maps = [_matrix(lambda x: _call(get_module(block, a.attn_norms[0]), x), D),
                _matrix(lambda x: _call(v_proj, x)[:, v_at + g * dh: v_at + (g + 1) * dh], D)]
        slot = torch.zeros(dh, n_heads * dh)
        slot[:, head * dh:(head + 1) * dh] = torch.eye(dh)
        maps.append(_call(get_module(attn, a.attn_out), slot))                  # [dh, d]
        if a.attn_out_norm is not None:
            maps.append(_matrix(lambda x: _call(get_module(block, a.attn_out_norm), x), D))
    return maps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", HOOKS)
def test_ov_virtual_weights_equal_brute_force(family: str, hook: str) -> None:
    model, tc = _setup(family, hook)
    model_nb = _without_biases(model)
    layer, feature = 2, 3
    e = tc.W_enc[layer][feature].detach()[:, None]
    read = _read_map(model_nb, tc, layer)
    for m in (1, 2):
        for head in range(model.config.num_attention_heads):
            got = ov_virtual_weights(model, tc, layer, feature, m, head)
            assert got.shape == (m, F)
            maps = _ov_maps(model_nb, m, head)
            for s in range(m):
                x = _written_sums(tc, s, m)
                expected, magnitude = x.clone(), torch.zeros(F, 1)
                for mat in [*maps, read, e]:
                    expected = expected @ mat
                magnitude = sum(_abs_chain(tc.W_dec[s][:, t - s].detach(), *maps, read, e)
                                for t in tc.cfg.target_layers(s) if t < m)
                _assert_within(got[s], expected[:, 0], magnitude[:, 0], (L + 6) * D + 8)
    with pytest.raises(ConfigError, match="attn_layer 3 must be in 0..2"):
        ov_virtual_weights(model, tc, layer, feature, 3, 0)
    with pytest.raises(ConfigError, match="head 4 is out of range"):
        ov_virtual_weights(model, tc, layer, feature, 1, 4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_ov_brute_force_maps_are_the_attention_module(family: str) -> None:
    """The v and o matrices the OV brute force chains are what the attention module computes: with every position
    attending only to itself, its output is the sum over heads of input @ W_V(head's group) @ W_O(head's slot). So
    the brute force slices the projections as the model does (GPT-2's fused [q | k | v], grouped-query heads)."""
    import inspect

    import transformers as T

    model = _without_biases(tiny_model(family, n_layers=L, d_model=D))
    a = adapter_for(model)
    m, y = 1, torch.randn(5, D)
    attn = get_module(model, f"{a.layers}.{m}.{a.attn}")
    n_heads = model.config.num_attention_heads

    def self_only(module, query, key, value, attention_mask, **kwargs):  # pattern = identity, groups spread
        return value.repeat_interleave(n_heads // value.shape[1], dim=1).transpose(1, 2).contiguous(), None

    T.AttentionInterface.register("clt_hub_test_self_only", self_only)
    kwargs = {}
    if "position_embeddings" in inspect.signature(attn.forward).parameters:
        kwargs["position_embeddings"] = model.model.rotary_emb(y[None], torch.arange(5)[None])
    before = model.config._attn_implementation
    model.config._attn_implementation = "clt_hub_test_self_only"
    try:
        with torch.no_grad():
            whole = attn(y[None], attention_mask=None, **kwargs)[0][0]
    finally:
        model.config._attn_implementation = before
    maps = [_ov_maps(model, m, h)[1:3] for h in range(n_heads)]
    heads = sum(y @ v @ o for v, o in maps)
    _assert_within(heads, whole, sum(_abs_chain(y, v, o) for v, o in maps), 2 * D + 8)


# --- factorising a traced graph -------------------------------------------------------------------------------

def _zero_attention(model: nn.Module) -> None:
    a = adapter_for(model)
    with torch.no_grad():
        for l in range(L):
            get_module(model, f"{a.layers}.{l}.{a.attn}.{a.attn_out}").weight.zero_()


def _pairs(graph) -> set[tuple[int, int]]:
    """(target, source) feature node pairs at the same position with the source in an earlier layer."""
    f = graph.features.tolist()
    return {(t, s) for t in range(len(f)) for s in range(len(f)) if f[s][1] == f[t][1] and f[s][0] < f[t][0]}


@pytest.mark.parametrize(("family", "hook", "kind"), [(f, h, "clt") for f in FAMILIES for h in HOOKS]
                         + [("gpt2", "hook_resid_mid", "plt"), ("gemma2", "ln2.hook_normalized", "plt")])
def test_graph_edges_factorise_when_attention_adds_nothing(family: str, hook: str, kind: str) -> None:
    model, tc = _setup(family, hook, kind)
    _zero_attention(model)
    graph = attribute(model, tc, IDS, batch_size=64)
    f = factorise(graph, model, tc)
    assert set(zip(f.target.tolist(), f.source.tolist(), strict=True)) == _pairs(graph)
    assert len(f.edge) > 20, "the test needs same-position edges to mean anything"
    model_nb = _without_biases(model)
    reads = {lt: _abs_chain(_read_map(model_nb, tc, lt), tc.W_enc[lt].detach().T) for lt in range(L)}  # [d, F]
    ls, i = graph.features[f.source, 0].tolist(), graph.features[f.source, 2].tolist()
    lt, j = graph.features[f.target, 0].tolist(), graph.features[f.target, 2].tolist()
    terms = torch.stack([sum(tc.W_dec[a][i[n], k - a].detach().abs() for k in tc.cfg.target_layers(a) if k < b)
                         for n, (a, b) in enumerate(zip(ls, lt, strict=True))])                  # [E, d]
    magnitude = torch.stack([terms[n] @ reads[b][:, j[n]] for n, b in enumerate(lt)]) * f.activation * f.norm_factor
    _assert_within(f.residual, f.edge, magnitude, (L + 1) * D + 8)
    assert torch.equal(f.residual, f.activation * f.virtual_weight * f.norm_factor)
    if hook == "hook_resid_mid":
        assert bool((f.norm_factor == 1).all())
    else:
        assert bool((f.norm_factor != 1).all())
    pos = graph.features[:, 1]
    block = graph.block(torch.arange(graph.n_features))
    assert bool((block[pos[:, None] != pos[None, :]] == 0).all()), "no attention: no edge across positions"
    # the unexplained mass is then rounding only: at most the pairs' bounds summed per target
    at = {int(node): n for n, node in enumerate(f.targets)}
    allowed = torch.zeros(len(f.targets), dtype=torch.float64).index_add_(
        0, torch.tensor([at[t] for t in f.target.tolist()], dtype=torch.long),
        sum_rounding_bound((L + 1) * D + 8, magnitude).double())
    assert bool((f.edge_mass > 0).sum() > 5) and bool((f.unexplained <= allowed * (1 + 1e-6) + 1e-12).all())
    # the same model with its attention: the residual terms no longer explain every edge
    model, tc = _setup(family, hook, kind)
    f = factorise(attribute(model, tc, IDS, batch_size=64), model, tc)
    assert bool((f.explained < 0.99).any())


# --- global weights -------------------------------------------------------------------------------------------

def _naive_sums(model: nn.Module, tok, tc, texts: list[str], layer: int, feature: int, n_tokens: int):
    """E[a_s nu a_t] and E[a_t] sums by explicit loops over tokens and features, nu read off the live norm."""
    joint, joint_abs = [[0.0] * F for _ in range(layer)], [[0.0] * F for _ in range(layer)]
    target, used, active, n_texts = 0.0, 0, 0, 0
    model_nb = _without_biases(model)
    for text in texts:
        ids = tok(text)["input_ids"][:64]
        if used == n_tokens:
            break
        n_texts += 1
        x, _ = mlp_io(model, torch.tensor([ids]), input_hook=tc.cfg.feature_input_hook)
        nu = _live_scales(model_nb, layer, mlp_io(model, torch.tensor([ids]), input_hook="hook_resid_mid")[0][0, :, layer])
        for p in range(1 if ids[0] == tok.bos_token_id else 0, len(ids)):
            if used == n_tokens:
                break
            used += 1
            acts = [tc.encode_layer(x[0, p, l], l).detach() for l in range(layer + 1)]
            a_t = float(acts[layer][feature])
            nu_p = 1.0 if tc.cfg.feature_input_hook == "hook_resid_mid" else float(nu[p])
            for s in range(layer):
                for i in range(F):
                    joint[s][i] += float(acts[s][i]) * nu_p * a_t
                    joint_abs[s][i] += abs(float(acts[s][i])) * nu_p * a_t
            target += a_t
            active += a_t != 0
    return torch.tensor(joint, dtype=torch.float64), torch.tensor(joint_abs, dtype=torch.float64), target, used, \
        active, n_texts


@pytest.mark.parametrize(("family", "hook"), [("gpt2", "hook_resid_mid"), ("gemma2", "ln2.hook_normalized"),
                                              ("llama", "ln2.hook_normalized")])
def test_global_weights_equal_their_definition(family: str, hook: str) -> None:
    model, tc = _setup(family, hook)
    tok, texts, layer, n_tokens = word_tokenizer(), word_lines(8, seed=3), 2, 60
    with torch.no_grad():  # a feature that fires on some tokens and not on others
        x, _ = mlp_io(model, torch.tensor([tok(texts[0])["input_ids"]]), input_hook=hook)
        rate = (tc.encode_layer(x[0, 1:, layer], layer) > 0).float().mean(0)
    feature = int((rate - 0.5).abs().argmin())
    got = global_weights(model, tok, tc, texts, layer, feature, n_tokens, k=4)
    joint, joint_abs, target, used, active, n_texts = _naive_sums(model, tok, tc, texts, layer, feature, n_tokens)
    assert (got.tokens, got.active_tokens, got.texts) == (used, active, n_texts) and 0 < active < used
    assert used == n_tokens and n_texts < len(texts), "the token budget must stop the reading for the test to cover it"
    assert got.seconds > 0
    torch.testing.assert_close(got.virtual, virtual_weights(tc, layer, feature, model), rtol=0, atol=0)
    co, co_abs = joint / target, joint_abs / target
    # float64 sums of the same float32 activations; nu (float32) from two computations, each a ratio or root of
    # d-long sums: relative to the terms' magnitude, within 2·γ(2d + 8) (float32), as in the de-embedding test
    bound = sum_rounding_bound(2 * D + 8, co_abs)
    assert bool(((got.coactivation.double() - co).abs() <= bound + 1e-7 * co_abs).all())  # + float32 storage
    expected = co * got.virtual.double()
    assert bool(((got.twera.double() - expected).abs() <= (bound + 2e-7 * co_abs) * got.virtual.double().abs()).all())
    assert [(u.layer, u.feature) for u in got.top_twera.positive] == \
        [divmod(i, F) for i in got.twera.flatten().topk(len(got.top_twera.positive)).indices.tolist()]
    assert [(u.layer, u.feature) for u in got.top_virtual.positive] == \
        [divmod(i, F) for i in got.virtual.flatten().topk(4).indices.tolist()]
    with torch.no_grad():
        tc.threshold[layer][feature] = 1e9  # never fires: nothing co-occurs with it
    silent = global_weights(model, tok, tc, texts, layer, feature, n_tokens)
    assert silent.active_tokens == 0 and not silent.top_twera.positive and not silent.top_twera.negative
    assert silent.top_virtual.positive
    with pytest.raises(ConfigError, match="n_tokens must be a positive"):
        global_weights(model, tok, tc, texts, layer, feature, 0)


def test_clt_hub_feature_prints_and_writes_what_feature_weights_returns(tmp_path: Path) -> None:
    """The CLI's JSON is the library's report (de-embedding, virtual weights, a head's OV weights, TWERA over a
    text file), the tables name each list, and a malformed --head is refused before anything loads."""
    import json

    from test_trace_cli import save_tiny_model_and_clt
    from typer.testing import CliRunner

    from clt_hub.attribution.weights import feature_weights
    from clt_hub.cli import app
    from clt_hub.models.loading import load

    model, clt = save_tiny_model_and_clt(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("w1 w2 w3 w4 w5 w6\nw2 w3 w1 w5\nw6 w5 w4 w3 w2 w1\n")
    args = ["feature", "2", "3", "--model", str(model), "--transcoder", str(clt), "--k", "3", "--head", "1.0",
            "--texts", str(texts), "--n-tokens", "12", "--out", str(tmp_path / "f.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for title in ("de-embedding", "virtual weights (residual stream)", "through head 0 of layer 1", "TWERA"):
        assert title in result.output
    written = json.loads((tmp_path / "f.json").read_text())
    lm, tok, tc = load(str(model), str(clt))
    expected = feature_weights(lm, tok, tc, 2, 3, k=3, heads=[(1, 0)], n_tokens=12,
                               texts=texts.read_text().splitlines())
    written["global_weights"].pop("seconds")
    expected["global_weights"].pop("seconds")
    assert written == json.loads(json.dumps(expected))
    assert written["global_weights"]["tokens"] == 12
    bad = CliRunner().invoke(app, ["feature", "2", "3", "--model", str(tmp_path / "nowhere"), "--transcoder",
                                   str(clt), "--head", "1-0"])
    assert bad.exit_code != 0 and "LAYER.HEAD" in bad.output
