"""Interop with the real sae-lens package (installed by the [dev] extra)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import random_transcoder
from hubserver import FakeHub
from test_artifacts import assert_identical

from clt_hub import Transcoder
from clt_hub.artifacts.saelens_loaders import clt_layer_disk_loader, clt_layer_loader

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md

sae_lens = pytest.importorskip("sae_lens", reason="install the [dev] extra for SAE-Lens interop tests")
SAE = sae_lens.SAE


def _check_layer(sae, model: Transcoder, layer: int, same_layer_decoder_only: bool) -> None:
    x = torch.randn(6, model.d_model)
    ours = model.encode_layer(x, layer)
    theirs = sae.encode(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    expected = ours @ model.W_dec[layer][:, 0, :] + model.b_dec[layer]
    if model.cfg.skip:
        expected = expected + x @ model.W_skip[layer].T
    torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)
    if not same_layer_decoder_only:
        full = torch.zeros(6, model.n_layers, model.d_model)
        full[:, layer] = x
        # for a PLT, layer `layer` of the reconstruction depends on layer `layer` only
        torch.testing.assert_close(model(full)[0][:, layer], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("activation", "skip"), [("jumprelu", False), ("jumprelu", True), ("relu", False), ("relu", True)])
def test_plt_loads_in_saelens_from_disk_with_no_extra_code(tmp_path: Path, activation: str, skip: bool) -> None:
    model = random_transcoder("plt", activation, skip, model_name="gpt2")
    model.save_pretrained(tmp_path / "a")
    for layer in range(model.n_layers):
        sae = SAE.load_from_disk(tmp_path / "a" / f"layer_{layer}")
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_mid"
        _check_layer(sae, model, layer, same_layer_decoder_only=False)


def test_plt_loads_in_saelens_from_hub(hub: FakeHub, tmp_path: Path) -> None:
    model = random_transcoder("plt", skip=True, model_name="gpt2")
    model.save_pretrained(tmp_path / "a")
    hub.add_folder("org/plt-for-saelens", tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.from_pretrained("org/plt-for-saelens", "layer_2")
    _check_layer(sae, model, 2, same_layer_decoder_only=False)


@pytest.mark.parametrize("skip", [False, True])
def test_clt_layer_loads_in_saelens_with_converter(hub: FakeHub, tmp_path: Path, skip: bool) -> None:
    model = random_transcoder("clt", skip=skip, model_name="gpt2")
    model.save_pretrained(tmp_path / "a")
    for layer in range(model.n_layers):
        sae = SAE.load_from_disk(tmp_path / "a" / f"layer_{layer}", converter=clt_layer_disk_loader)
        _check_layer(sae, model, layer, same_layer_decoder_only=True)
    repo = f"org/clt-for-saelens-{int(skip)}"
    hub.add_folder(repo, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.from_pretrained(repo, "layer_1", converter=clt_layer_loader)
    _check_layer(sae, model, 1, same_layer_decoder_only=True)


def test_saelens_transcoders_load_into_clt_hub(tmp_path: Path) -> None:
    """Transcoders that SAE-Lens itself saved (its own cfg.json, its own weight names)."""
    from sae_lens import JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig

    n_layers, d, F = 3, 8, 16
    saes = []
    for layer in range(n_layers):
        cfg = JumpReLUSkipTranscoderConfig(d_in=d, d_sae=F, d_out=d, apply_b_dec_to_input=False)
        cfg.metadata.hook_name = f"blocks.{layer}.ln2.hook_normalized"
        cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
        cfg.metadata.model_name = "gpt2"
        sae = JumpReLUSkipTranscoder(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.3)
        sae.save_model(tmp_path / "set" / f"blocks.{layer}")
        saes.append(sae)
    model = Transcoder.from_pretrained(tmp_path / "set")
    assert (model.cfg.kind, model.cfg.skip, model.cfg.activation) == ("plt", True, "jumprelu")
    assert model.cfg.feature_input_hook == "ln2.hook_normalized" and model.cfg.model_name == "gpt2"
    x = torch.randn(5, n_layers, d)
    recon, acts = model(x)
    for layer, sae in enumerate(saes):
        torch.testing.assert_close(acts[:, layer], sae.encode(x[:, layer]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(recon[:, layer], sae(x[:, layer]), rtol=1e-5, atol=1e-5)
    # and it survives our own round trip
    model.save_pretrained(tmp_path / "ours")
    assert_identical(model, Transcoder.from_pretrained(tmp_path / "ours"))
