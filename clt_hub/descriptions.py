"""Feature labels from weights alone: the tokens a feature's decoders push up (direct logit effect).

Used as `clerp` labels in graph JSON. The direct path ignores attention and later MLPs, as the
"logit lens" on decoder vectors does; top activating contexts need a dataset (not done here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from clt_hub.adapters import adapter_for, get_module
from clt_hub.transcoder import Transcoder


def _final_norm_gain(model: nn.Module) -> torch.Tensor:
    adapter = adapter_for(model)
    weight: torch.Tensor = get_module(model, adapter.final_norm).weight.detach()  # type: ignore[assignment,operator]
    return 1.0 + weight if adapter.norm_kind == "gemma_rmsnorm" else weight


@torch.no_grad()
def logit_effects(model: nn.Module, transcoder: Transcoder, layer: int, features: torch.Tensor) -> torch.Tensor:
    """[k, vocab]: demeaned direct effect on the logits of each feature's summed decoder vectors."""
    adapter = adapter_for(model)
    W_U: torch.Tensor = get_module(model, adapter.unembed).weight.detach()  # type: ignore[assignment,operator]
    dec = transcoder.decoder_rows(layer, features).sum(1).to(W_U.dtype)    # [k, d]
    eff = (dec * _final_norm_gain(model).to(W_U.dtype)) @ W_U.T
    return eff - eff.mean(-1, keepdim=True)


def top_tokens(model: nn.Module, tokenizer: Any, transcoder: Transcoder, layer: int, features: Sequence[int],
               k: int = 3) -> list[list[str]]:
    eff = logit_effects(model, transcoder, layer, torch.tensor(list(features), dtype=torch.long))
    idx = eff.topk(k, dim=-1).indices
    return [[tokenizer.decode([int(t)]) for t in row] for row in idx]


def clerps(model: nn.Module, tokenizer: Any, transcoder: Transcoder, features: torch.Tensor, k: int = 3) -> dict[str, str]:
    """node_id -> label for graph JSON; features: [n, 3] (layer, pos, feature)."""
    out: dict[str, str] = {}
    for layer in features[:, 0].unique().tolist():
        rows = features[features[:, 0] == layer]
        unique = rows[:, 2].unique()
        labels = dict(zip(unique.tolist(), top_tokens(model, tokenizer, transcoder, layer, unique.tolist(), k),
                          strict=True))
        for _, pos, feat in rows.tolist():
            out[f"{layer}_{feat}_{pos}"] = "→ " + ", ".join(repr(t) for t in labels[feat])
    return out
