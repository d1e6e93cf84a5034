from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder

from clt_hub import ConfigError, Transcoder, TranscoderConfig
from clt_hub.transcoders.activations import jumprelu, step, topk_relu

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


def explicit_clt(model: Transcoder, x: torch.Tensor) -> torch.Tensor:
    """y[t] = b_dec[t] + sum_{l<=t} W_dec[l->t]^T a[l] (+ W_skip[t] x[t]), written as plain loops."""
    L = model.n_layers
    acts = [model.encode_layer(x[:, l], l) for l in range(L)]
    out = []
    for t in range(L):
        y = model.b_dec[t].expand(x.shape[0], -1).clone()
        for l in range(L):
            if t in model.cfg.target_layers(l):
                y = y + acts[l] @ model.W_dec[l][:, t - l, :]
        if model.cfg.skip:
            y = y + x[:, t] @ model.W_skip[t].T
        out.append(y)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("skip", [False, True])
def test_forward_matches_definition(kind: str, activation: str, skip: bool) -> None:
    model = random_transcoder(kind, activation, skip)
    x = torch.randn(7, model.n_layers, model.d_model)
    recon, acts = model(x)
    assert recon.shape == (7, model.n_layers, model.d_model)
    assert acts.shape == (7, model.n_layers, model.d_sae)
    torch.testing.assert_close(recon, explicit_clt(model, x), rtol=1e-5, atol=1e-5)


def test_plt_has_only_same_layer_decoders() -> None:
    model = random_transcoder("plt")
    assert all(w.shape[1] == 1 for w in model.W_dec)
    x = torch.zeros(1, model.n_layers, model.d_model)
    acts = torch.zeros(1, model.n_layers, model.d_sae)
    acts[0, 0, 3] = 1.0
    out = model.decode(acts) - model.decode(torch.zeros_like(acts))
    assert out[0, 1:].abs().max() == 0  # a layer-0 feature writes nowhere but layer 0
    assert out[0, 0].abs().max() > 0
    del x


def test_clt_layer0_feature_writes_every_later_layer() -> None:
    model = random_transcoder("clt")
    acts = torch.zeros(1, model.n_layers, model.d_sae)
    acts[0, 0, 3] = 2.0
    out = model.decode(acts) - model.decode(torch.zeros_like(acts))
    for t in range(model.n_layers):
        torch.testing.assert_close(out[0, t], 2.0 * model.W_dec[0][3, t])


def test_sparse_encode_matches_dense() -> None:
    model = random_transcoder("clt")
    x = torch.randn(2, 5, model.n_layers, model.d_model)
    dense = model.encode(x)
    sparse = model.encode(x, sparse=True)
    assert sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense)
    torch.testing.assert_close(model.decode(sparse), model.decode(dense))


def test_decoder_rows_and_norms() -> None:
    model = random_transcoder("clt")
    rows = model.decoder_rows(1, torch.tensor([0, 5, 5]))
    assert rows.shape == (3, model.n_layers - 1, model.d_model)
    torch.testing.assert_close(rows[1], model.W_dec[1][5])
    norms = model.decoder_norms()
    torch.testing.assert_close(norms[2, 4], model.W_dec[2][4].flatten().norm())
    with pytest.raises(IndexError, match="feature index out of range"):
        model.decoder_rows(0, torch.tensor([model.d_sae]))
    with pytest.raises(IndexError, match="layer 7 out of range"):
        model.decoder_rows(7)


def test_wrong_input_shape_is_named() -> None:
    model = random_transcoder("clt")
    with pytest.raises(ValueError, match="d_model=8"):
        model(torch.randn(2, model.n_layers, 9))
    skip = random_transcoder("clt", skip=True)
    with pytest.raises(ValueError, match="needs the MLP inputs"):
        skip.decode(torch.zeros(1, skip.n_layers, skip.d_sae))


def test_jumprelu_straight_through_gradients() -> None:
    z = torch.tensor([0.1, 0.45, 0.55, 2.0], requires_grad=True)
    theta = torch.full((4,), 0.5, requires_grad=True)
    eps = 0.2
    a = jumprelu(z, theta, eps)
    torch.testing.assert_close(a.detach(), torch.tensor([0.0, 0.0, 0.55, 2.0]))
    a.sum().backward()
    # d a / d z = H(z - theta); d a / d theta = -(theta/eps) * rect((z - theta)/eps)
    torch.testing.assert_close(z.grad, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.5, -2.5, 0.0]))
    theta2 = torch.full((4,), 0.5, requires_grad=True)
    step(z.detach(), theta2, eps).sum().backward()
    torch.testing.assert_close(theta2.grad, torch.tensor([0.0, -5.0, -5.0, 0.0]))


def test_jumprelu_threshold_gradient_sums_over_batch() -> None:
    z = torch.tensor([[0.5, 0.0], [0.52, 0.0]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5], requires_grad=True)
    jumprelu(z, theta, 0.1).sum().backward()
    assert theta.grad is not None and theta.grad.shape == (2,)
    torch.testing.assert_close(theta.grad, torch.tensor([-10.0, 0.0]))


def test_topk_keeps_k_largest() -> None:
    z = torch.tensor([[3.0, -1.0, 2.0, 0.5, 5.0]])
    torch.testing.assert_close(topk_relu(z, 2), torch.tensor([[3.0, 0.0, 0.0, 0.0, 5.0]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "gelu"}, "supported activations are jumprelu, relu, topk"),
        ({"kind": "sae"}, "supported kinds"),
        ({"activation": "topk"}, "needs config field 'topk'"),
        ({"d_model": 0}, "'d_model' must be a positive integer"),
        ({"dtype": "int8"}, "'dtype'"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    base = {"n_layers": 2, "d_model": 4, "d_sae": 8}
    with pytest.raises(ConfigError, match=message):
        TranscoderConfig(**{**base, **kwargs})


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        TranscoderConfig.from_dict({"n_layers": 2, "d_model": 4, "d_sae": 8, "d_modle": 3})
