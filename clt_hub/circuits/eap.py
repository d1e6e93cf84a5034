"""Edge attribution patching (EAP, Syed et al. 2023) and EAP with integrated gradients (EAP-IG, Hanna et al. 2024).

The score of edge (w, r) estimates how much the metric (the task's logit difference) changes when the edge is
patched from the corrupted run: (C_w - W_w) . dmetric/d(input of r), summed over positions and averaged over
examples, with C_w, W_w the writer's corrupted and clean outputs. EAP takes the gradient on the clean run (one
backward pass per batch); EAP-IG averages it over `steps` runs whose embedding moves in a straight line from the
corrupted run's to the clean one's (alpha = 1/steps ... 1), which is more faithful for a few more passes.
Edges are ranked by |score|.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from clt_hub.circuits.edge_model import EdgeModel
from clt_hub.circuits.tasks import Batch, logit_diff
from clt_hub.errors import ConfigError


@dataclass(frozen=True)
class EapConfig:
    """steps: 1 is EAP (the gradient at the clean run); more is EAP-IG with that many interpolation steps."""

    steps: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= 1000:
            raise ConfigError(f"EAP steps must be an integer in 1..1000, got {self.steps!r} (1 = EAP; EAP-IG uses "
                              "about 5)")


def reader_gradients(em: EdgeModel, batch: Batch, embed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """d(sum of the batch's logit differences)/d(input of every reader), per reader group [R, B, T, d]."""
    out = em.run(batch.clean, batch.last, embed=embed, keep_inputs=True)
    metric = logit_diff(out.logits, batch).sum()
    return list(torch.autograd.grad(metric, out.reader_inputs))


def eap_scores(em: EdgeModel, batches: Sequence[Batch], config: EapConfig | None = None,
               progress: bool = True) -> torch.Tensor:
    """Signed scores [E]: the estimated change of the mean logit difference when each edge alone is patched."""
    config = config or EapConfig()
    g = em.graph
    dense = torch.zeros(len(g.writers), len(g.readers), dtype=torch.float64)
    n = sum(len(b) for b in batches)
    label = "EAP" if config.steps == 1 else f"EAP-IG ({config.steps} steps)"
    bar = tqdm(total=len(batches) * config.steps, desc=label, disable=not progress, leave=False)
    for batch in batches:
        with torch.no_grad():
            clean = em.run(batch.clean, batch.last).writers
            corrupt = em.run(batch.corrupted, batch.last).writers
        grads: list[torch.Tensor] | None = None
        for k in range(1, config.steps + 1):
            embed = None
            if config.steps > 1:
                alpha = k / config.steps
                embed = corrupt[0][0] + alpha * (clean[0][0] - corrupt[0][0])
            step = reader_gradients(em, batch, embed)
            grads = step if grads is None else [a + b for a, b in zip(grads, step, strict=True)]
            bar.update()
        assert grads is not None
        for group, grad in zip(g.groups, grads, strict=True):
            for c in range(group.n_chunks):
                delta = (corrupt[c] - clean[c]).double()
                dense[g.chunks[c], group.readers] += torch.einsum("wbtd,rbtd->wr", delta, grad.double()) / config.steps
    bar.close()
    return g.gather(dense) / n
