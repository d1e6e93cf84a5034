from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from clt_hub import ConfigError
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.hooks import capture, mlp_io

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_model(request.param)


def ids() -> torch.Tensor:
    return torch.tensor([[0, 5, 9, 17, 33, 8, 12, 40]])


def test_residual_structure(model: torch.nn.Module) -> None:
    """block output = resid_mid + MLP output as written: the adapter names the right modules."""
    a = adapter_for(model)
    n = a.n_layers(model)
    points = {}
    for l in range(n):
        points[f"mid.{l}"] = (f"{a.layers}.{l}.{a.hook_point('hook_resid_mid')[0]}", "input")
        points[f"out.{l}"] = (f"{a.layers}.{l}.{a.hook_point('hook_mlp_out')[0]}", "output")
        points[f"block.{l}"] = (f"{a.layers}.{l}", "output")
    with capture(model, points) as s, torch.no_grad():
        model(ids())
    for l in range(n):
        torch.testing.assert_close(s[f"block.{l}"], s[f"mid.{l}"] + s[f"out.{l}"], rtol=1e-5, atol=1e-5)


def test_mlp_io_is_the_mlp(model: torch.nn.Module) -> None:
    a = adapter_for(model)
    ins, outs = mlp_io(model, ids())
    n = a.n_layers(model)
    assert ins.shape == outs.shape == (1, 8, n, model.config.hidden_size)
    with torch.no_grad():
        for l in range(n):
            block = get_module(model, f"{a.layers}.{l}")
            y = get_module(block, a.mlp)(get_module(block, a.mlp_in_norm)(ins[:, :, l]))
            if a.mlp_out_norm:
                y = get_module(block, a.mlp_out_norm)(y)
            torch.testing.assert_close(y, outs[:, :, l], rtol=1e-5, atol=1e-5)
    normed, _ = mlp_io(model, ids(), input_hook="ln2.hook_normalized")
    with torch.no_grad():
        torch.testing.assert_close(normed[:, :, 0], get_module(model, f"{a.layers}.0.{a.mlp_in_norm}")(ins[:, :, 0]))


def test_unembedding_path(model: torch.nn.Module) -> None:
    a = adapter_for(model)
    last = f"{a.layers}.{a.n_layers(model) - 1}"
    with capture(model, {"resid": (last, "output")}) as s, torch.no_grad():
        logits = model(ids()).logits
    with torch.no_grad():
        y = get_module(model, a.unembed)(get_module(model, a.final_norm)(s["resid"]))
    cap = a.softcap(model)
    if cap:
        y = torch.tanh(y / cap) * cap
    torch.testing.assert_close(y, logits, rtol=1e-5, atol=1e-5)


def test_hf_hook_names() -> None:
    a = adapter_for(tiny_model("gpt2"))
    assert a.hf_hook_name("hook_resid_mid") == "transformer.h.{layer}.ln_2:input"
    assert a.hf_hook_name("hook_mlp_out") == "transformer.h.{layer}.mlp"
    g = adapter_for(tiny_model("gemma2"))
    assert g.hf_hook_name("hook_mlp_out") == "model.layers.{layer}.post_feedforward_layernorm"


def test_unknown_model_and_hook() -> None:
    import transformers as T

    with pytest.raises(ConfigError, match="model type 'bert' is not supported.*gpt2.*ModelAdapter"):
        adapter_for(T.BertConfig())
    with pytest.raises(ConfigError, match="hook 'hook_attn_out' is not supported for gpt2"):
        adapter_for(tiny_model("gpt2")).hook_point("hook_attn_out")
