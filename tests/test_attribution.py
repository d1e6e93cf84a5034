"""Exactness invariants of attribution graphs on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder
from tiny_models import FAMILIES, tiny_model

from clt_hub.attribution import attribute

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
