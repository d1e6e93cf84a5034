"""Why a head attends where it does: exact QK attribution (issue 40).

With every norm denominator frozen at the real forward pass (the residual norms as FrozenForward records them;
the attention-internal q_norm/k_norm frozen here the same way, from their recorded inputs) a head's query and
key are affine in the residual stream, and rotary embedding is a linear map that depends only on the position.
The residual stream entering layer l at a position is exactly the sum of its direct writers there: the token
embedding, the rest of the layer-0 input (GPT-2's position embedding), every earlier layer's attention heads
(each head its own writer: its slice of the output projection, through the frozen attention output norm), the
output projection's bias, and the earlier MLPs' outputs as the transcoder splits them (active features, error,
skip path, decoder bias). So the pre-softmax score q . k * scaling of head h between query position q and key
position k is a bilinear form: sum over the query's writers i and the key's writers j of q_i . k_j * scaling,
where the affine maps' constants (projection biases, LayerNorm biases) enter as one "bias" writer on each side.

Cost: `record_qk` is one forward pass (attribute's recording plus a few hooks). `qk_query(rec, l, q)` pushes
every writer at positions 0..q through layer l's key path, N = (q + 1) x (1 + l x (heads + 4) + active features
below l per position) vectors through a [d_model -> kv_heads x d_head] projection: O(N d_model kv_heads d_head)
time and N (d_model + kv_heads d_head) numbers held; the query side is one position's writers through the query
heads; the scores of every head and key, O(heads q d_head). A pair's matrix (`QKQuery.pair`) costs
O(n_q n_k d_head) for the n_q and n_k writers at the two positions.

In a graph (`clt-hub trace --qk N`): `qk_influence` / `select_qk` choose the (layer, head, query, key) that carry
the most of the pruned graph's cross-position influence, and `qk_json` writes their splits in Neuronpedia's
graph JSON shape (docs/qk_attribution.md, docs/graph_json.md).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
from torch import nn

from clt_hub.attribution.attribute import _record_forward, _Setup
from clt_hub.attribution.graph import Graph, influence, logit_weights, normalized
from clt_hub.attribution.graph_json import cantor, node_records
from clt_hub.attribution.pruning import Pruned
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import ModelAdapter, adapter_for, get_module
from clt_hub.models.frozen import Recorded
from clt_hub.models.hooks import mlp_points, record
from clt_hub.models.loading import check_compatible, check_prompt
from clt_hub.models.projections import linear_parts, norm_eps, norm_gain
from clt_hub.transcoders.transcoder import Transcoder

KINDS = ("token", "position", "attention", "attention_bias", "feature", "error", "skip", "decoder_bias", "bias")


@dataclass(frozen=True)
class Contributor:
    """One writer to the residual stream at one position, or a side's bias. Graph nodes keep the graph's
    identity: a feature (layer, pos, feature), an error (layer, pos), a token (pos); `node_id` is theirs in
    graph JSON (clt_hub.attribution.graph_json)."""

    kind: str                  # one of KINDS
    pos: int
    layer: int | None = None   # the writing layer (a feature's source layer)
    feature: int | None = None
    head: int | None = None    # attention: the head of `layer`
    token: int | None = None   # token: its id

    @property
    def node_id(self) -> str | None:
        if self.kind == "feature":
            return f"{self.layer}_{self.feature}_{self.pos}"
        if self.kind == "error":
            return f"{self.layer}_-1_{self.pos}"
        if self.kind == "token":
            return f"E_{self.token}_{self.pos}"
        return None

    @property
    def label(self) -> str:
        where = f"@{self.pos}"
        return {
            "token": f"token {self.token} {where}",
            "position": f"position embedding (layer-0 input beyond the token) {where}",
            "attention": f"attention output of layer {self.layer} (head {self.head}) {where}",
            "attention_bias": f"attention output bias of layer {self.layer} {where}",
            "feature": f"feature {self.feature} of layer {self.layer} {where}",
            "error": f"MLP error of layer {self.layer} {where}",
            "skip": f"skip path of layer {self.layer} {where}",
            "decoder_bias": f"transcoder decoder bias of layer {self.layer} {where}",
            "bias": f"projection and norm biases {where}",
        }[self.kind]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "pos": self.pos, "label": self.label}
        for name in ("layer", "feature", "head", "token"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.node_id is not None:
            out["node_id"] = self.node_id
        return out


@dataclass
class QKRecording:
    """The real forward pass QK attribution reads: attribute's recording (frozen residual norm scales, the
    attention queries and keys, active features, errors) plus what only the QK path needs, per layer."""

    setup: _Setup
    adapter: ModelAdapter
    dtype: torch.dtype                          # the accumulation dtype (at least float32)
    token: torch.Tensor                         # [T, d] the embedding module's output (Gemma's scale included)
    rest0: torch.Tensor | None                  # [T, d] layer 0's input minus `token`; None where it is 0
    head_inputs: list[torch.Tensor]             # [T, heads x d_head] each layer's output projection input
    qk_scales: list[tuple[torch.Tensor, torch.Tensor] | None]  # frozen q_norm [T, H], k_norm [T, KV] scales
    rotary: list[tuple[torch.Tensor, torch.Tensor] | None]     # (cos, sin) [T, d_head] of each layer
    mlp_in: torch.Tensor | None                 # [T, L, d] the transcoder's inputs (skip transcoders only)

    def attn(self, l: int) -> nn.Module:
        return get_module(self.adapter.blocks(self.setup.model)[l], self.adapter.attn)

    def recorded(self, l: int) -> Recorded:
        return self.setup.ff.patterns[id(self.attn(l))]

    def shape(self, l: int) -> tuple[int, int, int]:
        """(query heads, key/value heads, d_head), as the attention kernel got them."""
        r = self.recorded(l)
        return r.query.shape[1], r.key.shape[1], r.query.shape[-1]

    def norm(self, l: int, name: str) -> tuple[nn.Module, torch.Tensor]:
        """Norm `name` of block l and its frozen scale [T, 1]."""
        path = f"{self.adapter.layers}.{l}.{name}"
        return get_module(self.setup.model, path), self.setup.ff.scales[path][0].to(self.dtype)


def _norm_linear(kind: str, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The linear part of a norm whose denominator is frozen at `scale` (broadcast against x[..., :1])."""
    gain = norm_gain(kind, norm, x.dtype)
    return (x - x.mean(-1, keepdim=True) if kind == "layernorm" else x) * scale * gain


def _norm_constant(kind: str, norm: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = getattr(norm, "bias", None) if kind == "layernorm" else None
    return None if bias is None else bias.detach().to(dtype)


def _qk_weights(rec: QKRecording, l: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{"q": (W_Q [H*dh, d], b_Q), "k": (W_K [KV*dh, d], b_K)}: separate projections, or the [q | k | v] rows
    of one fused projection (GPT-2's c_attn)."""
    H, KV, dh = rec.shape(l)
    attn, names = rec.attn(l), rec.adapter.qkv
    if len(names) == 3:
        return {side: linear_parts(get_module(attn, n)) for side, n in zip("qk", names[:2], strict=True)}
    if len(names) != 1:
        raise ConfigError(f"ModelAdapter.qkv for {rec.adapter.family} must name 3 projections or one fused one")
    w, b = linear_parts(get_module(attn, names[0]))
    spans = {"q": slice(0, H * dh), "k": slice(H * dh, (H + KV) * dh)}
    return {s: (w[r], None if b is None else b[r]) for s, r in spans.items()}


def _rotate(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The family's own rotary embedding (its module's apply_rotary_pos_emb) of x [N, heads, dh] at the
    positions whose tables are cos, sin [N, dh]."""
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = getattr(
        sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ConfigError(f"{type(attn).__name__} gets rotary tables but its module has no apply_rotary_pos_emb; "
                          "QK attribution cannot apply this family's rotary embedding")
    return fn(x, x, cos, sin)[0]


def _through(rec: QKRecording, l: int, side: str, normed: torch.Tensor, pos: torch.Tensor,
             constant: bool) -> torch.Tensor:
    """Vectors already through the frozen input norm [N, d], at positions `pos` [N] -> their share of layer
    l's queries [N, H, dh] (side "q") or keys [N, KV, dh] (side "k"): projection (its bias where `constant`),
    frozen q_norm/k_norm, rotary at `pos`."""
    H, KV, dh = rec.shape(l)
    w, b = _qk_weights(rec, l)[side]
    out = normed @ w.detach().to(rec.dtype).T
    if constant and b is not None:
        out = out + b.detach().to(rec.dtype)
    out = out.reshape(len(pos), H if side == "q" else KV, dh)
    scales = rec.qk_scales[l]
    if scales is not None:
        norm = get_module(rec.attn(l), f"{side}_norm")
        out = _norm_linear(rec.adapter.norm_kind, norm, out, scales[side == "k"][pos].unsqueeze(-1))
    tables = rec.rotary[l]
    if tables is not None:
        out = _rotate(rec.attn(l), out, tables[0][pos], tables[1][pos])
    return out


def _side(rec: QKRecording, l: int, side: str, resid: torch.Tensor, pos: torch.Tensor,
          positions: torch.Tensor) -> torch.Tensor:
    """Residual writers [N, d] at `pos` -> their query or key vectors, then one bias vector per position of
    `positions` (the affine maps' constants: the input norm's bias pushed through, the projection's bias)."""
    norm, scale = rec.norm(l, rec.adapter.attn_norms[0])
    kind = rec.adapter.norm_kind
    vectors = _through(rec, l, side, _norm_linear(kind, norm, resid, scale[pos]), pos, constant=False)
    beta = _norm_constant(kind, norm, rec.dtype)
    base = torch.zeros(len(positions), resid.shape[1], dtype=rec.dtype)
    bias = _through(rec, l, side, base if beta is None else base + beta, positions, constant=True)
    return torch.cat([vectors, bias])


Writers = tuple[list[Contributor], list[torch.Tensor], list[torch.Tensor]]  # contributors, positions, vectors


def _attention_writers(rec: QKRecording, m: int, positions: torch.Tensor, out: Writers) -> None:
    """Each head of layer m (its slice of the output projection, through the frozen attention output norm)
    and the projection's bias, at `positions`."""
    H, _, dh = rec.shape(m)
    w, b = linear_parts(get_module(rec.attn(m), rec.adapter.attn_out))
    z = rec.head_inputs[m][positions].reshape(len(positions), H, dh)
    heads = torch.einsum("phk,dhk->phd", z, w.detach().to(rec.dtype).reshape(-1, H, dh))
    bias = None if b is None else b.detach().to(rec.dtype).expand(len(positions), -1)
    if rec.adapter.attn_out_norm is not None:
        norm, scale = rec.norm(m, rec.adapter.attn_out_norm)
        kind = rec.adapter.norm_kind
        heads = _norm_linear(kind, norm, heads, scale[positions].unsqueeze(1))
        bias = None if bias is None else _norm_linear(kind, norm, bias, scale[positions])
        beta = _norm_constant(kind, norm, rec.dtype)
        if beta is not None:
            bias = beta.expand(len(positions), -1) if bias is None else bias + beta
    ps = positions.tolist()
    out[0].extend(Contributor("attention", p, layer=m, head=h) for p in ps for h in range(H))
    out[1].append(positions.repeat_interleave(H))
    out[2].append(heads.reshape(-1, heads.shape[-1]))
    if bias is not None:
        out[0].extend(Contributor("attention_bias", p, layer=m) for p in ps)
        out[1].append(positions)
        out[2].append(bias)


def _mlp_writers(rec: QKRecording, m: int, l: int, positions: torch.Tensor, out: Writers) -> None:
    """The transcoder's split of MLP outputs at `positions`, as the graph splits them: source layer m's active
    features (their decoders into layers m..l-1, summed), and MLP m's error node, skip path and decoder bias."""
    s, tc = rec.setup, rec.setup.tc
    chosen = (s.features[:, 0] == m) & torch.isin(s.features[:, 1], positions)
    feats = s.features[chosen]
    if len(feats):
        rows = tc.decoder_rows(m, feats[:, 2]).detach().to(rec.dtype)[:, : l - m].sum(1)
        out[0].extend(Contributor("feature", p, layer=m, feature=f) for _, p, f in feats.tolist())
        out[1].append(feats[:, 1])
        out[2].append(rows * s.feat_acts[chosen, None].to(rec.dtype))
    ps = positions.tolist()
    out[0].extend(Contributor("error", p, layer=m) for p in ps)
    out[1].append(positions)
    out[2].append(s.errors[positions, m].to(rec.dtype))
    if rec.mlp_in is not None:
        out[0].extend(Contributor("skip", p, layer=m) for p in ps)
        out[1].append(positions)
        out[2].append(tc.skip(rec.mlp_in[positions, m].to(tc.dtype), m).detach().to(rec.dtype))
    out[0].extend(Contributor("decoder_bias", p, layer=m) for p in ps)
    out[1].append(positions)
    out[2].append(tc.b_dec[m].detach().to(rec.dtype).expand(len(ps), -1))


def writers(rec: QKRecording, l: int, positions: torch.Tensor) -> tuple[list[Contributor], torch.Tensor,
                                                                         torch.Tensor]:
    """Every direct writer to the residual stream entering layer l at `positions`: (contributors, their
    positions [N], their vectors [N, d]); at each position they sum to the real layer-l input."""
    ids = rec.setup.ids[0]
    out: Writers = ([Contributor("token", p, token=int(ids[p])) for p in positions.tolist()], [positions],
                    [rec.token[positions]])
    if rec.rest0 is not None:
        out[0].extend(Contributor("position", p) for p in positions.tolist())
        out[1].append(positions)
        out[2].append(rec.rest0[positions])
    for m in range(l):
        _attention_writers(rec, m, positions, out)
        _mlp_writers(rec, m, l, positions, out)
    return out[0], torch.cat(out[1]), torch.cat(out[2])


def check_supported(model: nn.Module, transcoder: Transcoder) -> None:
    """What `record_qk` refuses for the pair itself, checked before any work (a trace asks before attributing)."""
    check_compatible(model, transcoder)
    _check_output_point(adapter_for(model), transcoder)


def _check_output_point(adapter: ModelAdapter, tc: Transcoder) -> None:
    module, _ = adapter.hook_point(tc.cfg.feature_output_hook)
    if module != (adapter.mlp_out_norm or adapter.mlp):
        raise ConfigError(f"the transcoder reconstructs {tc.cfg.feature_output_hook!r}, which is not what the MLP "
                          "block adds to the residual stream; QK attribution needs feature_output_hook "
                          "'hook_mlp_out' (use a transcoder trained on it)")


def _recording_hooks(model: nn.Module, adapter: ModelAdapter, tc: Transcoder, stack: ExitStack,
                     store: dict[str, dict[int, Any]]) -> None:
    """Hooks that keep, on the recorded pass, what the QK path needs beyond attribute's recording."""
    L, pre = adapter.n_layers(model), adapter.layers
    attns = [f"{pre}.{l}.{adapter.attn}" for l in range(L)]
    stack.enter_context(record(model, [(adapter.embed, "output"), (f"{pre}.0.{adapter.attn_norms[0]}", "input")],
                               store["embed"]))
    stack.enter_context(record(model, [(f"{a}.{adapter.attn_out}", "input") for a in attns], store["z"]))
    stack.enter_context(record(model, [(f"{a}.{p}", "output") for a in attns for p in adapter.qkv], store["proj"]))
    if tc.cfg.skip:
        stack.enter_context(record(model, mlp_points(model, tc.cfg)[0], store["x"]))
    for l, path in enumerate(attns):
        def keep(mod: nn.Module, args: tuple, kwargs: dict, l: int = l) -> None:
            tables = kwargs.get("position_embeddings")
            store["rotary"][l] = None if tables is None else (tables[0].detach(), tables[1].detach())
        handle = get_module(model, path).register_forward_pre_hook(keep, with_kwargs=True)
        stack.callback(handle.remove)


def _qk_norm_scales(rec: QKRecording, l: int, projected: list[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                      torch.Tensor] | None:
    """Frozen q_norm / k_norm denominators of layer l, [T, H] and [T, KV], from their real inputs (the
    projections' outputs, split into heads), as the family's RMSNorm computes them (in float32)."""
    attn = rec.attn(l)
    if not hasattr(attn, "q_norm"):
        return None
    H, KV, dh = rec.shape(l)
    rows = torch.cat([p[0] for p in projected], dim=-1)    # [T, (H + KV [+ KV]) * dh]
    out = []
    for side, start, n in (("q", 0, H), ("k", H * dh, KV)):
        norm = get_module(attn, f"{side}_norm")
        weight: torch.Tensor = norm.weight  # type: ignore[assignment]
        width = weight.numel()
        if width != dh:
            raise ConfigError(f"{side}_norm of layer {l} normalises {width} values, not one head's {dh}; "
                              "QK attribution supports per-head q/k norms (Gemma-3, Qwen3) only")
        x = rows[:, start:start + n * dh].reshape(-1, n, dh).float()
        out.append(torch.rsqrt(x.pow(2).mean(-1) + norm_eps(norm)).to(rec.dtype))
    return out[0], out[1]


@torch.no_grad()
def record_qk(model: nn.Module, transcoder: Transcoder, input_ids: torch.Tensor, *,
              zero_bos: bool = True) -> QKRecording:
    """One real forward pass of `input_ids` ([T] or [1, T]) recorded for QK attribution: attribute's recording
    (features as the graph has them, `zero_bos` likewise) plus the attention internals."""
    check_compatible(model, transcoder)
    ids = input_ids.reshape(1, -1)
    check_prompt(model, ids)
    adapter = adapter_for(model)
    _check_output_point(adapter, transcoder)
    store: dict[str, dict[int, Any]] = {k: {} for k in ("embed", "z", "proj", "x", "rotary")}
    with torch.no_grad(), ExitStack() as stack:
        _recording_hooks(model, adapter, transcoder, stack, store)
        setup = _record_forward(model, transcoder, ids, zero_bos)
    dtype = torch.promote_types(torch.promote_types(next(model.parameters()).dtype, transcoder.dtype),
                                torch.float32)
    L, n_proj = transcoder.n_layers, len(adapter.qkv)
    token, resid0 = store["embed"][0][0].to(dtype), store["embed"][1][0].to(dtype)
    rest0 = resid0 - token
    x, tables = store["x"], [store["rotary"][l] for l in range(L)]
    rec = QKRecording(
        setup, adapter, dtype, token, rest0 if bool(rest0.any()) else None,
        head_inputs=[store["z"][l][0].to(dtype) for l in range(L)], qk_scales=[],
        rotary=[None if t is None else (t[0][0].to(dtype), t[1][0].to(dtype)) for t in tables],
        mlp_in=torch.stack([x[l][0] for l in range(L)], dim=1) if x else None)
    rec.qk_scales = [_qk_norm_scales(rec, l, [store["proj"][l * n_proj + i] for i in range(n_proj)])
                     for l in range(L)]
    return rec


@dataclass
class QKScore:
    """One head's pre-softmax score between one query and one key, split over the query position's writers
    (rows) and the key position's writers (columns); each side's last contributor is its bias.
    pairs.sum() = query_marginals.sum() = key_marginals.sum() = total (up to rounding) = real."""

    layer: int
    head: int
    query: int
    key: int
    q_contributors: list[Contributor]
    k_contributors: list[Contributor]
    q_vectors: torch.Tensor        # [n_q, d_head] each query writer's share of the query
    k_vectors: torch.Tensor        # [n_k, d_head] each key writer's share of the key
    q_residuals: torch.Tensor      # [n_q, d_model] what each query writer adds to the residual (0: the bias)
    k_residuals: torch.Tensor      # [n_k, d_model]
    pairs: torch.Tensor            # [n_q, n_k] q_i . k_j * scaling
    query_marginals: torch.Tensor  # [n_q] q_i . k * scaling, k the whole key
    key_marginals: torch.Tensor    # [n_k] q . k_j * scaling, q the whole query
    total: float                   # q . k * scaling from the decomposition
    real: float                    # the same from the real pass's query and key
    weight: float                  # the real attention weight
    masked: bool                   # the key is masked for this query (causal or sliding window): weight 0
    softcap: float | None          # Gemma-2's attention logit softcap: the kernel uses cap * tanh(score / cap)

    @property
    def logit(self) -> float:
        """What the softmax sees before the mask: the real score, through Gemma-2's softcap where it has one."""
        return self.real if self.softcap is None else self.softcap * math.tanh(self.real / self.softcap)

    @property
    def bias_terms(self) -> dict[str, float]:
        """The biases' share: query bias . whole key, whole query . key bias, and their product alone."""
        return {"query_bias": float(self.query_marginals[-1]), "key_bias": float(self.key_marginals[-1]),
                "query_bias_key_bias": float(self.pairs[-1, -1])}


@dataclass
class QKQuery:
    """Every head's scores at one query position of one layer against every key up to it, with each writer's
    query and key vectors (what `pair` splits). Key-side rows are ordered by kind, not position: `k_pos` says
    where each sits; the per-position biases are the last `query + 1` rows."""

    rec: QKRecording
    layer: int
    query: int
    scaling: float
    softcap: float | None
    q_contributors: list[Contributor]
    k_contributors: list[Contributor]
    k_pos: torch.Tensor          # [N_k]
    q_vectors: torch.Tensor      # [n_q, H, dh]
    k_vectors: torch.Tensor      # [N_k, KV, dh]
    q_residuals: torch.Tensor    # [n_q, d] each query writer's residual vector (zero for the bias)
    k_residuals: torch.Tensor    # [N_k, d]
    scores: torch.Tensor         # [H, query + 1] q . k * scaling from the decomposition
    real: torch.Tensor           # [H, query + 1] from the real pass
    weights: torch.Tensor        # [H, query + 1] real attention weights
    masked: torch.Tensor         # [query + 1] bool

    @property
    def groups(self) -> int:
        return self.q_vectors.shape[1] // self.k_vectors.shape[1]

    @torch.no_grad()
    def pair(self, head: int, key: int) -> QKScore:
        """The split of head `head`'s score for key position `key` (grouped-query: its key/value head)."""
        _check_index("head", head, self.q_vectors.shape[1], f"layer {self.layer} has that many query heads")
        _check_index("key", key, self.query + 1, f"a query at position {self.query} sees keys 0..{self.query}")
        kv = head // self.groups
        sel = (self.k_pos == key).nonzero().squeeze(1)
        qv, kvec, s = self.q_vectors[:, head], self.k_vectors[sel, kv], self.scaling
        return QKScore(
            self.layer, head, self.query, key, self.q_contributors, [self.k_contributors[i] for i in sel.tolist()],
            q_vectors=qv, k_vectors=kvec, q_residuals=self.q_residuals, k_residuals=self.k_residuals[sel],
            pairs=qv @ kvec.T * s, query_marginals=qv @ kvec.sum(0) * s, key_marginals=kvec @ qv.sum(0) * s,
            total=float(self.scores[head, key]), real=float(self.real[head, key]),
            weight=float(self.weights[head, key]), masked=bool(self.masked[key]), softcap=self.softcap)


def _check_index(name: str, value: int, n: int, why: str) -> None:
    if not 0 <= value < n:
        raise ConfigError(f"{name} {value} is out of range 0..{n - 1} ({why}); pick one in range")


def _real_scores(rec: QKRecording, l: int, q: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """The real pass's scores [H, q + 1], attention weights [H, q + 1] and mask [q + 1] at query q."""
    r = rec.recorded(l)
    H, KV, _ = rec.shape(l)
    query = r.query[0, :, q].to(rec.dtype)                              # [H, dh]
    keys = r.key[0, torch.arange(H) // (H // KV), : q + 1].to(rec.dtype)  # [H, q + 1, dh]
    real = torch.einsum("hd,hpd->hp", query, keys) * scaling
    weights = r.pattern(q, q + 1, rec.setup.T)[0, :, 0, : q + 1].to(rec.dtype)
    mask = r.mask
    masked = torch.zeros(q + 1, dtype=torch.bool) if mask is None else \
        mask[0, 0, q if mask.shape[-2] > 1 else 0, : q + 1] <= torch.finfo(mask.dtype).min / 2
    return real, weights, masked


@torch.no_grad()
def qk_query(rec: QKRecording, layer: int, query: int) -> QKQuery:
    """All heads of `layer` at query position `query`, against every key 0..query (see the module's cost)."""
    _check_index("layer", layer, rec.setup.L, "the model's layers")
    _check_index("query", query, rec.setup.T, "the prompt's positions")
    kwargs = rec.recorded(layer).kwargs
    scaling = kwargs.get("scaling", getattr(rec.attn(layer), "scaling", None))
    if scaling is None:
        raise ConfigError(f"the attention of layer {layer} has no `scaling`; QK attribution needs the score scale")
    softcap = kwargs.get("softcap")
    here, keys = torch.tensor([query]), torch.arange(query + 1)
    qc, qp, qr = writers(rec, layer, here)
    kc, kp, kr = writers(rec, layer, keys)
    qv = _side(rec, layer, "q", qr, qp, here)             # [n_q + 1, H, dh]
    kv = _side(rec, layer, "k", kr, kp, keys)             # [N_k + P, KV, dh]
    H, KV, dh = rec.shape(layer)
    k_pos = torch.cat([kp, keys])
    whole_keys = torch.zeros(query + 1, KV, dh, dtype=rec.dtype).index_add_(0, k_pos, kv)
    spread = whole_keys[:, torch.arange(H) // (H // KV)]  # [P, H, dh]
    scores = torch.einsum("hd,phd->hp", qv.sum(0), spread) * scaling
    real, weights, masked = _real_scores(rec, layer, query, float(scaling))
    zeros = torch.zeros
    return QKQuery(rec, layer, query, float(scaling), None if softcap is None else float(softcap),
                   qc + [Contributor("bias", query)], kc + [Contributor("bias", p) for p in keys.tolist()],
                   k_pos, qv, kv, torch.cat([qr, zeros(1, qr.shape[1], dtype=rec.dtype)]),
                   torch.cat([kr, zeros(query + 1, kr.shape[1], dtype=rec.dtype)]), scores, real, weights, masked)


def qk_attribution(model: nn.Module, transcoder: Transcoder, input_ids: torch.Tensor, layer: int, head: int,
                   query: int, key: int, *, zero_bos: bool = True) -> QKScore:
    """One score's split in one call: `record_qk`, `qk_query`, `QKQuery.pair` (keep the recording and the
    QKQuery to split many heads, keys or queries)."""
    return qk_query(record_qk(model, transcoder, input_ids, zero_bos=zero_bos), layer, query).pair(head, key)


def _top(values: torch.Tensor, k: int) -> list[int]:
    return values.abs().flatten().argsort(descending=True)[:k].tolist()


def top_qk(score: QKScore, k: int = 10) -> dict[str, Any]:
    """The `k` largest pairs and marginals of a score by |value|, with the totals and the biases' share:
    plain Python values, ready for a report or JSON."""
    if k < 1:
        raise ConfigError(f"k={k}: ask for at least one pair (k >= 1)")
    n_k = score.pairs.shape[1]
    pairs = [{"query": score.q_contributors[i // n_k].as_dict(), "key": score.k_contributors[i % n_k].as_dict(),
              "value": float(score.pairs.flatten()[i])} for i in _top(score.pairs, k)]
    return {
        "layer": score.layer, "head": score.head, "query": score.query, "key": score.key,
        "total": score.total, "real": score.real, "weight": score.weight, "masked": score.masked,
        "softcap": score.softcap, "logit": score.logit, "bias_terms": score.bias_terms, "top_pairs": pairs,
        "top_query": [{"contributor": score.q_contributors[i].as_dict(), "value": float(score.query_marginals[i])}
                      for i in _top(score.query_marginals, k)],
        "top_key": [{"contributor": score.k_contributors[i].as_dict(), "value": float(score.key_marginals[i])}
                    for i in _top(score.key_marginals, k)],
    }


# What to trace in a graph (issue 40, item 2). The graph freezes attention patterns, so an edge from a node at
# key position k to a node at a later query position q flows only through attention heads: those of the layers
# that read the source's write and come before the target reads the residual stream. Each kept cross-position
# edge's share of the graph's influence is split over those heads in proportion to their real attention weight
# A[m, h, q, k]; a head's (layer, head, query, key) carries the sum of its shares.


def _node_places(graph: Graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each node's position, the first attention layer that reads what it writes (`lo`) and the last attention
    layer before it reads the residual stream (`hi`, -1 for nodes without inputs)."""
    n, nf, ne, P = graph.n_nodes, graph.n_features, graph.n_errors, graph.n_pos
    pos = torch.full((n,), P - 1, dtype=torch.long)   # logits: the last position
    lo = torch.zeros(n, dtype=torch.long)             # tokens: read from layer 0's attention on
    hi = torch.full((n,), -1, dtype=torch.long)
    f = graph.features.long()
    pos[:nf], lo[:nf], hi[:nf] = f[:, 1], f[:, 0] + 1, f[:, 0]  # MLP l's write, MLP l's input (after attention l)
    e = torch.arange(ne)
    pos[nf:nf + ne], lo[nf:nf + ne] = e % P, e // P + 1
    pos[graph.token_index(0):graph.logit_index(0)] = torch.arange(P)
    hi[graph.logit_index(0):] = graph.n_layers - 1
    return pos, lo, hi


def edge_influence(graph: Graph, pruned: Pruned) -> torch.Tensor:
    """[n_rows, n_nodes]: each kept edge's share of the graph's influence on the logits, zero elsewhere: pruning's
    edge score on the kept nodes (|weight| over its target's inputs, times the target's influence plus its own
    logit weight), so the shares into a node add up to that node's influence."""
    keep, rows = pruned.node_mask, graph.row_nodes
    a = normalized(graph.rows * keep[rows][:, None] * keep[None, :])
    w = logit_weights(graph)
    return a * (influence(a, w[rows], rows) + w)[rows][:, None] * pruned.edges


def _attention_at(rec: QKRecording, q: torch.Tensor, k: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor) -> list[torch.Tensor]:
    """Per layer m, [heads, G]: the real attention weight A[m, h, q_g, k_g] where lo_g <= m <= hi_g, else 0. One
    recomputation of each layer's pattern, a block of queries at a time, only where a group needs it."""
    out = []
    for m in range(rec.setup.L):
        r, need = rec.recorded(m), (lo <= m) & (m <= hi)
        a = torch.zeros(rec.shape(m)[0], len(q))
        for q0, q1 in r.blocks(rec.setup.T):
            sel = (need & (q >= q0) & (q < q1)).nonzero().squeeze(1)
            if len(sel):
                a[:, sel] = r.pattern(q0, q1, rec.setup.T)[0][:, q[sel] - q0, k[sel]].float()
        out.append(a)
    return out


@dataclass
class QKInfluence:
    """A graph's kept cross-position influence split over the heads that carry it. A group is the kept edges
    into one node from one key position (and one first carrying layer); a unit is (layer, head, query, key)."""

    target: torch.Tensor         # [G] each group's target node
    bucket: torch.Tensor         # [G] each group's (query, key), an index into the units' buckets
    shares: list[torch.Tensor]   # per layer, [heads, G]: the part of group g's influence that head h carries
    units: torch.Tensor          # [U, 4] (layer, head, query, key), by the influence they carry, largest first
    unit_bucket: torch.Tensor    # [U]
    influence: torch.Tensor      # [U]
    total: float                 # all kept cross-position influence with a carrier: influence.sum(), rounded

    def into(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nodes, influence): where unit i's influence goes, by kept node, largest first."""
        m, h = int(self.units[i, 0]), int(self.units[i, 1])
        sel = self.bucket == self.unit_bucket[i]
        nodes, inv = self.target[sel].unique(return_inverse=True)
        into = torch.zeros(len(nodes)).index_add_(0, inv, self.shares[m][h, sel])
        order = into.argsort(descending=True, stable=True)
        return nodes[order], into[order]


def qk_influence(graph: Graph, pruned: Pruned, rec: QKRecording) -> QKInfluence:
    """Split each kept edge from key position k to a later query position q (its `edge_influence`) over the heads
    of the layers that can carry it (from the first that reads the source's write to the last before the target
    reads), in proportion to their real attention weights from q to k. Cost: `edge_influence` is pruning's
    influence once more (O(depth x rows x nodes)); the weights are one recomputation of the attention patterns
    (O(layers x heads x T^2 x d_head)); G groups (at most the kept edges) take O(G x layers x heads)."""
    scores = edge_influence(graph, pruned).float()
    pos, lo, hi = _node_places(graph)
    r, s = scores.nonzero(as_tuple=True)
    t = graph.row_nodes[r]
    cross = (pos[s] < pos[t]) & (lo[s] <= hi[t])
    r, s, t = r[cross], s[cross], t[cross]
    keys, group = torch.stack([t, pos[s], lo[s]], 1).reshape(-1, 3).unique(dim=0, return_inverse=True)
    score = torch.zeros(len(keys)).index_add_(0, group, scores[r, s])
    target, q, k = keys[:, 0], pos[keys[:, 0]], keys[:, 1]
    weights = _attention_at(rec, q, k, keys[:, 2], hi[target])
    carried = torch.stack([w.sum(0) for w in weights]).sum(0)
    per = torch.where(carried > 0, score / carried.clamp(min=1e-30), torch.zeros(()))
    shares = [w * per for w in weights]
    pairs, bucket = torch.stack([q, k], 1).unique(dim=0, return_inverse=True)
    found = []
    for m, share in enumerate(shares):
        by_pair = torch.zeros(share.shape[0], len(pairs)).index_add_(1, bucket, share)
        h, b = by_pair.nonzero(as_tuple=True)
        found.append((torch.full_like(h, m), h, b, by_pair[h, b]))
    layer, head, b, value = (torch.cat(x) for x in zip(*found, strict=True))
    order = value.argsort(descending=True, stable=True)
    units = torch.stack([layer, head, pairs[b, 0], pairs[b, 1]], 1)[order] if len(b) else \
        torch.zeros(0, 4, dtype=torch.long)
    return QKInfluence(target, bucket, shares, units, b[order], value[order], float(score[carried > 0].sum()))


@dataclass(frozen=True)
class QKSelection:
    """One (layer, head, query, key) chosen to explain, and the kept node at `query` it is shown on."""

    layer: int
    head: int
    query: int
    key: int
    node: int           # the graph node (index) the explanation is attached to
    influence: float    # the kept cross-position influence the head carries from key to query, into every node
    into_node: float    # the part of it that goes into `node`


def select_qk(graph: Graph, pruned: Pruned, rec: QKRecording, n: int) -> list[QKSelection]:
    """The `n` (layer, head, query, key) that carry the most kept cross-position influence (`qk_influence`),
    each shown on a node of its own: the node its influence goes into most among those not yet taken (a unit
    whose nodes are all taken is passed over). Fewer than `n` when fewer units or nodes are there."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r}: ask for at least one (layer, head, query, key) to explain (n >= 1)")
    found = qk_influence(graph, pruned, rec)
    targets, taken = set(found.target.tolist()), set[int]()
    out: list[QKSelection] = []
    for i in range(len(found.units)):
        if len(out) == n or taken == targets:
            break
        nodes, into = found.into(i)
        free = [j for j, (node, v) in enumerate(zip(nodes.tolist(), into.tolist(), strict=True))
                if node not in taken and v > 0]
        if free:
            node = int(nodes[free[0]])
            taken.add(node)
            m, h, q, k = found.units[i].tolist()
            out.append(QKSelection(m, h, q, k, node, float(found.influence[i]), float(into[free[0]])))
    return out


# Graph JSON (Neuronpedia's graph schema: docs/graph_json.md). Contributors that are graph nodes keep their ids;
# the others get ids of their own, under the names Neuronpedia's graph server gives such leaves where it has one.
_BIAS = {"attention_bias": "attn_bO", "decoder_bias": "tc_bD"}
_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
          "position": "embedding", "attention": "unknown", "skip": "unknown"}


def json_id(c: Contributor, layer: int, side: str) -> str:
    """A contributor's id in graph JSON: `node_id` for graph nodes; `E_position_{pos}`, `{l}_head_{h}_{pos}`,
    `{l}_skip_{pos}`, `{l}_bias_attn_bO_{pos}`, `{l}_bias_tc_bD_{pos}` for the others, and for a side's bias
    `{layer}_bias_attn_bQ_{pos}` or `..._bK_...` (`layer` the attention explained, `side` "q" or "k")."""
    if c.node_id is not None:
        return c.node_id
    if c.kind == "position":
        return f"E_position_{c.pos}"
    if c.kind in ("attention", "skip"):
        return f"{c.layer}_{'head_' + str(c.head) if c.kind == 'attention' else 'skip'}_{c.pos}"
    return f"{layer if c.layer is None else c.layer}_bias_{_BIAS.get(c.kind, 'attn_b' + side.upper())}_{c.pos}"


def _descriptor(c: Contributor, node_id: str, layer: int, side: str, rec: QKRecording) -> dict[str, Any]:
    """A contributor that is not a kept node, as a `qk_only_nodes` entry."""
    l = layer if c.layer is None else c.layer
    out: dict[str, Any] = {"node_id": node_id, "feature": None, "layer": str(l), "ctx_idx": c.pos,
                           "feature_type": _TYPES.get(c.kind, "bias"), "jsNodeId": node_id, "clerp": c.label,
                           "activation": None}
    if c.kind == "feature":
        f = rec.setup.features
        hit = ((f[:, 0] == l) & (f[:, 1] == c.pos) & (f[:, 2] == c.feature)).nonzero()
        out.update(feature=cantor(l, int(c.feature or 0)), jsNodeId=f"{l}_{c.feature}-0",
                   activation=float(rec.setup.feat_acts[int(hit[0])]))
    elif c.kind == "error":
        out.update(feature=-1, jsNodeId=f"{node_id}-0")
    elif c.kind in ("token", "position"):
        out.update(layer="E", jsNodeId=f"E_{c.token}-{c.pos}" if c.kind == "token" else node_id)
    elif c.kind == "bias":
        out["clerp"] = f"{'query' if side == 'q' else 'key'} projection and norm biases of layer {l} @{c.pos}"
    return out


def _results(s: QKScore, top: int, name: Callable[[Contributor, str], str]) -> dict[str, list[list[Any]]]:
    n_k = s.pairs.shape[1]
    return {
        "pair_wise_contributors": [[name(s.q_contributors[i // n_k], "q"), name(s.k_contributors[i % n_k], "k"),
                                    float(s.pairs.flatten()[i])] for i in _top(s.pairs, top)],
        "top_q_marginal_contributors": [[name(s.q_contributors[i], "q"), float(s.query_marginals[i])]
                                        for i in _top(s.query_marginals, top)],
        "top_k_marginal_contributors": [[name(s.k_contributors[i], "k"), float(s.key_marginals[i])]
                                        for i in _top(s.key_marginals, top)],
    }


def qk_json(rec: QKRecording, graph: Graph, pruned: Pruned, chosen: list[QKSelection], *,
            top: int = 10) -> dict[str, Any]:
    """The chosen scores split, for `graph_json.to_json(..., qk=)`: {"nodes": {node_id: {"qk_tracing_results",
    "qk_head"}}, "qk_only_nodes": {node_id: descriptor}} with the `top` largest pairs and marginals (by |value|)
    of each, every contributor named by `json_id`. One `qk_query` per (layer, query) among the chosen."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top={top!r}: keep at least one contributor per list (top >= 1)")
    ids = [r["node_id"] for r in node_records(graph, [])]
    kept = {ids[i] for i in pruned.node_mask.nonzero().squeeze(-1).tolist()}
    nodes: dict[str, dict[str, Any]] = {}
    only: dict[str, dict[str, Any]] = {}
    for (layer, query), group in groupby(sorted(chosen, key=lambda c: (c.layer, c.query)),
                                         key=lambda c: (c.layer, c.query)):
        def name(c: Contributor, side: str, layer: int = layer) -> str:
            node_id = json_id(c, layer, side)
            if node_id not in kept and node_id not in only:
                only[node_id] = _descriptor(c, node_id, layer, side, rec)
            return node_id

        scores = qk_query(rec, layer, query)
        for c in group:
            s = scores.pair(c.head, c.key)
            head = {"layer": c.layer, "head": c.head, "query": c.query, "key": c.key, "score": s.total,
                    "attention": s.weight, "influence": c.influence, "into_node": c.into_node}
            nodes[ids[c.node]] = {"qk_tracing_results": _results(s, top, name), "qk_head": head}
    return {"nodes": nodes, "qk_only_nodes": only}
