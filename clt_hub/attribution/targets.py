"""What a graph explains: the top logits, or custom directions (a token's logit, a logit difference)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module


@dataclass(frozen=True)
class Target:
    """A custom output to attribute: `direction` . (final-norm output at the last position).

    `token` is the vocabulary id for single-token targets, -1 otherwise; `weight` is its share in
    pruning and scores (default: equal shares)."""

    label: str
    direction: torch.Tensor
    token: int = -1
    weight: float | None = None


def unembedding(model: nn.Module) -> torch.Tensor:
    """W_U [vocab, d_model]."""
    return get_module(model, adapter_for(model).unembed).weight.detach()  # type: ignore[operator]


def _check_token(model: nn.Module, token: int) -> None:
    vocab = unembedding(model).shape[0]
    if not 0 <= token < vocab:
        raise ConfigError(f"target token id {token} is not in the vocabulary (0..{vocab - 1})")


def token_target(model: nn.Module, token: int, label: str | None = None) -> Target:
    """The token's demeaned logit."""
    W_U = unembedding(model)
    _check_token(model, token)
    return Target(label or f"token {token}", (W_U[token] - W_U.mean(0)).detach(), token)


def logit_difference_target(model: nn.Module, token: int, minus: int | Sequence[int], label: str | None = None
                            ) -> Target:
    """E.g. ' Austin' minus ' Dallas': which nodes push the model toward one answer over the other.
    With several `minus` tokens, their mean logit is subtracted (one answer against its rivals)."""
    W_U = unembedding(model)
    rivals = [minus] if isinstance(minus, int) else list(minus)
    if not rivals:
        raise ConfigError("logit_difference_target needs at least one token to subtract")
    for t in [token, *rivals]:
        _check_token(model, t)
    return Target(label or f"{token} - {minus}", (W_U[token] - W_U[rivals].mean(0)).detach())


def select_logits(probs: torch.Tensor, max_logits: int = 10, cumulative: float = 0.95) -> torch.Tensor:
    """Most likely tokens until `cumulative` probability is covered, at most `max_logits`."""
    p, idx = probs.sort(descending=True)
    n = int((p.cumsum(0) < cumulative).sum().item()) + 1
    return idx[: min(n, max_logits)]


def output_targets(model: nn.Module, logits: torch.Tensor, custom: Sequence[Target] | None, max_logits: int,
                   cumulative: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, directions [n, d_model], weights) of the graph's output nodes: the custom targets, or
    the top logits (demeaned unembedding rows weighted by their probability)."""
    if custom:
        tokens = torch.tensor([t.token for t in custom], dtype=torch.long)
        directions = torch.stack([t.direction for t in custom]).to(dtype)
        given = [t.weight for t in custom]
        return tokens, directions, torch.tensor([w if w is not None else 1.0 / len(given) for w in given])
    probs = torch.softmax(logits.float(), -1)
    tokens = select_logits(probs, max_logits, cumulative)
    W_U = unembedding(model)
    return tokens, (W_U[tokens] - W_U.mean(0)).to(dtype), probs[tokens]
