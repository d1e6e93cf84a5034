"""One evaluation for every method: run the model with the circuit's edges kept and every other edge patched from
the corrupted run, on held-out examples, and compare with the full model.

kl: KL(full model || circuit) of the next-token distribution at the prompt's last token, mean over examples.
logit_diff_recovered: (LD(circuit) - LD(corrupted)) / (LD(full) - LD(corrupted)), LD = the task's mean logit
difference. accuracy: the best answer beats the best wrong token. edges_kept / sparsity: of the model's edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from clt_hub.circuits.edge_model import EdgeModel
from clt_hub.circuits.tasks import Batch, correct, logit_diff
from clt_hub.errors import ConfigError


@dataclass
class Reference:
    """What every circuit of one batch is compared with: the full model and the corrupted run."""

    full_logprobs: torch.Tensor      # [B, V]
    full_ld: torch.Tensor            # [B]
    full_correct: torch.Tensor       # [B]
    corrupt_ld: torch.Tensor         # [B]
    corrupt_writers: list[torch.Tensor]


@dataclass(frozen=True)
class CircuitMetrics:
    edges_kept: int
    sparsity: float
    kl: float
    logit_diff: float
    logit_diff_recovered: float
    accuracy: float
    full_logit_diff: float
    corrupt_logit_diff: float
    full_accuracy: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def reference(em: EdgeModel, batch: Batch) -> Reference:
    full = em.run(batch.clean, batch.last).logits
    corrupt = em.run(batch.corrupted, batch.last)
    return Reference(torch.log_softmax(full.float(), -1), logit_diff(full, batch), correct(full, batch),
                     logit_diff(corrupt.logits, batch), [w.detach() for w in corrupt.writers])


def kl_to_full(logits: torch.Tensor, full_logprobs: torch.Tensor) -> torch.Tensor:
    """[B] KL(full || circuit) in nats."""
    logq = torch.log_softmax(logits.float(), -1)
    return (full_logprobs.exp() * (full_logprobs - logq)).sum(-1)


def keep_top(ranking: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The (1 - sparsity) fraction of edges with the highest ranking (bool [E]); ties broken by edge order."""
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1] (the fraction of edges removed), got {sparsity}")
    n = ranking.numel()
    k = round((1.0 - sparsity) * n)
    keep = torch.zeros(n, dtype=torch.bool)
    if k:
        order = torch.sort(ranking.detach().double(), descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep


@torch.no_grad()
def evaluate(em: EdgeModel, batches: Sequence[Batch], keep: torch.Tensor,
             refs: Sequence[Reference] | None = None) -> CircuitMetrics:
    """Metrics of the circuit `keep` (bool [E]) on `batches` (refs: their references, computed if not given)."""
    if keep.shape != (em.graph.n_edges,):
        raise ConfigError(f"the circuit has {keep.numel()} edge flags but the model has {em.graph.n_edges} edges")
    refs = list(refs) if refs is not None else [reference(em, b) for b in batches]
    mask = keep.to(em.dtype)
    kl, ld, acc, full_ld, cor_ld, full_acc, n = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for batch, ref in zip(batches, refs, strict=True):
        logits = em.run(batch.clean, batch.last, mask=mask, corrupt=ref.corrupt_writers).logits
        kl += float(kl_to_full(logits, ref.full_logprobs).sum())
        ld += float(logit_diff(logits, batch).sum())
        acc += float(correct(logits, batch).sum())
        full_ld += float(ref.full_ld.sum())
        cor_ld += float(ref.corrupt_ld.sum())
        full_acc += float(ref.full_correct.sum())
        n += len(batch)
    kept = int(keep.sum())
    span = full_ld - cor_ld
    return CircuitMetrics(kept, 1.0 - kept / keep.numel(), kl / n, ld / n,
                          (ld - cor_ld) / span if span else float("nan"), acc / n, full_ld / n, cor_ld / n, full_acc / n)


def sweep(em: EdgeModel, batches: Sequence[Batch], ranking: torch.Tensor, sparsities: Sequence[float],
          progress: bool = True) -> list[CircuitMetrics]:
    """Metrics of the top-ranked circuits at each sparsity (one reference pass shared by all)."""
    refs = [reference(em, b) for b in batches]
    return [evaluate(em, batches, keep_top(ranking, s), refs)
            for s in tqdm(sparsities, desc="evaluate", disable=not progress, leave=False)]
