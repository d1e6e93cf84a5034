from __future__ import annotations

import pytest
import torch
from test_attribution import IDS, _setup
from tiny_models import FAMILIES

from clt_hub import ConfigError
from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.interventions import Intervention, intervene

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("kind", "skip"), [("clt", False), ("plt", True)])
def test_replacement_model_with_errors_reproduces_logits(family: str, kind: str, skip: bool) -> None:
    model, tc = _setup(family, kind, skip)
    for freeze in (True, False):
        r = intervene(model, tc, IDS, [], mode="open", freeze_attention=freeze)
        torch.testing.assert_close(r.logits, r.original_logits, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(r.activations, r.original_activations)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize(("kind", "skip"), [("clt", False), ("clt", True), ("plt", True)])
def test_constrained_effect_on_logits_equals_graph_edges(family: str, kind: str, skip: bool) -> None:
    """With a skip path, the feature's write reaches later layers' skips too (linear, in the graph's edges)."""
    model, tc = _setup(family, kind, skip)
    graph = attribute(model, tc, IDS, batch_size=64)
    for s in (0, graph.n_features // 2, graph.n_features - 1):
        layer, pos, feat = graph.features[s].tolist()
        for factor in (0.0, -2.0, 5.0):
            r = intervene(model, tc, IDS, [Intervention(layer, feat, pos, scale=factor)])
            final = r.logits[-1] - r.original_logits[-1]
            # demeaned logit change = direction . d(final residual); logits are linear in it (no softcap here)
            measured = final[graph.logit_tokens] - final.mean()
            predicted = (factor - 1.0) * graph.adjacency[[graph.logit_index(j) for j in range(graph.n_logits)], s]
            torch.testing.assert_close(measured.float(), predicted, rtol=1e-4, atol=1e-5)


def test_open_loop_intervention_changes_downstream_features() -> None:
    model, tc = _setup("gpt2", "clt")
    base = intervene(model, tc, IDS, [], mode="open")
    layer0 = base.original_activations[:, 0].nonzero()[0].tolist()
    r = intervene(model, tc, IDS, [Intervention(0, layer0[1], layer0[0], value=10.0)], mode="open")
    assert r.activations[layer0[0], 0, layer0[1]] == 10.0
    assert not torch.allclose(r.activations[:, 1:], base.activations[:, 1:])  # later layers respond
    assert not torch.allclose(r.logits, base.logits)
    c = intervene(model, tc, IDS, [Intervention(0, layer0[1], layer0[0], value=10.0)], mode="constrained")
    assert torch.equal(c.activations[:, 1:], c.original_activations[:, 1:])  # nothing else moves


def test_bad_interventions() -> None:
    model, tc = _setup("gpt2", "clt")
    with pytest.raises(ConfigError, match="feature index 24 out of range 0..23"):
        intervene(model, tc, IDS, [Intervention(0, 24, 1, value=1.0)])
    with pytest.raises(ConfigError, match="layer 3 out of range"):
        intervene(model, tc, IDS, [Intervention(3, 0, 1, value=1.0)])
    with pytest.raises(ConfigError, match="position 8 out of range"):
        intervene(model, tc, IDS, [Intervention(0, 0, 8, value=1.0)])
    with pytest.raises(ConfigError, match="exactly one of value= or scale="):
        intervene(model, tc, IDS, [Intervention(0, 0, 1)])


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_generation_without_interventions_is_the_models_own(family: str) -> None:
    from clt_hub.attribution.interventions import generate

    model, tc = _setup(family, "clt")
    ours = generate(model, tc, IDS, [], max_new_tokens=6)
    theirs = model.generate(IDS[None], max_new_tokens=6, do_sample=False, min_new_tokens=6)[0]
    assert torch.equal(ours, theirs)


def test_generation_with_intervention_held_on() -> None:
    from clt_hub.attribution.interventions import generate

    model, tc = _setup("gpt2", "clt")
    base = generate(model, tc, IDS, [], max_new_tokens=5)
    # a strong feature written at every position, including the generated ones
    held = generate(model, tc, IDS, [Intervention(2, 3, None, value=200.0)], max_new_tokens=5)
    assert len(held) == len(base) == len(IDS) + 5
    assert not torch.equal(held, base)


def test_patch_from_another_prompt() -> None:
    from clt_hub.attribution.interventions import patch_from

    model, tc = _setup("gpt2", "clt")
    other = torch.tensor([0, 33, 21, 4, 50])
    source = intervene(model, tc, other, [], mode="open").original_activations
    layer, feat, pos = 1, int(source[3, 1].argmax()), 3
    ivs = patch_from(model, tc, other, [(layer, feat, pos)], target_pos=6)
    r = intervene(model, tc, IDS, ivs, mode="open")
    assert r.activations[6, layer, feat] == source[pos, layer, feat]
    with pytest.raises(ConfigError, match="source position 9 out of range"):
        patch_from(model, tc, other, [(0, 0, 9)], target_pos=1)
