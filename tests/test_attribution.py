"""Exactness invariants of attribution graphs on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder, sum_rounding_bound
from tiny_models import FAMILIES, tiny_model

from clt_hub.attribution.attribute import attribute

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md

IDS = torch.tensor([0, 5, 9, 17, 33, 8, 12, 40])


def _setup(family: str, kind: str, skip: bool = False):
    model = tiny_model(family, n_layers=3, d_model=32).double()
    tc = random_transcoder(kind, "jumprelu", skip, n_layers=3, d_model=32, d_sae=24, dtype="float64",
                           seed=1)
    with torch.no_grad():
        for t in tc.threshold:
            t.fill_(0.5)
        for w in tc.W_skip:
            w.mul_(0.1)
    return model, tc


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("kind", "skip"), [("clt", False), ("plt", True)])
def test_every_value_is_the_sum_of_its_edges(family: str, kind: str, skip: bool) -> None:
    model, tc = _setup(family, kind, skip)
    graph = attribute(model, tc, IDS, batch_size=16)
    assert graph.n_features > 10, "the test needs active features to mean anything"
    rows = torch.cat([torch.arange(graph.n_features),
                      torch.arange(graph.logit_index(0), graph.logit_index(graph.n_logits))])
    expected = graph.values[rows]
    got = graph.adjacency[rows].sum(1) + graph.constants[rows]
    scale = expected.abs().max()
    assert ((got - expected).abs() / scale).max() < 1e-4
    # and the features' values are the encoder pre-activations the transcoder computes
    assert (graph.values[: graph.n_features] > 0.5).all()  # active JumpReLU features are above threshold


def _measure(model, tc, graph, y: torch.Tensor, delta: torch.Tensor | None, emb_delta: torch.Tensor | None):
    """Constrained run: attention and norms frozen, every MLP output pinned to y (+ delta), optional
    change of the token embeddings. Returns every target's value (feature pre-activations, logits)."""
    from clt_hub.models.adapters import adapter_for, get_module
    from clt_hub.models.frozen import FrozenForward

    a = adapter_for(model)
    L, T = graph.n_layers, graph.n_pos
    ff = FrozenForward(model)
    with torch.no_grad(), ff.recording():
        model(IDS[None])
    ins: dict[int, torch.Tensor] = {}
    store: dict[str, torch.Tensor] = {}
    hooks = [get_module(model, a.final_norm).register_forward_hook(lambda m, i, o: store.__setitem__("h", o))]
    for l in range(L):
        mod, _ = a.hook_point(tc.cfg.feature_input_hook)
        hooks.append(get_module(model, f"{a.layers}.{l}.{mod}").register_forward_pre_hook(
            lambda m, i, l=l: ins.__setitem__(l, i[0])))
        out_mod, _ = a.hook_point(tc.cfg.feature_output_hook)
        pinned = y[:, l] + (delta[:, l] if delta is not None else 0)
        hooks.append(get_module(model, f"{a.layers}.{l}.{out_mod}").register_forward_hook(
            lambda m, i, o, v=pinned: v[None].to(o.dtype)))
    if emb_delta is not None:
        hooks.append(get_module(model, a.embed).register_forward_hook(lambda m, i, o: o + emb_delta))
    try:
        with torch.no_grad(), ff.frozen():
            model(IDS[None])
    finally:
        for h in hooks:
            h.remove()
    W_U = get_module(model, a.unembed).weight
    vals = []
    for (l, p, f) in graph.features.tolist():
        vals.append(ins[l][0, p] @ tc.W_enc[l][f] + tc.b_enc[l][f])
    for t in graph.logit_tokens.tolist():
        vals.append(store["h"][0, T - 1] @ (W_U[t] - W_U.mean(0)))
    return torch.stack(vals).detach()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_constrained_intervention_effect_equals_edge(family: str) -> None:
    from clt_hub.models.hooks import mlp_io

    model, tc = _setup(family, "clt")
    graph = attribute(model, tc, IDS, batch_size=32)
    _, y = mlp_io(model, IDS[None])
    y = y[0].to(torch.float64)
    targets = torch.cat([torch.arange(graph.n_features),
                         torch.arange(graph.logit_index(0), graph.logit_index(graph.n_logits))])
    base = _measure(model, tc, graph, y, None, None)
    g = torch.Generator().manual_seed(0)
    L, T, d = graph.n_layers, graph.n_pos, tc.d_model
    for s in torch.randint(0, graph.n_features, (3,), generator=g).tolist():
        layer, pos, feat = graph.features[s].tolist()
        delta = torch.zeros(T, L, d, dtype=torch.float64)
        rows = tc.W_dec[layer][feat].detach()            # [L - layer, d]
        delta[pos, layer:] = -graph.activations[s].double() * rows  # zero the feature's activation
        effect = _measure(model, tc, graph, y, delta, None) - base
        torch.testing.assert_close(effect.float(), -graph.adjacency[targets, s], rtol=1e-4, atol=1e-5)
    for layer, pos in [(0, 3), (1, 6), (2, 7)]:                  # error nodes: remove the error
        e = graph.error_index(layer, pos)
        delta = torch.zeros(T, L, d, dtype=torch.float64)
        rec_err = y[pos, layer] - (tc.decode(_acts_at(tc, model), None)[pos, layer])
        delta[pos, layer] = -rec_err
        effect = _measure(model, tc, graph, y, delta, None) - base
        torch.testing.assert_close(effect.float(), -graph.adjacency[targets, e], rtol=1e-4, atol=1e-5)
    for pos in (1, 5):                                           # token nodes: remove the embedding
        from clt_hub.models.adapters import adapter_for, get_module

        emb = get_module(model, adapter_for(model).embed)(IDS[None]).detach()
        emb_delta = torch.zeros_like(emb)
        emb_delta[0, pos] = -emb[0, pos]
        effect = _measure(model, tc, graph, y, None, emb_delta) - base
        torch.testing.assert_close(effect.float(), -graph.adjacency[targets, graph.token_index(pos)],
                                   rtol=1e-4, atol=1e-5)


def _acts_at(tc, model):
    """The graph's activations: transcoder on the real MLP inputs, BOS zeroed."""
    from clt_hub.models.hooks import mlp_io

    x, _ = mlp_io(model, IDS[None], input_hook=tc.cfg.feature_input_hook)
    acts = tc.encode(x[0].to(tc.dtype)).detach()
    acts[0] = 0
    return acts


def test_bad_prompts_and_mismatched_transcoders() -> None:
    from clt_hub import ConfigError

    model, tc = _setup("gpt2", "clt")
    with pytest.raises(ConfigError, match="prompt is empty"):
        attribute(model, tc, torch.tensor([], dtype=torch.long))
    with pytest.raises(ConfigError, match="prompt has 65 tokens but the model's context is 64"):
        attribute(model, tc, torch.zeros(65, dtype=torch.long))
    with pytest.raises(ConfigError, match="token ids must be in 0..63"):
        attribute(model, tc, torch.tensor([0, 64]))
    wrong = random_transcoder("clt", n_layers=3, d_model=16, d_sae=8, dtype="float64")
    with pytest.raises(ConfigError, match="d_model=16 but the model has 3 layers and hidden size 32"):
        attribute(model, wrong, IDS)
    with pytest.raises(ConfigError, match=r"decoder vectors need about .* GiB, more than the .* GiB planned for \(90% of max_memory_bytes"):
        attribute(model, tc, IDS, max_memory_bytes=1000)


def test_custom_targets_logit_difference() -> None:
    from clt_hub.attribution.targets import logit_difference_target, token_target

    model, tc = _setup("llama", "clt")
    a, b = 7, 11
    diff = attribute(model, tc, IDS, custom_targets=[logit_difference_target(model, a, b)])
    single = attribute(model, tc, IDS, custom_targets=[token_target(model, a), token_target(model, b)])
    assert diff.n_logits == 1 and diff.logit_tokens.tolist() == [-1]
    row = diff.logit_index(0)
    logits = model(IDS[None]).logits[0, -1]
    torch.testing.assert_close(diff.values[row].double(), (logits[a] - logits[b]).detach(), rtol=1e-5, atol=1e-6)
    assert abs(float(diff.adjacency[row].sum() + diff.constants[row] - diff.values[row])) < 1e-4 * float(diff.values[row].abs() + 1)
    # linear: the difference target's edges are the difference of the two token targets' edges
    ra, rb = single.logit_index(0), single.logit_index(1)
    sources = diff.logit_index(0)  # same feature/error/token columns in both graphs
    torch.testing.assert_close(diff.adjacency[row, :sources],
                               single.adjacency[ra, :sources] - single.adjacency[rb, :sources], rtol=1e-4, atol=1e-5)
    # against several rivals: the answer's logit minus their mean
    rivals = attribute(model, tc, IDS, custom_targets=[logit_difference_target(model, a, [b, 3, 5])])
    torch.testing.assert_close(rivals.values[rivals.logit_index(0)].double(),
                               (logits[a] - logits[[b, 3, 5]].mean()).detach(), rtol=1e-5, atol=1e-6)
    from clt_hub import ConfigError

    with pytest.raises(ConfigError, match="target token id 64 is not in the vocabulary"):
        token_target(model, 64)
    with pytest.raises(ConfigError, match="at least one token to subtract"):
        logit_difference_target(model, a, [])


def test_max_feature_nodes_keeps_the_most_influential_features() -> None:
    from clt_hub.attribution.graph import influence, logit_weights, normalized

    model, tc = _setup("gpt2", "clt")
    full = attribute(model, tc, IDS)
    true_influence = influence(normalized(full.adjacency), logit_weights(full))[: full.n_features]
    position = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    budget = full.n_features // 4
    g = attribute(model, tc, IDS, max_feature_nodes=budget, batch_size=8)
    assert g.n_features == budget and g.dropped is not None
    chosen = [position[tuple(f)] for f in g.features.tolist()]
    best = true_influence.topk(budget).values.sum()
    # measured 0.9994 of the best possible total influence; random choice would get ~budget/n of it
    assert true_influence[chosen].sum() / best > 0.95
    rows = torch.cat([torch.arange(g.n_features), torch.arange(g.logit_index(0), g.logit_index(g.n_logits))])
    got = g.adjacency[rows].sum(1) + g.constants[rows] + g.dropped[rows]
    assert ((got - g.values[rows]).abs() / g.values[rows].abs().max()).max() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_graph_agrees_with_float32(family: str) -> None:
    """Half-precision tracing (what GPU users run) keeps the invariant and the float32 edges at bf16 accuracy."""
    model, tc = _setup(family, "clt")
    model, tc = model.float(), tc.float()
    g32 = attribute(model, tc, IDS, batch_size=16)
    g16 = attribute(model.to(torch.bfloat16), tc.to(torch.bfloat16), IDS, batch_size=16)
    rows = torch.cat([torch.arange(g16.n_features),
                      torch.arange(g16.logit_index(0), g16.logit_index(g16.n_logits))])
    got = g16.adjacency[rows].sum(1) + g16.constants[rows]
    # a rounded sum is accurate relative to the sum of its terms' sizes, not to its (cancelled) result
    size = g16.adjacency[rows].abs().sum(1) + g16.constants[rows].abs()
    assert ((got - g16.values[rows]).abs() / size).max() < 1e-2
    # edges between nodes present in both graphs agree (a feature within bf16 rounding of its
    # threshold may fire in one graph only)
    def keys(g):  # a name for every node that means the same in both graphs
        names = [("f", *f) for f in g.features.tolist()]
        names += [("e", i) for i in range(g.n_errors)] + [("t", i) for i in range(g.n_pos)]
        return {n: i for i, n in enumerate(names + [("l", t) for t in g.logit_tokens.tolist()])}

    k16, k32 = keys(g16), keys(g32)
    shared = [n for n in k32 if n in k16]
    assert sum(n[0] == "f" for n in shared) >= 0.95 * g32.n_features
    i16 = torch.tensor([k16[n] for n in shared])
    i32 = torch.tensor([k32[n] for n in shared])
    a16, a32 = g16.adjacency[i16][:, i16], g32.adjacency[i32][:, i32]
    assert ((a16 - a32).abs().max() / a32.abs().max()) < 3e-2


@pytest.mark.parametrize("max_feature_nodes", [None, 12])
def test_a_tight_memory_budget_gives_the_same_graph(max_feature_nodes: int | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathering the decoder rows in every pass and shrinking the batch to fit a small budget change nothing."""
    import clt_hub.attribution.attribute as attribution
    from clt_hub.attribution.pruning import prune, scores

    model, tc = _setup("gpt2", "clt")
    roomy = attribute(model, tc, IDS, batch_size=16, max_feature_nodes=max_feature_nodes)
    monkeypatch.setattr(attribution, "HOLD_DECODERS_FRACTION", 0.0)  # never hold them
    tight = attribute(model, tc, IDS, batch_size=16, max_feature_nodes=max_feature_nodes,
                      max_memory_bytes=300_000)
    assert roomy.meta["timings"]["decoders_held"] and not tight.meta["timings"]["decoders_held"]
    assert tight.meta["timings"]["batch"] < roomy.meta["timings"]["batch"]
    # the plan leaves its margin for other machines' allocators and kernels unused
    assert tight.meta["timings"]["estimated_peak_bytes"] <= (1 - attribution.PLAN_MARGIN) * 300_000
    assert torch.equal(roomy.features, tight.features) and torch.equal(roomy.row_nodes, tight.row_nodes)
    torch.testing.assert_close(tight.rows, roomy.rows, rtol=1e-9, atol=1e-12)
    a, b = prune(roomy), prune(tight)
    assert torch.equal(a.node_mask, b.node_mask) and torch.equal(a.edges, b.edges)
    assert scores(roomy) == pytest.approx(scores(tight), rel=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_recomputed_in_query_blocks_gives_the_same_graph(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long prompts recompute each attention pattern in blocks of queries, inside the vectorised backward
    passes; blocks of 3 of the 8 positions must give the one-block graph."""
    import clt_hub.models.frozen as frozen

    model, tc = _setup(family, "clt")
    whole = attribute(model, tc, IDS, batch_size=16)
    heads = model.config.num_attention_heads
    monkeypatch.setattr(frozen, "PATTERN_BLOCK_BYTES", 3 * heads * len(IDS) * 4)
    blocked = attribute(model, tc, IDS, batch_size=16)
    assert torch.equal(whole.features, blocked.features)
    # not equal by construction: transformers' eager attention takes its softmax in float32 whatever the model's
    # dtype, and a block's softmax sums over the keys its queries reach (fewer than T), in another order. Each
    # of the 3 layers' patterns is thus within gamma_T (float32) of the one-block pattern: 2 gamma_{L T} of the
    # largest value bounds the graph's difference (tests/TOLERANCES.md)
    for a, b in ((blocked.rows, whole.rows), (blocked.values, whole.values)):
        bound = float(sum_rounding_bound(3 * len(IDS), b.abs().max(), torch.float32))
        torch.testing.assert_close(a, b, rtol=0, atol=bound)


def test_rows_are_the_dense_adjacency() -> None:
    """Only features and logits have inputs: the square adjacency is the rows scattered, zeros elsewhere."""
    model, tc = _setup("llama", "clt")
    graph = attribute(model, tc, IDS, batch_size=16)
    dense = graph.adjacency
    assert dense.shape == (graph.n_nodes, graph.n_nodes)
    assert torch.equal(dense[graph.row_nodes], graph.rows)
    others = torch.ones(graph.n_nodes, dtype=torch.bool)
    others[graph.row_nodes] = False
    assert others.sum() == graph.n_errors + graph.n_pos and not dense[others].any()
