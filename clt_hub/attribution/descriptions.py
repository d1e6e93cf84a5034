"""Feature labels from weights alone: the tokens a feature's decoders push up (direct logit effect).

Used as `clerp` labels in graph JSON. The direct path ignores attention and later MLPs, as the
"logit lens" on decoder vectors does. With a text source, `top_contexts` adds where each feature
fires most strongly, which is what people actually read to name a feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.projections import norm_gain
from clt_hub.transcoders.transcoder import Transcoder


def _final_norm_gain(model: nn.Module) -> torch.Tensor:
    adapter = adapter_for(model)
    norm = get_module(model, adapter.final_norm)
    return norm_gain(adapter.norm_kind, norm, norm.weight.dtype)  # type: ignore[arg-type]


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


def clerps(model: nn.Module, tokenizer: Any, transcoder: Transcoder, features: torch.Tensor, k: int = 3,
           contexts: dict[tuple[int, int], list[Context]] | None = None) -> dict[str, str]:
    """node_id -> label for graph JSON; features: [n, 3] (layer, pos, feature). With `contexts`
    (from `top_contexts`), the token the feature fires on most strongly is added."""
    out: dict[str, str] = {}
    for layer in features[:, 0].unique().tolist():
        rows = features[features[:, 0] == layer]
        unique = rows[:, 2].unique()
        labels = dict(zip(unique.tolist(), top_tokens(model, tokenizer, transcoder, layer, unique.tolist(), k),
                          strict=True))
        for _, pos, feat in rows.tolist():
            label = "→ " + ", ".join(repr(t) for t in labels[feat])
            found = (contexts or {}).get((layer, feat))
            if found:
                label += f" | fires on {found[0].token!r}"
            out[f"{layer}_{feat}_{pos}"] = label
    return out


@dataclass(frozen=True)
class Context:
    """One place a feature fires: the text up to and including the token, and the activation there."""

    text: str
    token: str
    activation: float


@torch.no_grad()
def top_contexts(model: nn.Module, tokenizer: Any, transcoder: Transcoder, texts: Iterable[str],
                 features: Sequence[tuple[int, int]], k: int = 5, window: int = 12, max_length: int = 128,
                 max_texts: int | None = None, progress: bool = False) -> dict[tuple[int, int], list[Context]]:
    """The k strongest activations of each (layer, feature) over `texts` (one token per text at most
    once, so a feature that fires on a whole document does not fill its list with it)."""
    from tqdm.auto import tqdm

    from clt_hub.models.hooks import mlp_io

    wanted = sorted({(int(l), int(f)) for l, f in features})
    by_layer: dict[int, torch.Tensor] = {}
    for l, f in wanted:
        by_layer.setdefault(l, torch.empty(0, dtype=torch.long))
        by_layer[l] = torch.cat([by_layer[l], torch.tensor([f])])
    best: dict[tuple[int, int], list[tuple[float, int, int]]] = {key: [] for key in wanted}
    docs: list[list[int]] = []
    cfg = transcoder.cfg
    for n, text in enumerate(tqdm(texts, desc="contexts", unit="text", disable=not progress)):
        if max_texts is not None and n >= max_texts:
            break
        ids = tokenizer(text)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        docs.append(ids)
        x, _ = mlp_io(model, torch.tensor([ids]), cfg.feature_input_hook, cfg.feature_output_hook)
        x = x[0].to(transcoder.dtype)
        start = 1 if cfg.prepend_bos and ids[0] in tokenizer.all_special_ids else 0
        for l, feats in by_layer.items():
            acts = transcoder.encode_layer(x[start:, l], l)[:, feats]      # [T, k_l]
            top, where = acts.max(0)
            for j, f in enumerate(feats.tolist()):
                if top[j] > 0:
                    best[(l, f)].append((float(top[j]), len(docs) - 1, int(where[j]) + start))
        for key in best:
            best[key] = sorted(best[key], reverse=True)[:k]
    out: dict[tuple[int, int], list[Context]] = {}
    for key, found in best.items():
        out[key] = [Context(tokenizer.decode(docs[d][max(0, p - window):p + 1]), tokenizer.decode([docs[d][p]]), a)
                    for a, d, p in found]
    return out
