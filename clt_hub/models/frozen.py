"""Freeze attention patterns and norm scales at their values on a recorded forward pass.

With both frozen, everything between MLP outputs and the logits is linear, which is what makes
attribution edges exact (Ameisen et al. 2025). Works on any `transformers` family through its
adapter: attention goes through a registered attention implementation (the family's own eager
kernel while recording, the stored pattern while frozen), norms through forward hooks applying
the adapter's declared norm formula with the recorded denominator.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from clt_hub.models.adapters import ModelAdapter, adapter_for, get_module

_RECORD, _FROZEN = "clt_hub_record", "clt_hub_frozen"
_ACTIVE: list[FrozenForward] = []  # the recorder the attention functions write to / read from


def _family_eager(module: nn.Module) -> Any:
    return sys.modules[type(module).__module__].eager_attention_forward


def _record_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out, weights = _family_eager(module)(module, query, key, value, attention_mask, **kwargs)
    _ACTIVE[-1].patterns[id(module)] = weights.detach()
    return out, weights


def _frozen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    weights = _ACTIVE[-1].patterns[id(module)]
    # a prefix of the recorded prompt (causal, so its pattern is the top-left block) is allowed:
    # attribution runs targets at early positions on the prefix that can reach them
    weights = weights[..., : query.shape[2], : key.shape[2]]
    groups = weights.shape[1] // value.shape[1]  # grouped-query attention shares value heads
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    return (weights.to(v.dtype) @ v).transpose(1, 2).contiguous(), weights


def _register() -> None:
    import transformers as T
    from transformers.masking_utils import eager_mask

    for name, fn in ((_RECORD, _record_attention), (_FROZEN, _frozen_attention)):
        T.AttentionInterface.register(name, fn)
        T.AttentionMaskInterface.register(name, eager_mask)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32, as the HF norms compute, but keep float64 when given float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class FrozenForward:
    """`with ff.recording(): model(ids)` then `with ff.frozen(): model(ids, ...)` (same shapes)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter | None = None):
        _register()
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.norms = {p: get_module(model, p) for p in self.adapter.norm_paths(model)}
        self.patterns: dict[int, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def _set_attention(self, impl: str) -> None:
        for mod in self.model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = impl

    def _scale(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.adapter.norm_kind == "layernorm":
            x = _wide(x)
            return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + _eps(norm))
        x = x.float()  # HF RMSNorms compute in float32 whatever the model dtype; match them exactly
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm))

    def _apply(self, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        kind = self.adapter.norm_kind
        weight: torch.Tensor = norm.weight  # type: ignore[assignment]
        if kind == "layernorm":
            xf, w = _wide(x), _wide(weight)
            y = (xf - xf.mean(-1, keepdim=True)) * scale * w + _wide(norm.bias)  # type: ignore[arg-type]
        elif kind == "gemma_rmsnorm":
            y = x.float() * scale * (1.0 + weight.float())
        else:
            y = weight * (x.float() * scale).to(x.dtype)
        return y.to(x.dtype)

    @contextmanager
    def _mode(self, impl: str, hooks: list[Any]) -> Iterator[None]:
        previous = getattr(self.model.config, "_attn_implementation", "eager")
        _ACTIVE.append(self)
        self._set_attention(impl)
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self._set_attention(previous)
            _ACTIVE.remove(self)

    def recording(self) -> Any:
        self.patterns.clear()
        self.scales.clear()
        hooks = []
        for path, norm in self.norms.items():
            def pre(mod: nn.Module, args: tuple, path: str = path) -> None:
                self.scales[path] = self._scale(mod, args[0]).detach()
            hooks.append(norm.register_forward_pre_hook(pre))
        return self._mode(_RECORD, hooks)

    def frozen_attention_only(self) -> Any:
        """Attention patterns frozen, norms live (open-loop interventions with frozen attention)."""
        if not self.patterns:
            raise RuntimeError("record a forward pass first: `with ff.recording(): model(ids)`")
        return self._mode(_FROZEN, [])

    def frozen(self) -> Any:
        if not self.patterns:
            raise RuntimeError("record a forward pass first: `with ff.recording(): model(ids)`")
        hooks = []
        for path, norm in self.norms.items():
            def post(mod: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> torch.Tensor:
                scale = self.scales[path][:, : args[0].shape[1]]  # prefix of the recorded prompt
                return self._apply(mod, args[0], scale.expand(*args[0].shape[:-1], 1))
            hooks.append(norm.register_forward_hook(post, prepend=True))  # before any patching hooks
        return self._mode(_FROZEN, hooks)
