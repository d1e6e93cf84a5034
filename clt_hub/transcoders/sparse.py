"""Training-time encode and decode whose cost follows the active features (k per token), not the width F.

A TopK (or BatchTopK) batch activates k of F features per token. Decoding it as a dense matmul multiplies every
decoder row, and its backward computes every row's gradient, although only the active rows get a non-zero one.
Here one source layer's active entries are kept as (token, feature, value) triples and:

- the decode is `embedding_bag(features, W_dec[l], per_sample_weights=values)`: each token sums its k scaled
  rows, fused (no [n, targets * d_model] copy of the gathered rows);
- the decoder's gradient is the same kind of sum the other way round: each active feature sums the output
  gradients of the tokens that used it, times their values (one `embedding_bag` over the entries sorted by
  feature). It is written into a dense [F, targets * d_model] buffer, zero where a feature was not active:
  AdamW, gradient clipping and the data-parallel all-reduce all expect a dense gradient, and a sparse one
  would change what they compute (AdamW moves rows with zero gradient through its momentum); only the filling
  of the buffer is sparse;
- the values' gradient is each entry's output gradient dotted with its row (`embedding_bag`'s own
  per-sample-weight backward, which reads rows in place);
- the encoder's pre-activations are computed densely without autograd (choosing the top k needs all F), and
  the chosen entries get their gradient through `active_preacts`, whose backward fills only the chosen rows of
  W_enc and b_enc.

The arithmetic is the dense path's: the same products, summed in another order (tests/test_training_sparse.py
compares both to a bound derived from the sums' rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf

__all__ = ["ActiveIndex", "active_decode", "active_preacts"]


@dataclass(frozen=True)
class ActiveIndex:
    """Where one source layer's active entries are in a batch of `n_tokens`: entry i is token `pos[i]`,
    feature `feat[i]`. Entries are grouped by token (`offsets[b]` is token b's first). The same entries
    sorted by feature (`order`, stable; `feature_offsets[f]` is feature f's first) drive the backward sums."""

    feat: torch.Tensor             # [n] long
    pos: torch.Tensor              # [n] long, non-decreasing
    offsets: torch.Tensor          # [n_tokens] long
    order: torch.Tensor            # [n] long: entry indices sorted by feature
    pos_by_feature: torch.Tensor   # [n] long: pos[order]
    feature_offsets: torch.Tensor  # [n_features] long
    n_features: int

    @property
    def n_tokens(self) -> int:
        return int(self.offsets.shape[0])

    @classmethod
    def from_entries(cls, pos: torch.Tensor, feat: torch.Tensor, n_tokens: int, n_features: int) -> ActiveIndex:
        """Entries grouped by token (pos non-decreasing)."""
        counts = torch.bincount(pos, minlength=n_tokens)
        f_counts = torch.bincount(feat, minlength=n_features)
        f_offsets = f_counts.cumsum(0) - f_counts
        order = _stable_argsort(feat)
        return cls(feat=feat, pos=pos, offsets=counts.cumsum(0) - counts, order=order, pos_by_feature=pos[order],
                   feature_offsets=f_offsets, n_features=n_features)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_tokens: int, n_features: int) -> tuple[ActiveIndex, torch.Tensor]:
        """Entries given as positions token x n_features + feature in any order (BatchTopK's choice over a
        batch): the index, and the positions in its order (grouped by token)."""
        flat = flat[_stable_argsort(flat // n_features)]
        return cls.from_entries(flat // n_features, flat % n_features, n_tokens, n_features), flat

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_features: int) -> ActiveIndex:
        """`indices` [n_tokens, k]: each token's chosen features (TopK)."""
        n_tokens, k = indices.shape
        pos = torch.arange(n_tokens, device=indices.device).repeat_interleave(k)
        return cls.from_entries(pos, indices.reshape(-1), n_tokens, n_features)


def _stable_argsort(keys: torch.Tensor) -> torch.Tensor:
    """Indices that sort `keys` stably. On CPU through numpy's radix sort: torch's parallel CPU sort of a few
    10^4 integer keys took 0.1-0.2 s on a loaded 2-core machine (numpy: 2 ms), and once per layer per step."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable")).to(keys.device)
    return torch.sort(keys, stable=True).indices


def _bag_sum(index: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return nnf.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


# torch's own backward for embedding_bag's per-sample weights (dot products of output gradients with rows read in
# place); a private op, so a torch without it falls back to autograd through a recomputed embedding_bag
_PSW_BACKWARD = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)


def _value_grads(grad: torch.Tensor, weight: torch.Tensor, idx: ActiveIndex, values: torch.Tensor) -> torch.Tensor:
    """d(sum_i values[i] * weight[feat[i]] into row pos[i]) / d values, given the output gradient `grad`."""
    if _PSW_BACKWARD is not None:
        return _PSW_BACKWARD(grad, weight, idx.feat, idx.offsets, idx.pos, 0, -1)  # type: ignore[no-any-return]
    with torch.enable_grad():
        v = values.detach().to(weight.dtype).requires_grad_(True)
        out = nnf.embedding_bag(idx.feat, weight.detach(), idx.offsets, mode="sum", per_sample_weights=v)
        (g,) = torch.autograd.grad(out, v, grad)
    return g


def _weight_grads(grad: torch.Tensor, idx: ActiveIndex, values: torch.Tensor) -> torch.Tensor:
    """[F, D]: each feature's row gets the output gradients of the tokens that used it, times their values;
    zero for features no token used (a dense buffer, sparsely filled)."""
    return _bag_sum(idx.pos_by_feature, grad, idx.feature_offsets, values[idx.order])


class _ActiveDecode(torch.autograd.Function):
    """All source layers at once: out[b, t] = sum over source layers s writing to t, over token b's entries i at
    s, of values_s[i] * W_s[feat_s[i], t - start_s]. Each source's sums go straight into its span of one output
    buffer (no per-target lists of writes to add up and stack, forward or backward)."""

    @staticmethod
    def forward(ctx: Any, spans: tuple[tuple[int, int], ...], index: tuple[ActiveIndex, ...], d_model: int,
                *tensors: torch.Tensor) -> torch.Tensor:
        n = len(index)
        values, weights = tensors[:n], tensors[n:]
        n_tokens = index[0].n_tokens
        out = torch.zeros(n_tokens, max(stop for _, stop in spans), d_model, dtype=weights[0].dtype,
                          device=weights[0].device)
        for (start, stop), idx, v, w in zip(spans, index, values, weights, strict=True):
            out[:, start:stop] += _bag_sum(idx.feat, w, idx.offsets, v).view(n_tokens, stop - start, d_model)
        ctx.save_for_backward(*values, *weights)
        ctx.spans, ctx.index = spans, index
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        n = len(ctx.index)
        values, weights = saved[:n], saved[n:]
        grad = grad.contiguous()
        g_values: list[torch.Tensor | None] = [None] * n
        g_weights: list[torch.Tensor | None] = [None] * n
        for i, ((start, stop), idx, v, w) in enumerate(zip(ctx.spans, ctx.index, values, weights, strict=True)):
            g = grad[:, start:stop].reshape(grad.shape[0], -1).to(w.dtype)   # a view: rows of stride n_layers x d
            if ctx.needs_input_grad[3 + i]:
                g_values[i] = _value_grads(g, w, idx, v).to(v.dtype)
            if ctx.needs_input_grad[3 + n + i]:
                g_weights[i] = _weight_grads(g, idx, v)
        return None, None, None, *g_values, *g_weights


def active_decode(values: list[torch.Tensor], weights: list[torch.Tensor], index: list[ActiveIndex],
                  spans: list[tuple[int, int]], d_model: int) -> torch.Tensor:
    """[n_tokens, n_outputs, d_model]: source s's active rows of `weights[s]` [F, (stop - start) x d_model] times
    their `values[s]` [n_s], summed per token into outputs start..stop-1 of `spans[s]`. Gradients reach the
    values and the used rows of the weights (in dense buffers, see the module docstring)."""
    return _ActiveDecode.apply(tuple(spans), tuple(index), d_model, *values, *weights)  # type: ignore[no-any-return]


class _ActivePreacts(torch.autograd.Function):
    """The chosen entries of x @ W_enc.T + b_enc, computed beforehand without autograd; backward fills only
    the chosen rows of W_enc and b_enc."""

    @staticmethod
    def forward(ctx: Any, chosen: torch.Tensor, x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                idx: ActiveIndex) -> torch.Tensor:
        ctx.save_for_backward(x, w_enc)
        ctx.idx = idx
        ctx.b_shape, ctx.b_dtype = b_enc.shape, b_enc.dtype
        return chosen.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, w_enc = ctx.saved_tensors
        idx: ActiveIndex = ctx.idx
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[1]:
            g_x = _bag_sum(idx.feat, w_enc, idx.offsets, grad).to(x.dtype)
        if ctx.needs_input_grad[2]:
            g_w = _bag_sum(idx.pos_by_feature, x.to(w_enc.dtype).contiguous(), idx.feature_offsets,
                           grad[idx.order])
        if ctx.needs_input_grad[3]:
            g_b = torch.zeros(ctx.b_shape, dtype=ctx.b_dtype, device=grad.device).index_add_(0, idx.feat,
                                                                                             grad.to(ctx.b_dtype))
        return None, g_x, g_w, g_b, None


def active_preacts(chosen: torch.Tensor, x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                   idx: ActiveIndex) -> torch.Tensor:
    """The pre-activations `chosen` [n] (entry i: x[pos[i]] @ w_enc[feat[i]] + b_enc[feat[i]], already computed)
    as a function of x, w_enc and b_enc for autograd."""
    return _ActivePreacts.apply(chosen, x, w_enc, b_enc, idx)  # type: ignore[no-any-return]


def gather_decode(a: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor], width: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """a [N, F] -> [N, width]: each token's active features' rows (`rows(features)` [k, width], fetched once per
    distinct feature, which is what lets lazy decoders read only those rows from disk) scaled and summed."""
    pos, feat = a.nonzero(as_tuple=True)
    out = torch.zeros(a.shape[0], width, dtype=dtype, device=a.device)
    if feat.numel():
        unique, inverse = feat.unique(return_inverse=True)
        out.index_add_(0, pos, rows(unique)[inverse] * a[pos, feat][:, None])
    return out
