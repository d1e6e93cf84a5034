"""How good is a transcoder: reconstruction per layer, sparsity, and what happens to the model's
predictions when the transcoder replaces every MLP (with no error terms to hide its mistakes).

Fraction of CE loss recovered = (CE_zero - CE_replaced) / (CE_zero - CE_original), where CE_zero
ablates every MLP output: 1 means the replacement predicts as well as the model, 0 as badly as
having no MLPs at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for
from clt_hub.models.hooks import (
    mlp_io_and_logits,
    mlp_points,
    not_computed,
    replace_outputs,
    transcoder_in_place,
)
from clt_hub.models.loading import check_compatible
from clt_hub.transcoders.transcoder import Transcoder

DENSE_FRACTION = 0.1  # a feature firing on more than this share of tokens is "dense"


@dataclass
class EvalReport:
    n_tokens: int
    nmse: list[float]              # per layer: ||y - y_hat||^2 / ||y||^2
    fvu: list[float]               # per layer: ||y - y_hat||^2 / ||y - mean(y)||^2
    l0: list[float]                # per layer: mean active features per token
    dead_fraction: list[float]     # per layer: never fired on the evaluation tokens
    dense_fraction: list[float]    # per layer: fired on more than DENSE_FRACTION of tokens
    next_token_agreement: float    # argmax of the replacement model == argmax of the model
    kl: float                      # mean KL(model || replacement) per token
    ce_original: float
    ce_replaced: float
    ce_zero_ablated: float

    @property
    def ce_recovered(self) -> float:
        denom = self.ce_zero_ablated - self.ce_original
        return float("nan") if abs(denom) < 1e-12 else (self.ce_zero_ablated - self.ce_replaced) / denom

    def summary(self) -> dict[str, float]:
        """Scalar metrics for the artifact's config and model card."""
        mean = lambda v: float(sum(v) / len(v))  # noqa: E731
        return {"eval_tokens": self.n_tokens, "fvu": round(mean(self.fvu), 6), "nmse": round(mean(self.nmse), 6),
                "l0_per_layer": round(mean(self.l0), 3), "dead_fraction": round(mean(self.dead_fraction), 6),
                "dense_fraction": round(mean(self.dense_fraction), 6),
                "next_token_agreement": round(self.next_token_agreement, 6), "kl": round(self.kl, 6),
                "ce_original": round(self.ce_original, 6), "ce_replaced": round(self.ce_replaced, 6),
                "ce_zero_ablated": round(self.ce_zero_ablated, 6), "ce_recovered": round(self.ce_recovered, 6)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ce_recovered": self.ce_recovered}


_BLOCK_ELEMENTS = 1 << 22  # logits rows are turned into log-probabilities this many elements at a time (16 MB)


def _mlp_paths(model: nn.Module, tc: Transcoder) -> list[str]:
    """The MLP modules whose work a run that overwrites every MLP output throws away (each output point is
    the MLP itself or the norm right after it), so they need not run; none if an output point is elsewhere."""
    adapter = adapter_for(model)
    mlps = [f"{adapter.layers}.{l}.{adapter.mlp}" for l in range(tc.n_layers)]
    after = [f"{adapter.layers}.{l}.{adapter.mlp_out_norm}" if adapter.mlp_out_norm else mlps[l]
             for l in range(tc.n_layers)]
    outs = mlp_points(model, tc.cfg)[1]
    fine = all(side == "output" and path in (mlps[l], after[l]) for l, (path, side) in enumerate(outs))
    return mlps if fine else []


def _logits_with_mlp_outputs(model: nn.Module, tc: Transcoder, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """mode 'replace': every MLP output is the transcoder's reconstruction from the inputs of this
    very run; mode 'zero': every MLP output is zero. The MLPs themselves are not run (their outputs are
    overwritten either way), which changes no bit of the result."""
    with not_computed(model, _mlp_paths(model, tc)):
        if mode == "replace":
            with transcoder_in_place(model, tc):
                return model(ids).logits
        with replace_outputs(model, mlp_points(model, tc.cfg)[1], lambda l, o: torch.zeros_like(o)):
            return model(ids).logits


def _blocks(n_rows: int, vocab: int) -> list[slice]:
    rows = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]


def _metric_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 at least (as `.float()`), float64 for a float64 model."""
    return torch.promote_types(logits.dtype, torch.float32)


def _nll(lp: torch.Tensor, target: torch.Tensor) -> float:
    """Summed negative log-likelihood of `target` (-100: no target) under log-probabilities lp [rows, vocab]:
    cross_entropy(logits, target, reduction='sum', ignore_index=-100) from log_softmax(logits)."""
    picked = lp.gather(-1, target.clamp(min=0)[:, None])[:, 0]
    return -float(picked[target >= 0].sum())


def _compare_logits(plain: torch.Tensor, replaced: torch.Tensor, target: torch.Tensor) -> tuple[float, int, float, float]:
    """KL(plain || replaced) summed over rows, argmax agreements, and both CE sums, for logits [rows, vocab]
    worked through a few rows at a time, so no [rows, vocab] temporary is made."""
    kl = ce_o = ce_r = 0.0
    agree = 0
    dt = _metric_dtype(plain)
    for b in _blocks(plain.shape[0], plain.shape[-1]):
        p, q = plain[b], replaced[b]
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        lp, lq = p.to(dt).log_softmax(-1), q.to(dt).log_softmax(-1)
        ce_o += _nll(lp, target[b])
        ce_r += _nll(lq, target[b])
        kl += float((lp.exp() * (lp - lq)).sum())
        del lp, lq
    return kl, agree, ce_o, ce_r


def _ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    dt = _metric_dtype(logits)
    return float(sum(_nll(logits[b].to(dt).log_softmax(-1), target[b])
                     for b in _blocks(logits.shape[0], logits.shape[-1])))


class _Totals:
    """Running sums of every metric over the chunks evaluated so far."""

    def __init__(self, tc: Transcoder, special: torch.Tensor) -> None:
        L, F = tc.n_layers, tc.d_sae
        self.tc, self.special = tc, special
        self.err = torch.zeros(L, dtype=torch.float64)
        self.sq = torch.zeros(L, dtype=torch.float64)
        self.s1 = torch.zeros(L, tc.d_model, dtype=torch.float64)
        self.fired = torch.zeros(L, F, dtype=torch.float64)
        self.l0 = torch.zeros(L, dtype=torch.float64)
        self.n = self.agree = self.n_pos = self.n_pred = 0
        self.kl = self.ce_o = self.ce_r = self.ce_z = 0.0

    def add(self, model: nn.Module, chunks: list[list[int]]) -> None:
        """Chunks of one length, as one batch: three forward passes (the model, with MLP inputs, outputs and
        logits read at once; the replacement model; every MLP zeroed)."""
        tc = self.tc
        ids = torch.tensor(chunks)
        x, y, logits = mlp_io_and_logits(model, ids, tc.cfg.feature_input_hook, tc.cfg.feature_output_hook)
        keep = ~torch.isin(ids, self.special)
        x, y = x[keep].to(tc.dtype), y[keep].to(tc.dtype)
        recon, a = tc(x)
        self.err += (recon - y).double().pow(2).sum((0, 2))
        self.sq += y.double().pow(2).sum((0, 2))
        self.s1 += y.double().sum(0)
        on = (a > 0).double()
        self.fired += on.sum(0)
        self.l0 += on.sum((0, 2))
        self.n += int(keep.sum())
        del x, y, recon, a, on
        B, T = ids.shape
        target = torch.full_like(ids, -100)   # each position predicts the next token of its own chunk
        target[:, :-1] = ids[:, 1:]
        target = target.reshape(-1)
        logits = logits.reshape(B * T, -1)
        replaced = _logits_with_mlp_outputs(model, tc, ids, "replace").reshape(B * T, -1)
        kl, agree, ce_o, ce_r = _compare_logits(logits, replaced, target)
        del logits, replaced
        self.kl += kl
        self.agree += agree
        self.ce_o += ce_o
        self.ce_r += ce_r
        self.ce_z += _ce(_logits_with_mlp_outputs(model, tc, ids, "zero").reshape(B * T, -1), target)
        self.n_pred += B * (T - 1)
        self.n_pos += B * T


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number of chunks per forward pass, at least 1; got "
                          f"{batch_size!r}: pass e.g. batch_size=8 (--batch-size 8), or 1 for one chunk at a time")
    return batch_size


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, tc: Transcoder, texts: Iterable[str] | str, n_tokens: int = 20000,
             context_size: int = 128, split: str = "train", text_field: str = "text", progress: bool = False,
             batch_size: int = 8) -> EvalReport:
    """Metrics over about `n_tokens` tokens of `texts` (an iterable, or a source for clt_hub.texts).

    Texts are cut into chunks of `context_size` tokens (the last of a text may be shorter) and chunks are read
    until their non-special tokens reach `n_tokens`; chunks of the same length run `batch_size` at a time. The
    batch size changes which chunks share a forward pass, not which chunks are evaluated: the metrics agree
    across batch sizes up to float rounding."""
    from tqdm.auto import tqdm

    from clt_hub.texts import iter_texts
    from clt_hub.training.activation_store import token_chunks

    batch_size = _check_batch_size(batch_size)
    check_compatible(model, tc)
    source = iter_texts(texts, split=split, text_field=text_field) if isinstance(texts, (str, Path)) else texts
    special = torch.tensor(sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}) or [-1])
    totals = _Totals(tc, special)
    bar = tqdm(total=n_tokens, desc="evaluating", unit="tok", disable=not progress)

    def run(chunks: list[list[int]]) -> None:
        before = totals.n
        totals.add(model, chunks)
        bar.update(totals.n - before)

    pending: dict[int, list[list[int]]] = {}  # chunk length -> chunks waiting for a full batch
    counted = 0
    for chunk in token_chunks(source, tokenizer, context_size):
        counted += int((~torch.isin(torch.tensor(chunk), special)).sum())  # the tokens it adds to n
        group = pending.setdefault(len(chunk), [])
        group.append(chunk)
        if len(group) == batch_size:
            run(pending.pop(len(chunk)))
        if counted >= n_tokens:
            break
    for length in sorted(pending):
        run(pending[length])
    bar.close()
    t = totals
    if t.n == 0 or t.n_pred == 0:
        raise ConfigError("no evaluation tokens: the dataset is empty or its texts are shorter than 2 tokens")
    var = t.sq - t.s1.pow(2).sum(-1) / t.n
    return EvalReport(
        n_tokens=t.n, nmse=(t.err / t.sq.clamp(min=1e-12)).tolist(), fvu=(t.err / var.clamp(min=1e-12)).tolist(),
        l0=(t.l0 / t.n).tolist(), dead_fraction=(t.fired == 0).double().mean(-1).tolist(),
        dense_fraction=(t.fired / t.n > DENSE_FRACTION).double().mean(-1).tolist(),
        next_token_agreement=t.agree / t.n_pos, kl=t.kl / t.n_pos,
        ce_original=t.ce_o / t.n_pred, ce_replaced=t.ce_r / t.n_pred, ce_zero_ablated=t.ce_z / t.n_pred)
