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
from clt_hub.models.hooks import mlp_io, mlp_points, replace_outputs, transcoder_in_place
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


def _logits_with_mlp_outputs(model: nn.Module, tc: Transcoder, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """mode 'replace': every MLP output is the transcoder's reconstruction from the inputs of this
    very run; mode 'zero': every MLP output is zero."""
    if mode == "replace":
        with transcoder_in_place(model, tc):
            return model(ids).logits
    with replace_outputs(model, mlp_points(model, tc.cfg)[1], lambda l, o: torch.zeros_like(o)):
        return model(ids).logits


def _ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, tc: Transcoder, texts: Iterable[str] | str, n_tokens: int = 20000,
             context_size: int = 128, split: str = "train", text_field: str = "text", progress: bool = False
             ) -> EvalReport:
    """Metrics over about `n_tokens` tokens of `texts` (an iterable, or a source for clt_hub.training.texts)."""
    from tqdm.auto import tqdm

    from clt_hub.training.activation_store import token_chunks
    from clt_hub.training.texts import iter_texts

    check_compatible(model, tc)
    source = iter_texts(texts, split=split, text_field=text_field) if isinstance(texts, (str, Path)) else texts
    L, F = tc.n_layers, tc.d_sae
    special = torch.tensor(sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}) or [-1])
    err = torch.zeros(L, dtype=torch.float64)
    sq = torch.zeros(L, dtype=torch.float64)
    s1 = torch.zeros(L, tc.d_model, dtype=torch.float64)
    fired = torch.zeros(L, F, dtype=torch.float64)
    l0 = torch.zeros(L, dtype=torch.float64)
    n = agree = n_pos = n_pred = 0
    kl = ce_o = ce_r = ce_z = 0.0
    bar = tqdm(total=n_tokens, desc="evaluating", unit="tok", disable=not progress)
    for chunk in token_chunks(source, tokenizer, context_size):
        ids = torch.tensor([chunk])
        x, y = mlp_io(model, ids, tc.cfg.feature_input_hook, tc.cfg.feature_output_hook)
        keep = ~torch.isin(ids[0], special)
        x, y = x[0][keep].to(tc.dtype), y[0][keep].to(tc.dtype)
        recon, a = tc(x)
        err += (recon - y).double().pow(2).sum((0, 2))
        sq += y.double().pow(2).sum((0, 2))
        s1 += y.double().sum(0)
        on = (a > 0).double()
        fired += on.sum(0)
        l0 += on.sum((0, 2))
        n += int(keep.sum())
        logits = model(ids).logits[0].float()
        replaced = _logits_with_mlp_outputs(model, tc, ids, "replace")[0].float()
        zeroed = _logits_with_mlp_outputs(model, tc, ids, "zero")[0].float()
        lp, lq = logits.log_softmax(-1), replaced.log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
        agree += int((logits.argmax(-1) == replaced.argmax(-1)).sum())
        target = ids[0, 1:]
        ce_o += _ce(logits, target)
        ce_r += _ce(replaced, target)
        ce_z += _ce(zeroed, target)
        n_pred += len(target)
        n_pos += logits.shape[0]
        bar.update(int(keep.sum()))
        if n >= n_tokens:
            break
    bar.close()
    if n == 0 or n_pred == 0:
        raise ConfigError("no evaluation tokens: the dataset is empty or its texts are shorter than 2 tokens")
    var = sq - s1.pow(2).sum(-1) / n
    return EvalReport(
        n_tokens=n, nmse=(err / sq.clamp(min=1e-12)).tolist(), fvu=(err / var.clamp(min=1e-12)).tolist(),
        l0=(l0 / n).tolist(), dead_fraction=(fired == 0).double().mean(-1).tolist(),
        dense_fraction=(fired / n > DENSE_FRACTION).double().mean(-1).tolist(),
        next_token_agreement=agree / n_pos, kl=kl / n_pos,
        ce_original=ce_o / n_pred, ce_replaced=ce_r / n_pred, ce_zero_ablated=ce_z / n_pred)
