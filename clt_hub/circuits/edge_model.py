"""The disentangled forward pass: every reader gets its own masked sum of the writers before it.

    reader input r = sum_w  C_w + m[w, r] * (W_w - C_w)

where W_w is writer w's output in this run and C_w its output in the corrupted run (interchange ablation:
an edge with m = 0 carries the corrupted run's value). With every m = 1 this is the model itself; with every
m = 0 every reader sees exactly what it saw in the corrupted run, so the output is the corrupted run's.

It runs on the `transformers` model itself: hooks (all owned by `EdgeModel`) replace the q/k/v projections'
outputs by projections of each reader's own normed input, split the attention output into heads, and give
each MLP and the final norm their own input. Attention itself (rotary embeddings, masks, sliding windows,
softcaps, q/k norms) is the family's own code.

Memory: the writers' outputs ([n_writers, batch, tokens, d_model], kept for the backward pass) and the
readers' inputs ([n_readers, batch, tokens, d_model], normed and projected) dominate; `estimate_bytes` says
how much a batch takes and `check_memory` refuses up front what would not fit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clt_hub.circuits.components import (
    ComponentGraph,
    component_graph,
    head_writes,
    qkv_rows,
    split_norm,
)
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.projections import linear_parts


@dataclass
class RunOutput:
    logits: torch.Tensor                    # [B, vocab] at the positions asked for
    writers: list[torch.Tensor]             # per chunk [n, B, T, d] (this run's writer outputs)
    reader_inputs: list[torch.Tensor] = field(default_factory=list)  # per reader group [R, B, T, d]


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Buffers:
    """The writers' differences in one [n_writers, B, T, d] tensor (no autograd) and, in the backward pass, their
    gradients in another. It holds no tensor with autograd history, so the autograd nodes that keep it make no
    reference cycle through the run's state."""

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None
        self._grads: torch.Tensor | None = None

    def grads(self) -> torch.Tensor:
        if self._grads is None:
            assert self.values is not None
            self._grads = torch.zeros_like(self.values)
        return self._grads


class _Mix(torch.autograd.Function):
    """out[r] = sum_w m[w, r] * D[w] over the writers' differences D (`_Buffers.values`, [n_w, B, T, d]) as one
    matrix product. Its backward pass adds m @ grad into one gradient buffer in place, instead of
    handing each writer chunk a new gradient tensor for autograd to sum: every reader group reads every earlier
    writer, so that would allocate and add a full [n_w, B, T, d] gradient per group. The chunks (the trailing
    inputs, `_Collect` outputs) are inputs only so that autograd runs each chunk's `_Collect` after every mix
    that read it; the buffer is not saved for autograd (later chunks are appended to it in place), only read
    again in the backward pass, where its first n_w rows are unchanged."""

    @staticmethod
    def forward(ctx: Any, m: torch.Tensor, buffers: _Buffers, *chunks: torch.Tensor) -> torch.Tensor:
        assert buffers.values is not None
        n_w = m.shape[0]
        values = buffers.values[:n_w]
        ctx.save_for_backward(m)
        ctx.buffers = buffers
        return (m.t() @ values.reshape(n_w, -1)).reshape(m.shape[1], *values.shape[1:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (m,) = ctx.saved_tensors
        buffers: _Buffers = ctx.buffers
        n_w = m.shape[0]
        assert buffers.values is not None
        g = grad.reshape(grad.shape[0], -1)                                      # (R, BTd)
        grad_m = buffers.values[:n_w].reshape(n_w, -1) @ g.t() if ctx.needs_input_grad[0] else None
        buffers.grads()[:n_w].view(n_w, -1).addmm_(m, g)                         # (n_w, BTd) += m @ g
        return (grad_m, None, *[None] * (len(ctx.needs_input_grad) - 2))


class _Collect(torch.autograd.Function):
    """A writer chunk's difference, passed through; its gradient is its rows of the gradient buffer, which every
    `_Mix` that read it has added to by the time autograd gets here."""

    @staticmethod
    def forward(ctx: Any, d: torch.Tensor, buffers: _Buffers, rows: slice) -> torch.Tensor:
        ctx.set_materialize_grads(False)  # the mixes hand back no gradient here: nothing to allocate
        ctx.buffers, ctx.rows = buffers, rows
        return d.view_as(d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        return ctx.buffers.grads()[ctx.rows], None, None


class _State:
    """One forward pass: the writers so far, the corrupted run's writers, the mask."""

    def __init__(self, graph: ComponentGraph, mask: torch.Tensor | None, corrupt: Sequence[torch.Tensor] | None,
                 embed: torch.Tensor | None, keep_inputs: bool):
        self.graph, self.corrupt, self.embed, self.keep_inputs = graph, corrupt, embed, keep_inputs
        self.dense = None if mask is None else graph.dense(mask)
        self.chunks: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None
        self.projected: dict[int, dict[str, torch.Tensor]] = {}
        self.diffs: list[torch.Tensor] = []
        self.buffers = _Buffers()
        self.csum: list[torch.Tensor] = []

    def diff(self, c: int) -> torch.Tensor:
        """W_c - C_c for writer chunk c, computed once per run; also copied (without autograd) into one buffer of
        all the writers' differences so far, which `_Mix` reads as one matrix (and, when it needs a gradient,
        passed through `_Collect`, which hands it the gradient the mixes summed)."""
        while len(self.diffs) <= c:
            i = len(self.diffs)
            w = self.chunks[i]
            d = w if self.corrupt is None else w - self.corrupt[i].to(w.dtype)
            if self.dense is not None:
                b = self.buffers
                if b.values is None:
                    b.values = torch.empty(len(self.graph.writers), *d.shape[1:], dtype=d.dtype, device=d.device)
                b.values[self.graph.chunks[i]] = d.detach()
                if d.requires_grad:
                    d = _Collect.apply(d, b, self.graph.chunks[i])
            self.diffs.append(d)
        return self.diffs[c]

    def corrupt_sum(self, n: int) -> torch.Tensor | None:
        """Sum of the corrupted run's first n writer chunks (what every edge out of them carries when removed)."""
        if self.corrupt is None:
            return None
        while len(self.csum) < n:
            i = len(self.csum)
            part = self.corrupt[i].sum(0, keepdim=True)
            self.csum.append(part if i == 0 else self.csum[-1] + part)
        return self.csum[n - 1].to(self.chunks[0].dtype)

    def reader_input(self, g: int) -> torch.Tensor:
        """[R, B, T, d] (or [1, B, T, d] broadcastable, when every reader of the group sees the same)."""
        group = self.graph.groups[g]
        if len(self.chunks) != group.n_chunks:
            raise RuntimeError(f"reader group {g} ran with {len(self.chunks)} writer chunks, expected "
                               f"{group.n_chunks}: the model's modules ran in an unexpected order")
        total = self.corrupt_sum(group.n_chunks)
        diffs = [self.diff(c) for c in range(group.n_chunks)]
        if self.dense is None:
            for d in diffs:
                part = d.sum(0, keepdim=True)
                total = part if total is None else total + part
        else:
            assert self.buffers.values is not None
            n_writers = self.graph.chunks[group.n_chunks - 1].stop
            m = self.dense[:n_writers, group.readers]
            part = _Mix.apply(m.to(self.buffers.values.dtype), self.buffers, *[d for d in diffs if d.requires_grad])
            total = part if total is None else total + part
        assert total is not None
        n = group.readers.stop - group.readers.start
        if self.keep_inputs and total.shape[0] != n:
            total = total.expand(n, *total.shape[1:])
        if self.keep_inputs:
            if not total.requires_grad:  # nothing upstream needs a gradient: start one here
                total = total.detach().requires_grad_(True)
            self.inputs.append(total)
        return total


class EdgeModel:
    """A `transformers` causal LM run with edge masks. `run(ids, mask=..., corrupt=...)`; owns every hook."""

    def __init__(self, model: nn.Module, graph: ComponentGraph | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.graph = graph or component_graph(model)
        g = self.graph
        self.layout = qkv_rows(self.adapter, g.n_heads, g.n_kv_heads, g.head_dim)
        # reader offsets of q/k/v within an attention group: q heads, then k heads, then v heads
        self.offset = {"q": 0, "k": g.n_heads, "v": g.n_heads + g.n_kv_heads}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- hooks -------------------------------------------------------------------------------------------

    def _attn_inputs(self, state: _State, l: int, block: nn.Module) -> dict[str, torch.Tensor]:
        """Layer l's q/k/v projection outputs, each head from its own reader's normed input."""
        if l not in state.projected:
            x = state.reader_input(2 * l)                        # (R or 1, B, T, d)
            normed = get_module(block, self.adapter.attn_norms[0])(x)
            attn = get_module(block, self.adapter.attn)
            outs: dict[str, torch.Tensor] = {}
            for path, rows in self.layout:
                weight, bias = linear_parts(get_module(attn, path))
                idx = [self.offset[kind] + h for kind, h, _ in rows]
                xs = normed[idx] if normed.shape[0] > 1 else normed.expand(len(idx), *normed.shape[1:])
                w = torch.stack([weight[s] for _, _, s in rows]).to(xs.dtype)       # (n, dh, d)
                y = torch.einsum("nbtd,nkd->nbtk", xs, w)                            # (n, B, T, dh)
                if bias is not None:
                    y = y + torch.stack([bias[s] for _, _, s in rows]).to(y.dtype)[:, None, None, :]
                outs[path] = y.permute(1, 2, 0, 3).reshape(*y.shape[1:3], -1)         # (B, T, n*dh)
            state.projected[l] = outs
        return state.projected[l]

    @contextmanager
    def _hooks(self, state: _State) -> Iterator[None]:
        ad, g = self.adapter, self.graph
        handles: list[Any] = []
        blocks = ad.blocks(self.model)

        def embed_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first(args, kwargs)
            state.chunks.append((state.embed if state.embed is not None else x)[None])

        handles.append(blocks[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
        mlp_out_path, _ = ad.hook_point("hook_mlp_out")
        for l, block in enumerate(blocks):
            attn = get_module(block, ad.attn)
            for path, _ in self.layout:
                def proj_hook(mod: nn.Module, args: tuple, out: torch.Tensor, l: int = l, path: str = path,
                              block: nn.Module = block) -> torch.Tensor:
                    return self._attn_inputs(state, l, block)[path].to(out.dtype)
                handles.append(get_module(attn, path).register_forward_hook(proj_hook))

            def out_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                parts = head_writes(mod, args[0], g.n_heads)
                if ad.attn_out_norm is None:
                    state.chunks.append(parts)
                else:
                    state.pending = parts
            handles.append(get_module(attn, ad.attn_out).register_forward_hook(out_hook))
            if ad.attn_out_norm is not None:
                def post_norm_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                    assert state.pending is not None
                    state.chunks.append(split_norm(mod, ad.norm_kind, state.pending, args[0], out))
                    state.pending = None
                handles.append(get_module(block, ad.attn_out_norm).register_forward_hook(post_norm_hook))

            def mlp_in_hook(mod: nn.Module, args: tuple, kwargs: dict, l: int = l) -> tuple[tuple, dict]:
                x = state.reader_input(2 * l + 1)[0]
                return ((x, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": x})
            handles.append(get_module(block, ad.mlp_in_norm).register_forward_pre_hook(mlp_in_hook, with_kwargs=True))

            def mlp_out_hook(mod: nn.Module, args: tuple, out: Any) -> None:
                state.chunks.append((out[0] if isinstance(out, tuple) else out)[None])
            handles.append(get_module(block, mlp_out_path).register_forward_hook(mlp_out_hook))

        def final_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = state.reader_input(len(g.groups) - 1)[0]
            return ((x, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": x})
        handles.append(get_module(self.model, ad.final_norm).register_forward_pre_hook(final_hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # --- the forward pass --------------------------------------------------------------------------------

    def run(self, ids: torch.Tensor, last: torch.Tensor, *, mask: torch.Tensor | None = None,
            corrupt: Sequence[torch.Tensor] | None = None, embed: torch.Tensor | None = None,
            keep_inputs: bool = False) -> RunOutput:
        """Logits at position `last[b]` of each row of `ids` [B, T].

        mask: edge values [E] (None: every edge kept, no corrupted run needed); corrupt: the corrupted run's
        writers (`RunOutput.writers` of a run on the corrupted ids); embed: the embedding writer's output to use
        instead of the model's ([B, T, d]; EAP-IG interpolates it); keep_inputs: keep every reader group's input
        (for gradients with respect to them)."""
        if mask is not None and corrupt is None:
            raise ConfigError("a mask needs the corrupted run's writers (corrupt=...): a removed edge carries them")
        state = _State(self.graph, mask, corrupt, embed, keep_inputs)
        keep = torch.unique(last)
        with self._hooks(state):
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
        pick = torch.searchsorted(keep, last)
        out = logits[torch.arange(ids.shape[0]), pick]
        return RunOutput(out, state.chunks, state.inputs)


# --- memory ---------------------------------------------------------------------------------------------------

def estimate_bytes(graph: ComponentGraph, batch: int, tokens: int, *, grad: bool, dtype_bytes: int = 4,
                   vocab: int = 0) -> int:
    """Peak extra memory of one masked forward (+ backward when `grad`) over a batch: per writer its output in
    this run and in the corrupted run, their difference and the mixing buffer; per reader its input, normed
    input and projection (kept for the backward pass) and their gradients; logits at the answer positions.
    Calibrated on SmolLM2-135M (batch 8 x 17 tokens: 2.0 GB estimated, 2.2 GB measured above the model and
    the interpreter); linear in batch x tokens, and in writers + readers (which grow with layers x heads)."""
    per = batch * tokens * graph.d_model * dtype_bytes
    stream = (len(graph.writers) + len(graph.readers)) * per * 4
    logits = batch * max(vocab, 1) * 4 * 4
    return int((stream + logits) * (2 if grad else 1))


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), or $CLT_HUB_MAX_MEMORY_GB when set."""
    env = os.environ.get("CLT_HUB_MAX_MEMORY_GB")
    if env:
        return int(float(env) * 2**30)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_memory(graph: ComponentGraph, batch: int, tokens: int, *, grad: bool, dtype_bytes: int = 4,
                 vocab: int = 0) -> int:
    """Refuse, before any work, a batch whose disentangled forward would not fit in memory."""
    need = estimate_bytes(graph, batch, tokens, grad=grad, dtype_bytes=dtype_bytes, vocab=vocab)
    free = available_bytes()
    if need > 0.8 * free:
        fit = max(1, int(batch * 0.8 * free / need))
        raise ConfigError(f"a batch of {batch} x {tokens} tokens over {graph.summary()} needs about "
                          f"{need / 2**30:.1f} GiB (the disentangled stream keeps every writer's and reader's "
                          f"activations), but {free / 2**30:.1f} GiB is available; use --batch-size {fit} or "
                          "shorter prompts")
    return need
