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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clt_hub.models.adapters import ModelAdapter, adapter_for, get_module
from clt_hub.models.projections import norm_eps

_RECORD, _FROZEN = "clt_hub_record", "clt_hub_frozen"
_ACTIVE: list[FrozenForward] = []  # the recorder the attention functions write to / read from


def _family_eager(module: nn.Module) -> Any:
    return sys.modules[type(module).__module__].eager_attention_forward


@dataclass
class Recorded:
    """What one attention module saw on the recorded pass: enough to recompute its pattern exactly (the
    family's own eager function on the same query, key and mask), so patterns, T x T per head and layer,
    are never stored. At 2,048 tokens GPT-2 small's would take 2.4 GB."""

    module: nn.Module
    query: torch.Tensor              # [B, heads, T, d_head], after rotary and any q/k norm
    key: torch.Tensor                # [B, kv_heads, T, d_head]
    mask: torch.Tensor | None        # the additive mask the eager function got (shared between layers)
    kwargs: dict[str, Any]

    def pattern(self, q0: int, q1: int, n_keys: int) -> torch.Tensor:
        """The recorded attention weights of queries q0..q1 over the first `n_keys` keys: the family's eager
        function rerun on the recorded tensors (the softmax is per query, so a block of queries gets its own
        rows of the whole pattern). A causal prefix sees only earlier keys, so a prefix's pattern is the
        top-left block of the whole one."""
        q, key, mask = _block_inputs(self.query, self.key, self.mask, q0, q1, n_keys)
        with torch.no_grad():  # the key stands in for the value: transformers 4.x's GPT-2 scales by the value's width
            _, weights = _family_eager(self.module)(self.module, q, key, key, mask, **self.kwargs)
        return weights[..., :n_keys]

    def blocks(self, n_queries: int) -> list[tuple[int, int]]:
        """Query blocks whose recomputed weights each take about PATTERN_BLOCK_BYTES."""
        step = pattern_rows(self.query.shape[1], self.key.shape[2])
        return [(q0, min(q0 + step, n_queries)) for q0 in range(0, n_queries, step)]


PATTERN_BLOCK_BYTES = 32 * 2**20


def _block_inputs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, q0: int, q1: int,
                 n_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries q0..q1 with the keys and mask rows they need out of the first `n_keys`: with a (causal) mask,
    the keys up to the block's last query only, since later ones get weight 0."""
    if mask is not None and mask.shape[-2] != 1:
        mask = mask[..., q0:q1, :]
    if mask is not None and n_keys > q1:
        key, mask = key[:, :, :q1], mask[..., :q1]
    return query[:, :, q0:q1], key, mask


def pattern_rows(heads: int, n_keys: int, itemsize: int = 4) -> int:
    """Queries per block of recomputed attention weights: a long prompt's heads x T x T pattern (2.4 GB for
    GPT-2 small at 2,048 tokens, over all layers) is never held, not even one layer's."""
    return max(1, PATTERN_BLOCK_BYTES // max(1, heads * n_keys * itemsize))


def _record_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    recorded = Recorded(module, query.detach(), key.detach(),
                        None if attention_mask is None else attention_mask.detach(),
                        {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
    _ACTIVE[-1].patterns[id(module)] = recorded
    blocks = recorded.blocks(query.shape[2])
    if len(blocks) == 1:
        return _family_eager(module)(module, query, key, value, attention_mask, **kwargs)[0], None
    parts = []  # a long prompt's pattern a block of queries at a time, as the frozen passes do
    for q0, q1 in blocks:
        q, k, mask = _block_inputs(query, key, attention_mask, q0, q1, key.shape[2])
        parts.append(_family_eager(module)(module, q, k, value[:, :, :k.shape[2]], mask, **kwargs)[0])
    return torch.cat(parts, dim=1), None  # the family's output is [batch, queries, heads, d_head]


def _spread_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves `groups` consecutive query heads."""
    return x.repeat_interleave(groups, dim=-3) if groups > 1 else x


def _gather_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of _spread_heads: sum each group of query heads back onto its key/value head."""
    if groups == 1:
        return x
    *lead, heads, t, d = x.shape
    return x.reshape(*lead, heads // groups, groups, t, d).sum(-3)


class _FrozenMix(torch.autograd.Function):
    """out = pattern @ value with a constant, recomputed pattern: autograd keeps no T x T tensor for the
    backward (it recomputes the pattern there too). Vmappable, so a batch of gradient seeds can run
    through one retained forward (torch.autograd.grad(..., is_grads_batched=True))."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: torch.Tensor, recorded: Recorded, n_queries: int) -> torch.Tensor:  # type: ignore[override]
        n_keys = value.shape[-2]
        groups = recorded.query.shape[1] // value.shape[-3]
        spread = _spread_heads(value, groups)
        parts = []
        for q0, q1 in recorded.blocks(n_queries):
            w = recorded.pattern(q0, q1, n_keys).to(value.dtype)  # causal: it may stop before n_keys
            parts.append(w @ spread[..., : w.shape[-1], :])
        return torch.cat(parts, dim=-2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        value, recorded, n_queries = inputs
        ctx.recorded, ctx.n_queries, ctx.n_keys = recorded, n_queries, value.shape[-2]
        ctx.kv_heads, ctx.dtype = value.shape[-3], value.dtype

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        groups = ctx.recorded.query.shape[1] // ctx.kv_heads
        total = None
        # pattern^T @ grad a block of queries at a time, the last block first: it reaches every key, and each
        # earlier block (causal) only the keys up to its last query, added in place into that slice
        for q0, q1 in reversed(ctx.recorded.blocks(ctx.n_queries)):
            rows = grad if q1 - q0 == grad.shape[-2] else grad.narrow(-2, q0, q1 - q0)  # (vmap cannot batch an alias)
            w = ctx.recorded.pattern(q0, q1, ctx.n_keys).to(ctx.dtype)
            part = w.transpose(-1, -2) @ rows
            if total is None:
                total = part if w.shape[-1] == ctx.n_keys else torch.nn.functional.pad(
                    part, (0, 0, 0, ctx.n_keys - w.shape[-1]))
            else:
                total.narrow(-2, 0, w.shape[-1]).add_(part)
        assert total is not None
        return _gather_heads(total, groups), None, None


def _frozen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The recorded pattern applied to this run's values. A prefix of the recorded prompt (causal, so its
    pattern is the top-left block) is allowed: attribution runs targets at early positions on the prefix
    that can reach them."""
    recorded: Recorded = _ACTIVE[-1].patterns[id(module)]
    out = _FrozenMix.apply(value, recorded, query.shape[2])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    import transformers as T
    from transformers.masking_utils import eager_mask

    for name, fn in ((_RECORD, _record_attention), (_FROZEN, _frozen_attention)):
        T.AttentionInterface.register(name, fn)
        T.AttentionMaskInterface.register(name, eager_mask)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32, as the HF norms compute, but keep float64 when given float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class FrozenForward:
    """`with ff.recording(): model(ids)` then `with ff.frozen(): model(ids, ...)` (same shapes)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter | None = None):
        _register()
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.norms = {p: get_module(model, p) for p in self.adapter.norm_paths(model)}
        self.patterns: dict[int, Recorded] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def _set_attention(self, impl: str) -> None:
        for mod in self.model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = impl

    def _scale(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.adapter.norm_kind == "layernorm":
            x = _wide(x)
            return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + norm_eps(norm))
        x = x.float()  # HF RMSNorms compute in float32 whatever the model dtype; match them exactly
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps(norm))

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
