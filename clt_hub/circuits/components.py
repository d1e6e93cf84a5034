"""Components and edges of a `transformers` model, read through its adapter.

Writers (what adds to the residual stream): the embedding (everything entering layer 0, positions included),
each attention head (its share of the attention output: its slice of the output projection, after the
attention output norm where the family has one), each MLP (after its output norm, if any).

Readers (what reads the residual stream): each query head's Q input, each key/value head's K and V inputs,
each MLP input, and the logits (the final norm's input). With grouped-query attention a key/value head feeds
several query heads; it is one K reader and one V reader, as the model computes it (one projection of one
input), shared by the query heads of its group. (EAP-IG's authors "un-group" it instead; here that would change
the model's computation, so it is not done.) An edge is (writer, reader) with the writer earlier: layer l's
attention readers see the embedding and layers < l; MLP l also sees layer l's heads; the logits see everyone.

Everything a family does differently is in the small functions below (head counts, where the q/k/v rows sit in
which projection, how a head's write is split off the output projection, how an output norm splits linearly);
the algorithms in clt_hub.circuits never branch on the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from clt_hub.errors import ConfigError
from clt_hub.models.adapters import ModelAdapter, adapter_for
from clt_hub.models.projections import head_shape, linear_parts, norm_eps, norm_gain

WriterKind = Literal["embed", "head", "mlp"]
ReaderKind = Literal["q", "k", "v", "mlp", "logits"]


@dataclass(frozen=True)
class Node:
    name: str
    layer: int          # -1 for the embedding, n_layers for the logits
    kind: str           # writers: embed | head | mlp; readers: q | k | v | mlp | logits
    head: int | None = None  # query head (writers, q readers) or key/value head (k, v readers)


@dataclass(frozen=True)
class ReaderGroup:
    """Readers computed together from the same writers: layer l's attention inputs, MLP l's input, the logits."""

    kind: Literal["attn", "mlp", "logits"]
    layer: int
    readers: slice      # into ComponentGraph.readers
    n_chunks: int       # how many writer chunks (from the first) it reads


@dataclass
class ComponentGraph:
    """Writers, readers and edges of one model. Writers come in chunks in forward order (embedding, then per
    layer its heads and its MLP); `edge_writer[e]`, `edge_reader[e]` index writers and readers."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    writers: list[Node] = field(default_factory=list)
    readers: list[Node] = field(default_factory=list)
    chunks: list[slice] = field(default_factory=list)
    groups: list[ReaderGroup] = field(default_factory=list)
    edge_writer: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    edge_reader: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def n_edges(self) -> int:
        return int(self.edge_writer.numel())

    def edge_names(self) -> list[str]:
        return [f"{self.writers[w].name}->{self.readers[r].name}"
                for w, r in zip(self.edge_writer.tolist(), self.edge_reader.tolist(), strict=True)]

    def edge_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names())}

    def dense(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Edge values [E] -> a [n_writers, n_readers] matrix (differentiable in `values`)."""
        out = torch.full((len(self.writers), len(self.readers)), fill, dtype=values.dtype, device=values.device)
        return out.index_put((self.edge_writer.to(values.device), self.edge_reader.to(values.device)), values)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """A [n_writers, n_readers] matrix -> its values on the edges [E]."""
        return dense[self.edge_writer.to(dense.device), self.edge_reader.to(dense.device)]

    def summary(self) -> str:
        return (f"{len(self.writers)} writers, {len(self.readers)} readers, {self.n_edges:,} edges "
                f"({self.n_layers} layers, {self.n_heads} query heads, {self.n_kv_heads} key/value heads)")


# --- family facts (one small function each) ---------------------------------------------------------------

def qkv_rows(adapter: ModelAdapter, n_heads: int, n_kv: int, head_dim: int
             ) -> list[tuple[str, list[tuple[str, int, slice]]]]:
    """For each attention input projection (path relative to the attention module), the output rows of each
    (reader kind, head) it computes, in output order. Separate q/k/v projections or one fused [q | k | v]."""
    def rows(kind: str, count: int, offset: int) -> list[tuple[str, int, slice]]:
        return [(kind, h, slice(offset + h * head_dim, offset + (h + 1) * head_dim)) for h in range(count)]

    counts = {"q": n_heads, "k": n_kv, "v": n_kv}
    if len(adapter.qkv) == 3:
        return [(path, rows(kind, counts[kind], 0)) for path, kind in zip(adapter.qkv, "qkv", strict=True)]
    if len(adapter.qkv) == 1:
        return [(adapter.qkv[0], rows("q", n_heads, 0) + rows("k", n_kv, n_heads * head_dim)
                 + rows("v", n_kv, (n_heads + n_kv) * head_dim))]
    raise ConfigError(f"ModelAdapter.qkv for {adapter.family} must name 3 projections (q, k, v) or one fused one")


def head_writes(out_proj: nn.Module, z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Each head's share of the output projection: z [B, T, H*dh] (heads concatenated) -> [H, B, T, d].
    The bias is shared equally (it is the same in every run, so it never matters which head holds it)."""
    weight, bias = linear_parts(out_proj)                        # [d, H*dh]
    B, T, _ = z.shape
    zh = z.reshape(B, T, n_heads, -1)                            # (B, T, H, dh)
    w = weight.reshape(weight.shape[0], n_heads, -1)             # (d, H, dh)
    parts = torch.einsum("bthk,dhk->hbtd", zh, w.to(zh.dtype))
    return parts if bias is None else parts + (bias / n_heads).to(parts.dtype)


def split_norm(norm: nn.Module, kind: str, parts: torch.Tensor, total: torch.Tensor,
               normed: torch.Tensor | None = None) -> torch.Tensor:
    """A norm applied to a sum of parts, split back into parts: the scale is the one computed on `total` (this
    run's sum), so the normed parts sum to norm(total). parts [H, ..., d], total [..., d]. With `normed` (the
    norm's own output on `total`), its rounding difference is shared out so the parts sum to it exactly."""
    weight: torch.Tensor = norm.weight  # type: ignore[assignment]
    if kind == "layernorm":
        t = total.float()
        scale = torch.rsqrt(t.var(-1, keepdim=True, unbiased=False) + norm_eps(norm))
        centred = parts.float() - parts.float().mean(-1, keepdim=True)
        found = getattr(norm, "bias", None)
        bias: torch.Tensor = found if isinstance(found, torch.Tensor) else torch.zeros_like(weight)
        out = centred * scale * weight.float() + bias.float() / parts.shape[0]
    else:
        scale = torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + norm_eps(norm))
        out = parts.float() * scale * norm_gain(kind, norm, torch.float32)
    if normed is not None:
        out = out + (normed.to(out.dtype) - out.sum(0)) / parts.shape[0]
    return out.to(parts.dtype)


# --- the graph ----------------------------------------------------------------------------------------------

def component_graph(model: nn.Module) -> ComponentGraph:
    """Writers, readers and every edge of `model` (any family with a ModelAdapter)."""
    adapter = adapter_for(model)
    n_layers = adapter.n_layers(model)
    config: Any = model.config
    n_heads, n_kv, head_dim = head_shape(config)
    g = ComponentGraph(n_layers, n_heads, n_kv, head_dim, int(config.hidden_size))

    g.writers.append(Node("embed", -1, "embed"))
    g.chunks.append(slice(0, 1))
    for l in range(n_layers):
        start = len(g.writers)
        g.writers += [Node(f"a{l}.h{h}", l, "head", h) for h in range(n_heads)]
        g.chunks.append(slice(start, len(g.writers)))
        g.writers.append(Node(f"m{l}", l, "mlp"))
        g.chunks.append(slice(len(g.writers) - 1, len(g.writers)))

    for l in range(n_layers):
        start = len(g.readers)
        g.readers += [Node(f"a{l}.h{h}<q>", l, "q", h) for h in range(n_heads)]
        kv_name = "h" if n_kv == n_heads else "g"  # g: a key/value group shared by several query heads
        g.readers += [Node(f"a{l}.{kv_name}{h}<k>", l, "k", h) for h in range(n_kv)]
        g.readers += [Node(f"a{l}.{kv_name}{h}<v>", l, "v", h) for h in range(n_kv)]
        g.groups.append(ReaderGroup("attn", l, slice(start, len(g.readers)), 1 + 2 * l))
        g.readers.append(Node(f"m{l}", l, "mlp"))
        g.groups.append(ReaderGroup("mlp", l, slice(len(g.readers) - 1, len(g.readers)), 2 + 2 * l))
    g.readers.append(Node("logits", n_layers, "logits"))
    g.groups.append(ReaderGroup("logits", n_layers, slice(len(g.readers) - 1, len(g.readers)), 1 + 2 * n_layers))

    ws: list[int] = []
    rs: list[int] = []
    for group in g.groups:
        n_writers = g.chunks[group.n_chunks - 1].stop
        for r in range(group.readers.start, group.readers.stop):
            ws += range(n_writers)
            rs += [r] * n_writers
    g.edge_writer = torch.tensor(ws, dtype=torch.long)
    g.edge_reader = torch.tensor(rs, dtype=torch.long)
    return g
