"""Attention's shapes and projection weights as plain tensors, whatever module type a family uses.

QK attribution, OV virtual weights and component circuits all read q/k/v/o weights and norm epsilons; this is
their one reader, below the three of them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clt_hub.errors import ConfigError

__all__ = ["head_shape", "linear_parts", "norm_eps", "norm_gain"]


def head_shape(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dimension) from a transformers config (GPT-2 names map through the
    config's attribute_map; families without grouped-query attention have as many key/value heads as queries)."""
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if n_heads % n_kv:
        raise ConfigError(f"{n_heads} query heads do not split into {n_kv} key/value groups")
    return n_heads, n_kv, int(head_dim)


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) of a projection: nn.Linear, or GPT-2's Conv1D (weight [in, out])."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    raise ConfigError(f"{type(module).__name__} is not a linear projection; clt_hub reads attention through nn.Linear "
                      "or Conv1D projections (set ModelAdapter.qkv / attn_out for this family)")


def norm_gain(norm_kind: str, norm: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The per-channel factor a norm multiplies by after dividing by its denominator, detached, computed in
    `dtype`: its weight, or Gemma's 1 + weight (`ModelAdapter.norm_kind` "gemma_rmsnorm")."""
    weight: torch.Tensor = norm.weight.detach().to(dtype)  # type: ignore[assignment,operator]
    return 1.0 + weight if norm_kind == "gemma_rmsnorm" else weight


def norm_eps(norm: nn.Module) -> float:
    """A norm module's epsilon, whichever name its family gives it."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
