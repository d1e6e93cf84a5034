"""Weights-based circuits: what connects features through the weights alone, and how much of an attribution
edge that explains (Dunefsky et al. 2024, transcoder circuits; Ameisen et al. 2025, global weights).

An edge of the attribution graph (`clt_hub.attribution.attribute`) from feature s to feature t at the same
position has a residual-stream part that factorises as activation(s) x virtual weight(s -> t) x norm factor:
the virtual weight is input-invariant (s's decoder rows, the target layer's MLP input norm weight when the
transcoder reads normalised input, t's encoder row); the activation and the norm factor depend on the input.

The norm factor, per input hook (`TranscoderConfig.feature_input_hook`):

- `hook_resid_mid`: 1, in every family. The encoder reads the residual stream itself; no norm sits between.
- `ln2.hook_normalized`: the encoder reads the MLP input norm's output. Its weight (`w`; Gemma's `1 + w`) and,
  for LayerNorm, the centring are linear and input-invariant, so they go into the virtual weight; what is
  left is the token's frozen scale, 1/sqrt(mean(x^2) + eps) (RMSNorm) or 1/sqrt(var(x) + eps) (LayerNorm) of
  the residual x at the target layer, as `clt_hub.models.frozen` records it for attribution.

Two paths are part of a graph edge but not of this product: attention (a position attends to itself too;
`ov_virtual_weights` gives one head's input-invariant part) and a skip transcoder's `W_skip`, a linear path
from an MLP's input to its output that is not a feature; virtual weights leave the skip out.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from clt_hub.attribution.graph import Graph
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import ModelAdapter, adapter_for, get_module
from clt_hub.models.frozen import FrozenForward
from clt_hub.models.hooks import mlp_io
from clt_hub.models.loading import context_length
from clt_hub.models.projections import head_shape, linear_parts, norm_gain
from clt_hub.transcoders.transcoder import Transcoder

RESIDUAL_INPUT = "hook_resid_mid"
NORMALISED_INPUT = "ln2.hook_normalized"
RESIDUAL_OUTPUT = "hook_mlp_out"
FEATURE_CHUNK = 4096    # upstream features whose decoder rows are read at once (lazy decoders read only these)
EMBEDDING_CHUNK = 8192  # vocabulary rows embedded at once


# --- ranking -------------------------------------------------------------------------------------------------

class Upstream(NamedTuple):
    layer: int
    feature: int
    weight: float


@dataclass(frozen=True)
class Ranked:
    """The k strongest upstream features each way: `positive` largest first, `negative` most negative first."""

    positive: list[Upstream]
    negative: list[Upstream]


def top_upstream(weights: torch.Tensor, k: int = 10) -> Ranked:
    """The top-k positive and top-k negative entries of upstream weights [n_layers, d_sae] (zeros are in
    neither list)."""
    flat, width = weights.detach().flatten().float().cpu(), weights.shape[1]

    def pick(sign: float) -> list[Upstream]:
        values, index = (sign * flat).topk(min(k, flat.numel()))
        return [Upstream(i // width, i % width, sign * v) for v, i in zip(values.tolist(), index.tolist(), strict=True)
                if v > 0]
    return Ranked(pick(1.0), pick(-1.0))


# --- where features read and write ----------------------------------------------------------------------------

def _check_feature(tc: Transcoder, layer: int, feature: int) -> None:
    if not 0 <= layer < tc.n_layers:
        raise ConfigError(f"layer {layer} is out of range for this {tc.n_layers}-layer transcoder; "
                          f"pick a layer in 0..{tc.n_layers - 1}")
    if not 0 <= feature < tc.d_sae:
        raise ConfigError(f"feature {feature} is out of range for this transcoder's {tc.d_sae} features per "
                          f"layer; pick a feature in 0..{tc.d_sae - 1}")


def _reads_normalised(tc: Transcoder) -> bool:
    """Whether the features read the MLP input norm's output; refuses hooks where the factorisation above
    does not hold."""
    read, write = tc.cfg.feature_input_hook, tc.cfg.feature_output_hook
    if read not in (RESIDUAL_INPUT, NORMALISED_INPUT):
        raise ConfigError(f"weights-based circuits need features that read '{RESIDUAL_INPUT}' or "
                          f"'{NORMALISED_INPUT}'; this transcoder reads {read!r}. Use a transcoder trained on one "
                          "of those hooks")
    if write != RESIDUAL_OUTPUT:
        raise ConfigError(f"weights-based circuits need decoder rows that are residual-stream directions "
                          f"('{RESIDUAL_OUTPUT}'); this transcoder writes {write!r}. Use a transcoder trained to "
                          f"reconstruct '{RESIDUAL_OUTPUT}'")
    return read == NORMALISED_INPUT


def _acc(tc: Transcoder) -> torch.dtype:
    """Virtual weights are summed in at least float32."""
    return torch.promote_types(tc.dtype, torch.float32)


def _block_module(model: nn.Module, adapter: ModelAdapter, layer: int, path: str) -> nn.Module:
    return get_module(model, f"{adapter.layers}.{layer}.{path}")


def _through_norm(adapter: ModelAdapter, norm: nn.Module, r: torch.Tensor) -> torch.Tensor:
    """A reading direction r [..., d] on a norm's output pulled back to its input, the frozen scale left out:
    the norm's weight (Gemma: 1 + w) and, for LayerNorm, the centring (symmetric, so applied after)."""
    out = r * norm_gain(adapter.norm_kind, norm, r.dtype).to(r.device)
    return out - out.mean(-1, keepdim=True) if adapter.norm_kind == "layernorm" else out


def read_directions(tc: Transcoder, layer: int, features: torch.Tensor, model: nn.Module | None = None
                    ) -> torch.Tensor:
    """[k, d_model]: the residual-stream direction each feature's pre-activation reads at `layer`, the norm
    factor left out: its encoder row, through the MLP input norm's weight when it reads normalised input (then
    `model` is needed)."""
    rows = tc.W_enc[layer].detach()[torch.as_tensor(features, dtype=torch.long).to(tc.device)].to(_acc(tc))
    if not _reads_normalised(tc):
        return rows
    if model is None:
        raise ConfigError(f"this transcoder reads '{NORMALISED_INPUT}', so its virtual weights go through the "
                          "model's MLP input norm weight; pass model=")
    adapter = adapter_for(model)
    return _through_norm(adapter, _block_module(model, adapter, layer, adapter.mlp_in_norm), rows)


def _written(tc: Transcoder, source: int, before: int, features: torch.Tensor) -> torch.Tensor:
    """[k, d]: what features of layer `source` write into the residual stream read at layer `before`: their
    decoder rows summed over the layers t they write to with t < before (CLT: all of them; PLT: t = source)."""
    rows = tc.decoder_rows(source, features).detach().to(_acc(tc))   # [k, n_targets, d]; target j is layer source + j
    return rows[:, : max(0, before - source)].sum(1)


def _upstream(tc: Transcoder, before: int, r: torch.Tensor) -> torch.Tensor:
    """[before, d_sae]: every feature of the layers below `before` read along r [d] at layer `before`."""
    out = torch.zeros(before, tc.d_sae, dtype=_acc(tc), device=tc.device)
    r = r.to(device=tc.device, dtype=_acc(tc))
    for s in range(before):
        for c0 in range(0, tc.d_sae, FEATURE_CHUNK):
            ids = torch.arange(c0, min(c0 + FEATURE_CHUNK, tc.d_sae))
            out[s, c0:c0 + len(ids)] = _written(tc, s, before, ids) @ r
    return out


# --- 1. de-embedding -----------------------------------------------------------------------------------------

class TokenWeight(NamedTuple):
    token: int
    text: str | None  # decoded when a tokenizer was given
    weight: float


@dataclass
class DeEmbedding:
    """Each vocabulary token's direct contribution to one feature's pre-activation (the bias left out)."""

    layer: int
    feature: int
    weights: torch.Tensor   # [vocab]
    top: list[TokenWeight]
    bottom: list[TokenWeight]
    norm_scale: float       # the fixed scale applied (1.0 for hook_resid_mid)
    norm_scale_source: str  # where it came from


@torch.no_grad()
def _embedding_norm_scales(model: nn.Module, path: str, embeddings: torch.Tensor) -> torch.Tensor:
    """[n]: the scale the norm at `path` gives each embedding on its own (models.frozen's formula, recorded)."""
    ff = FrozenForward(model)
    with ff.recording():
        get_module(model, path)(embeddings[None])
    return ff.scales[path][0, :, 0]


@torch.no_grad()
def de_embedding(model: nn.Module, tc: Transcoder, layer: int, feature: int, k: int = 10,
                 norm_scale: float | None = None, tokenizer: Any = None) -> DeEmbedding:
    """Token embedding . the feature's read direction, for every token: the de-embedding of Dunefsky et al.

    The embedding is the model's embedding module output (transformers' Gemma module includes the sqrt(d_model)
    scale its adapter declares; GPT-2's leaves out the position embedding). It is the direct path only: as if
    the token's embedding alone reached the layer, with no attention and no earlier MLP. A feature reading
    normalised input gets one fixed norm scale for every token: `norm_scale` if given, else the median over
    the vocabulary of the scale the layer's MLP input norm gives each embedding alone (all-zero rows, such as a
    padding token's, left out; the lower middle value for an even count); `norm_scale_source` says which."""
    _check_feature(tc, layer, feature)
    normalised = _reads_normalised(tc)
    if norm_scale is not None and not normalised:
        raise ConfigError(f"norm_scale applies to transcoders reading '{NORMALISED_INPUT}'; this one reads the "
                          "residual stream (no norm): leave norm_scale out")
    adapter = adapter_for(model)
    embed = get_module(model, adapter.embed)
    r = read_directions(tc, layer, torch.tensor([feature]), model)[0]
    table: torch.Tensor = embed.weight  # type: ignore[assignment]
    vocab, device = int(table.shape[0]), table.device
    norm_path = f"{adapter.layers}.{layer}.{adapter.mlp_in_norm}"
    r = r.to(device)
    dots, scales = [], []
    for c0 in range(0, vocab, EMBEDDING_CHUNK):
        emb = embed(torch.arange(c0, min(c0 + EMBEDDING_CHUNK, vocab), device=device))
        dots.append(emb.to(r.dtype) @ r)
        if normalised and norm_scale is None:
            real = emb.abs().sum(-1) > 0  # a padding token's all-zero row: its "scale" is 1/sqrt(eps)
            scales.append(_embedding_norm_scales(model, norm_path, emb[real]).float())
    if not normalised:
        scale, source = 1.0, f"none: the feature reads the residual stream ('{RESIDUAL_INPUT}'), no norm"
    elif norm_scale is not None:
        scale, source = float(norm_scale), "given (norm_scale)"
    else:
        every = torch.cat(scales)
        scale = float(every.median())
        source = (f"median over {len(every)} token embeddings (all-zero rows left out) of the scale layer {layer}'s "
                  "MLP input norm gives each")
    weights = torch.cat(dots).float().cpu() * scale

    def listed(values: torch.Tensor, index: torch.Tensor) -> list[TokenWeight]:
        return [TokenWeight(i, None if tokenizer is None else tokenizer.decode([i]), float(v))
                for v, i in zip(values.tolist(), index.tolist(), strict=True)]
    top, bottom = weights.topk(min(k, vocab)), weights.topk(min(k, vocab), largest=False)
    return DeEmbedding(layer, feature, weights, listed(*top), listed(*bottom), scale, source)


# --- 2. virtual weights --------------------------------------------------------------------------------------

@torch.no_grad()
def virtual_weights(tc: Transcoder, layer: int, feature: int, model: nn.Module | None = None) -> torch.Tensor:
    """[layer, d_sae]: the virtual weight from every upstream feature (source layer s < `layer`, id i) to
    feature `feature` of `layer` through the residual stream: sum over the layers t that i writes to with
    s <= t < layer of decoder_rows(s)[i, t - s] . read direction (`read_directions`). A PLT's feature writes
    to t = s only. The norm factor is not in it (see the module's docstring), nor a skip transcoder's W_skip.
    `model` is needed for a transcoder reading normalised input. `top_upstream` ranks the result."""
    _check_feature(tc, layer, feature)
    return _upstream(tc, layer, read_directions(tc, layer, torch.tensor([feature]), model)[0])


def _value_rows(model: nn.Module, adapter: ModelAdapter, layer: int, kv_head: int) -> torch.Tensor:
    """[d_head, d_model]: W_V of one key/value head (separate v projection, or the v part of a fused [q|k|v])."""
    n_heads, n_kv, dh = head_shape(model.config)
    attn = f"{adapter.attn}."
    if len(adapter.qkv) == 3:
        w, offset = linear_parts(_block_module(model, adapter, layer, attn + adapter.qkv[2]))[0].detach(), 0
    elif len(adapter.qkv) == 1:
        fused = linear_parts(_block_module(model, adapter, layer, attn + adapter.qkv[0]))[0].detach()
        w, offset = fused, (n_heads + n_kv) * dh
    else:
        raise ConfigError(f"ModelAdapter.qkv for {adapter.family} must name 3 projections (q, k, v) or one fused one")
    return w[offset + kv_head * dh: offset + (kv_head + 1) * dh]


def _attention_input_norm(adapter: ModelAdapter) -> str:
    names = [n for n in adapter.attn_norms if n != adapter.attn_out_norm]
    if len(names) != 1:
        raise ConfigError(f"ModelAdapter {adapter.family} must name one attention input norm in attn_norms (besides "
                          f"attn_out_norm), found {names}")
    return names[0]


def _ov_pullback(model: nn.Module, adapter: ModelAdapter, layer: int, head: int, r: torch.Tensor) -> torch.Tensor:
    """A reading direction r [d] on the residual stream after attention `layer`, pulled back through head `head`'s
    OV circuit to the attention input: (in-norm weight) W_V^T W_O^T (out-norm weight) r, scales left out."""
    n_heads, n_kv, dh = head_shape(model.config)
    if adapter.attn_out_norm is not None:
        r = _through_norm(adapter, _block_module(model, adapter, layer, adapter.attn_out_norm), r)
    w_o = linear_parts(_block_module(model, adapter, layer, f"{adapter.attn}.{adapter.attn_out}"))[0].detach()
    # w_o: [d, heads * dh]
    z = w_o[:, head * dh:(head + 1) * dh].to(r).T @ r                                          # [dh]
    x = _value_rows(model, adapter, layer, head // (n_heads // n_kv)).to(r).T @ z               # [d]
    return _through_norm(adapter, _block_module(model, adapter, layer, _attention_input_norm(adapter)), x)


@torch.no_grad()
def ov_virtual_weights(model: nn.Module, tc: Transcoder, layer: int, feature: int, attn_layer: int, head: int
                       ) -> torch.Tensor:
    """[attn_layer, d_sae]: the virtual weight from every upstream feature (layer s < attn_layer) to feature
    `feature` of `layer` through one attention head's OV circuit at `attn_layer` (s < attn_layer <= layer):
    the feature's writes to the layers t with s <= t < attn_layer, through the attention input norm's weight,
    W_V of the head's key/value group (grouped-query attention), W_O of the head, the attention output norm's
    weight where the family has one (Gemma), and the read direction. Left out, as input-dependent: the head's
    attention weight from the target position to the source's, and the norms' frozen scales."""
    _check_feature(tc, layer, feature)
    adapter = adapter_for(model)
    n_heads = head_shape(model.config)[0]
    if not 0 <= attn_layer <= layer:
        raise ConfigError(f"attn_layer {attn_layer} must be in 0..{layer}: attention after the feature's layer "
                          f"{layer} cannot reach it")
    if not 0 <= head < n_heads:
        raise ConfigError(f"head {head} is out of range: the model has {n_heads} attention heads (0..{n_heads - 1})")
    r = read_directions(tc, layer, torch.tensor([feature]), model)[0]
    return _upstream(tc, attn_layer, _ov_pullback(model, adapter, attn_layer, head, r))


# --- 3. factorising a traced graph ---------------------------------------------------------------------------

@dataclass
class Factorisation:
    """Every same-position feature -> feature edge of a graph next to its residual-stream term, and per target
    feature how much of its incoming feature edge mass those terms explain.

    The mass is over edges from feature nodes only (every position; error and token nodes have no virtual
    weight): `edge_mass` = sum |edge|, `unexplained` = sum |edge - residual term| (the term is 0 across
    positions), `explained` = 1 - unexplained / edge_mass (NaN for a target with no incoming feature edge).
    It is 1, up to rounding, when attention (and a skip transcoder's skip path) adds nothing to feature edges.
    A graph traced with max_feature_nodes holds edges among its kept features only, and so does the mass."""

    target: torch.Tensor          # [E] target feature node
    source: torch.Tensor          # [E] source feature node: same position, earlier layer
    edge: torch.Tensor            # [E] the graph's edge
    activation: torch.Tensor      # [E] the source's activation (input-dependent)
    virtual_weight: torch.Tensor  # [E] input-invariant
    norm_factor: torch.Tensor     # [E] the target's frozen MLP input norm scale; 1 for hook_resid_mid
    residual: torch.Tensor        # [E] activation * virtual_weight * norm_factor
    targets: torch.Tensor         # [n] the graph's feature nodes that have incoming edges (a row)
    edge_mass: torch.Tensor       # [n]
    residual_mass: torch.Tensor   # [n] sum |residual term|
    unexplained: torch.Tensor     # [n]

    @property
    def explained(self) -> torch.Tensor:
        return 1.0 - self.unexplained / torch.where(self.edge_mass > 0, self.edge_mass, torch.nan)


@torch.no_grad()
def frozen_norm_scales(model: nn.Module, tc: Transcoder, input_ids: torch.Tensor) -> torch.Tensor:
    """[T, n_layers]: each layer's MLP input norm scale at each position on the real forward pass, as attribution
    freezes it (`clt_hub.models.frozen`): the norm factor of a transcoder reading normalised input."""
    adapter = adapter_for(model)
    ff = FrozenForward(model, adapter)
    with ff.recording():
        getattr(model, "base_model", model)(input_ids.reshape(1, -1).to(next(model.parameters()).device))
    return torch.stack([ff.scales[f"{adapter.layers}.{l}.{adapter.mlp_in_norm}"][0, :, 0]
                        for l in range(tc.n_layers)], dim=1)


class _Pairs(NamedTuple):
    row: torch.Tensor       # [E] the target's row in graph.rows
    source: torch.Tensor    # [E] the source feature node
    virtual: torch.Tensor   # [E]
    norm: torch.Tensor      # [E]


def _joined(parts: list[_Pairs]) -> _Pairs:
    """The pairs of `parts` one after another (none: empty tensors)."""
    empty = _Pairs(*(torch.zeros(0, dtype=t) for t in (torch.long, torch.long, torch.float32, torch.float32)))
    return _Pairs(*(torch.cat(column) for column in zip(empty, *parts, strict=True)))


def _pairs_into_layer(graph: Graph, model: nn.Module, tc: Transcoder, layer: int, rows: torch.Tensor,
                      scales: torch.Tensor | None) -> _Pairs:
    """The same-position feature pairs into the feature rows `rows` (every target at `layer`)."""
    feats = graph.features
    tnodes = graph.row_nodes[rows]
    r = read_directions(tc, layer, feats[tnodes, 2], model)                  # [n, d]
    tpos = feats[tnodes, 1]
    parts = []
    for s in range(layer):
        snodes = (feats[:, 0] == s).nonzero().flatten()
        same = feats[snodes, 1][:, None] == tpos[None, :]                    # [n_s, n]
        if not bool(same.any()):
            continue
        si, ti = same.nonzero(as_tuple=True)
        v = (_written(tc, s, layer, feats[snodes, 2]) @ r.T).float().cpu()[si, ti]
        nu = torch.ones_like(v) if scales is None else scales[tpos[ti], layer].float()
        parts.append(_Pairs(rows[ti], snodes[si], v, nu))
    return _joined(parts)


@torch.no_grad()
def factorise(graph: Graph, model: nn.Module, tc: Transcoder) -> Factorisation:
    """Split every same-position feature -> feature edge of `graph` (traced with `model` and `tc`) into
    activation x virtual weight x norm factor, the residual-stream term, next to the edge itself. The edge also
    holds the paths through attention (a position attends to itself), so the two are equal only where those
    add nothing; `Factorisation.explained` measures it per target."""
    scales = frozen_norm_scales(model, tc, graph.input_ids).cpu() if _reads_normalised(tc) else None
    nf = graph.n_features
    feature_rows = (graph.row_nodes < nf).nonzero().flatten()
    layers = graph.features[graph.row_nodes[feature_rows], 0]
    p = _joined([_pairs_into_layer(graph, model, tc, L, feature_rows[layers == L], scales)
                 for L in layers.unique().tolist()])
    edge = graph.rows[p.row, p.source].float()
    activation = graph.activations[p.source].float()
    residual = activation * p.virtual * p.norm
    at = torch.full((len(graph.row_nodes),), -1, dtype=torch.long)   # graph row -> index among the targets
    at[feature_rows] = torch.arange(len(feature_rows))
    mass = graph.rows[feature_rows, :nf].abs().sum(1, dtype=torch.float64)  # float64: the difference below

    def per_target(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(feature_rows), dtype=torch.float64).index_add_(0, at[p.row], values.double())
    unexplained = (mass - per_target(edge.abs())).clamp(min=0) + per_target((edge - residual).abs())
    return Factorisation(graph.row_nodes[p.row], p.source, edge, activation, p.virtual, p.norm, residual,
                         graph.row_nodes[feature_rows], mass.float(), per_target(residual.abs()).float(),
                         unexplained.float())


# --- 4. global weights ---------------------------------------------------------------------------------------

@dataclass
class GlobalWeights:
    """Global weights of one feature over a text sample: TWERA (Ameisen et al. 2025) and the plain virtual
    weights, side by side. TWERA_s = E[a_s nu a_t] / E[a_t] x V_st (a_t: this feature's activation, a_s: the
    upstream feature's at the same token, nu: the norm factor, 1 for hook_resid_mid), so an upstream feature
    that never fires with this one drops out however large its virtual weight."""

    layer: int
    feature: int
    virtual: torch.Tensor       # [layer, d_sae] V_st
    coactivation: torch.Tensor  # [layer, d_sae] E[a_s nu a_t] / E[a_t] (zeros if a_t never fired)
    twera: torch.Tensor         # [layer, d_sae]
    top_twera: Ranked
    top_virtual: Ranked
    texts: int                  # texts read
    tokens: int                 # tokens used (BOS left out)
    active_tokens: int          # of them, where a_t != 0
    seconds: float


@dataclass
class _Sums:
    joint: torch.Tensor  # [layer, d_sae] float64: sum over tokens of a_s * nu * a_t
    target: float = 0.0  # sum of a_t
    texts: int = 0
    tokens: int = 0
    active: int = 0


def _text_inputs(model: nn.Module, tc: Transcoder, ids: torch.Tensor, layer: int, normalised: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: the transcoder's inputs [T, n_layers, d] and the norm factor at `layer` [T]."""
    adapter = adapter_for(model)
    ff = FrozenForward(model, adapter) if normalised else None
    with ff.recording() if ff is not None else contextlib.nullcontext():
        x, _ = mlp_io(model, ids, tc.cfg.feature_input_hook, tc.cfg.feature_output_hook)
    x = x[0].to(device=tc.device, dtype=tc.dtype)
    if ff is None:
        return x, torch.ones(x.shape[0], dtype=torch.float64, device=tc.device)
    return x, ff.scales[f"{adapter.layers}.{layer}.{adapter.mlp_in_norm}"][0, :, 0].to(tc.device, torch.float64)


def _add_text(sums: _Sums, tc: Transcoder, x: torch.Tensor, nu: torch.Tensor, layer: int, feature: int) -> None:
    a_t = tc.encode_layer(x[:, layer], layer)[:, feature].double()
    weight = a_t * nu
    for s in range(layer):
        sums.joint[s] += weight @ tc.encode_layer(x[:, s], s).double()
    sums.target += float(a_t.sum())
    sums.tokens += len(a_t)
    sums.active += int((a_t != 0).sum())
    sums.texts += 1


@torch.no_grad()
def _accumulate(model: nn.Module, tokenizer: Any, tc: Transcoder, texts: Iterable[str], layer: int, feature: int,
                n_tokens: int, progress: bool) -> _Sums:
    normalised = _reads_normalised(tc)
    context = context_length(model)
    device = next(model.parameters()).device
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    sums = _Sums(torch.zeros(layer, tc.d_sae, dtype=torch.float64, device=tc.device))
    total = len(texts) if isinstance(texts, Sized) else None
    for text in tqdm(texts, total=total, desc="global weights", unit="text", disable=not progress):
        if sums.tokens >= n_tokens:
            break
        ids = list(tokenizer(text)["input_ids"])[:context]
        start = 1 if tc.cfg.prepend_bos and ids and ids[0] in special else 0  # BOS features are huge, uninformative
        stop = min(len(ids), start + n_tokens - sums.tokens)
        if stop <= start:
            continue
        x, nu = _text_inputs(model, tc, torch.tensor([ids], device=device), layer, normalised)
        _add_text(sums, tc, x[start:stop], nu[start:stop], layer, feature)
    return sums


def global_weights(model: nn.Module, tokenizer: Any, tc: Transcoder, texts: Iterable[str], layer: int, feature: int,
                   n_tokens: int, *, k: int = 10, progress: bool = False) -> GlobalWeights:
    """TWERA and virtual weights from every upstream feature into feature `feature` of `layer`, over `texts`:
    one forward per text (cut to the model's context; a leading BOS token left out), texts read until
    `n_tokens` tokens are used (the last one cut to fit), the transcoder encoding every layer up to `layer`."""
    _check_feature(tc, layer, feature)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ConfigError(f"n_tokens must be a positive number of tokens, got {n_tokens!r}")
    start = time.perf_counter()
    virtual = virtual_weights(tc, layer, feature, model)
    sums = _accumulate(model, tokenizer, tc, texts, layer, feature, n_tokens, progress)
    co = sums.joint / sums.target if sums.target > 0 else torch.zeros_like(sums.joint)
    twera = (co * virtual.double()).to(virtual.dtype)
    return GlobalWeights(layer, feature, virtual, co.to(virtual.dtype), twera, top_upstream(twera, k),
                         top_upstream(virtual, k), sums.texts, sums.tokens, sums.active,
                         time.perf_counter() - start)


# --- one feature, everything above (what `clt-hub feature` and the Space's node panel show) --------------------

def feature_weights(model: nn.Module, tokenizer: Any, tc: Transcoder, layer: int, feature: int, *, k: int = 10,
                    heads: Iterable[tuple[int, int]] = (), texts: Iterable[str] | None = None, n_tokens: int = 20_000,
                    progress: bool = False) -> dict[str, Any]:
    """A feature read by its weights alone, as plain values (JSON-ready): its de-embedding, its strongest upstream
    features by virtual weight through the residual stream and through each (attention layer, head) in `heads`,
    and, given `texts`, its global weights (TWERA) over `n_tokens` of them beside the virtual weights."""
    def ranked(r: Ranked) -> dict[str, list[dict[str, Any]]]:
        return {side: [u._asdict() for u in getattr(r, side)] for side in ("positive", "negative")}

    de = de_embedding(model, tc, layer, feature, k=k, tokenizer=tokenizer)
    out: dict[str, Any] = {
        "layer": layer, "feature": feature, "reads": tc.cfg.feature_input_hook,
        "de_embedding": {"top": [t._asdict() for t in de.top], "bottom": [t._asdict() for t in de.bottom],
                         "norm_scale": de.norm_scale, "norm_scale_source": de.norm_scale_source},
        "virtual_weights": ranked(top_upstream(virtual_weights(tc, layer, feature, model), k)),
        "heads": [{"attn_layer": m, "head": h,
                   **ranked(top_upstream(ov_virtual_weights(model, tc, layer, feature, m, h), k))} for m, h in heads],
    }
    if texts is not None:
        g = global_weights(model, tokenizer, tc, texts, layer, feature, n_tokens, k=k, progress=progress)
        out["global_weights"] = {"twera": ranked(g.top_twera), "texts": g.texts, "tokens": g.tokens,
                                 "active_tokens": g.active_tokens, "seconds": round(g.seconds, 3)}
    return out
