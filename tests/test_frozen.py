"""Frozen attention and norms: same logits on the recorded input, and linear in MLP outputs."""

from __future__ import annotations

import pytest
import torch
from helpers import sum_rounding_bound
from tiny_models import FAMILIES, tiny_model

from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.frozen import FrozenForward

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md

IDS = torch.tensor([[0, 5, 9, 17, 33, 8, 12, 40]])


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_model(request.param).double()


def test_frozen_replays_the_recorded_pass(model: torch.nn.Module) -> None:
    ff = FrozenForward(model)
    with torch.no_grad():
        ref = model(IDS).logits
        with ff.recording():
            rec = model(IDS).logits
        with ff.frozen():
            frozen = model(IDS).logits
    torch.testing.assert_close(rec, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(frozen, ref, rtol=1e-10, atol=1e-10)
    assert len(ff.patterns) == adapter_for(model).n_layers(model)


def _final_hidden(model: torch.nn.Module, ff: FrozenForward, recorded: list[torch.Tensor],
                  delta: torch.Tensor | None) -> torch.Tensor:
    """Frozen pass with every MLP output pinned to its recorded value, plus `delta` at layer 0.

    MLPs are the only nonlinearity left once attention and norms are frozen; pinning them (as the
    replacement model does with transcoder outputs + error nodes) leaves a linear map."""
    a = adapter_for(model)
    handles = []
    for l, value in enumerate(recorded):
        point = get_module(model, f"{a.layers}.{l}.{a.hook_point('hook_mlp_out')[0]}")
        add = delta if (l == 0 and delta is not None) else 0.0
        handles.append(point.register_forward_hook(lambda m, args, out, v=value, add=add: v + add))
    try:
        with torch.no_grad(), ff.frozen():
            return model(IDS, output_hidden_states=True).hidden_states[-1]
    finally:
        for h in handles:
            h.remove()


def test_frozen_model_is_linear_in_mlp_outputs(model: torch.nn.Module) -> None:
    from clt_hub.models.hooks import mlp_io

    ff = FrozenForward(model)
    with torch.no_grad(), ff.recording():
        model(IDS)
    _, outs = mlp_io(model, IDS)
    recorded = [outs[:, :, l] for l in range(outs.shape[2])]
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, IDS.shape[1], d, generator=g, dtype=torch.float64)
    v = torch.randn(1, IDS.shape[1], d, generator=g, dtype=torch.float64)
    base = _final_hidden(model, ff, recorded, None)
    fu = _final_hidden(model, ff, recorded, u) - base
    fv = _final_hidden(model, ff, recorded, v) - base
    fuv = _final_hidden(model, ff, recorded, 2 * u - 3 * v) - base
    # HF RMSNorms compute in float32 even in a float64 model, so linearity holds to float32 precision;
    # an unfrozen norm or attention pattern breaks it at order one
    err = (fuv - (2 * fu - 3 * fv)).abs().max() / fuv.abs().max()
    assert err < 1e-5, f"frozen model is not linear in MLP outputs: relative error {err:.2e}"
    assert fu.abs().max() > 1e-3  # the perturbation does reach the output


def test_patterns_recomputed_in_query_blocks_give_the_same_values_and_gradients(
        model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long prompts recompute attention weights a block of queries at a time (never heads x T x T at once);
    blocks of 3 queries over 8 tokens must give the one-block forward and backward."""
    import clt_hub.models.frozen as frozen

    ff = FrozenForward(model)
    with torch.no_grad(), ff.recording():
        model(IDS)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        emb = get_module(model, adapter_for(model).embed)(IDS).detach().requires_grad_(True)
        with ff.frozen():
            out = model(inputs_embeds=emb).logits
        (grad,) = torch.autograd.grad(out[0, -1].square().sum(), emb)
        return out.detach(), grad

    whole = run()
    heads = next(iter(ff.patterns.values())).query.shape[1]
    monkeypatch.setattr(frozen, "PATTERN_BLOCK_BYTES", 3 * heads * IDS.shape[1] * 4)
    assert [b for b in next(iter(ff.patterns.values())).blocks(8)] == [(0, 3), (3, 6), (6, 8)]
    blocked = run()
    # a block's softmax (float32, as transformers' eager attention takes it) sums over the keys its queries
    # reach, in another order than the one-block pattern: within 2 gamma_{L T} of the largest value after the
    # model's layers (tests/TOLERANCES.md); the model is float32, so the same bound covers every other sum
    n = model.config.num_hidden_layers * IDS.shape[1]

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=0, atol=float(sum_rounding_bound(n, b.abs().max(), torch.float32)))

    close(blocked[0], whole[0])
    close(blocked[1], whole[1])
    assert whole[1].abs().max() > 0
    with torch.no_grad(), ff.recording():  # the recorded pass itself, in blocks: still the model's own logits
        recorded = model(IDS).logits
        real = model(IDS).logits
    close(recorded, real)
    close(run()[1], whole[1])
