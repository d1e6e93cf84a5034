"""Attribution graphs on the local replacement model (Ameisen et al. 2025).

With attention patterns and norm denominators frozen (clt_hub.models.frozen) and every MLP output pinned
to a constant, the map from MLP outputs and token embeddings to any later encoder pre-activation
or logit is linear. One backward pass per batch of targets gives the gradient at every layer's
MLP-output point; contracting it with `activation * decoder vector` (features), error vectors and
embeddings gives all incoming edges of those targets at once.

`attribute` runs named phases: record the real forward, encode, plan memory, choose the output
targets, compute rows (logits first, then features), assemble the adjacency, values and constants.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from clt_hub.attribution.graph import Graph, influence
from clt_hub.attribution.targets import Target, output_targets
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.frozen import FrozenForward
from clt_hub.models.hooks import Point, mlp_points, not_computed, on_points, record, replace_outputs
from clt_hub.models.loading import check_compatible, check_prompt
from clt_hub.transcoders.transcoder import Transcoder

# features are traced in this many position groups, each sharing one forward on its prompt prefix
POSITION_GROUPS = 8
# one target row: (node index, layer it reads, or n_layers for logits; position; encoder/logit vector; feature)
Row = tuple[int, int, int, torch.Tensor, int]


@dataclass
class _Setup:
    """What the phases share: the model, transcoder, frozen forward and the real forward's quantities."""

    model: nn.Module
    tc: Transcoder
    ids: torch.Tensor                 # [1, T]
    ff: FrozenForward
    in_points: list[Point]
    out_points: list[Point]
    y: torch.Tensor                   # [T, L, d] true MLP outputs
    errors: torch.Tensor              # [T, L, d] true MLP outputs - reconstruction
    features: torch.Tensor            # [k, 3] (layer, pos, feature), sorted by (layer, pos, feature)
    feat_acts: torch.Tensor           # [k]
    logits: torch.Tensor              # [vocab] at the last position

    @property
    def T(self) -> int:
        return self.ids.shape[1]

    @property
    def L(self) -> int:
        return self.tc.n_layers

    @property
    def acc(self) -> torch.dtype:
        """Edges are accumulated in at least float32."""
        return torch.promote_types(self.tc.dtype, torch.float32)


def _record_forward(model: nn.Module, tc: Transcoder, ids: torch.Tensor, zero_bos: bool) -> _Setup:
    """Real forward: record the frozen quantities, the transcoder's inputs and the true MLP outputs; encode."""
    ff = FrozenForward(model)
    in_points, out_points = mlp_points(model, tc.cfg)
    xs: dict[int, torch.Tensor] = {}
    ys: dict[int, torch.Tensor] = {}
    with torch.no_grad(), ff.recording(), record(model, in_points, xs), record(model, out_points, ys):
        logits = model(ids).logits[0, -1]
    L, dtype = tc.n_layers, tc.dtype
    x = torch.stack([xs[l][0] for l in range(L)], dim=1).to(dtype)    # [T, L, d]
    y = torch.stack([ys[l][0] for l in range(L)], dim=1).to(dtype)    # [T, L, d]
    with torch.no_grad():
        pre = torch.stack([tc.pre_activations(x[:, l], l) for l in range(L)], dim=1)  # [T, L, F]
        acts = torch.stack([tc.activate(pre[:, l], l) for l in range(L)], dim=1)
        if zero_bos:
            acts[0] = 0  # BOS features are huge and uninformative; the error node at position 0 absorbs them
        errors = y - tc.decode(acts, x if tc.cfg.skip else None)
    T = ids.shape[1]
    pos_l_f = acts.nonzero()  # [k, 3] (pos, layer, feature)
    order = torch.argsort(pos_l_f[:, 1] * T * tc.d_sae + pos_l_f[:, 0] * tc.d_sae + pos_l_f[:, 2])
    pos_l_f = pos_l_f[order]
    return _Setup(model, tc, ids, ff, in_points, out_points, y, errors, features=pos_l_f[:, [1, 0, 2]],
                  feat_acts=acts[pos_l_f[:, 0], pos_l_f[:, 1], pos_l_f[:, 2]], logits=logits)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _plan_memory(s: _Setup, max_logits: int, max_feature_nodes: int | None, max_memory_bytes: int | None) -> None:
    """Refuse up front, with the estimate, a graph whose adjacency and decoder rows would not fit."""
    tc, k, T = s.tc, len(s.features), s.T
    n_nodes = k + (tc.n_layers + 1) * T + max_logits
    n_rows = (k if max_feature_nodes is None else min(k, max_feature_nodes)) + max_logits
    final_nodes = n_rows + (tc.n_layers + 1) * T
    per_layer = torch.bincount(s.features[:, 0], minlength=tc.n_layers).tolist()  # active features per layer
    decoder_values = sum(n * tc.cfg.n_targets(l) * tc.d_model for l, n in enumerate(per_layer))
    all_rows = max_feature_nodes is None or max_feature_nodes >= k  # rows written in place: one matrix
    matrices = n_nodes**2 if all_rows else n_rows * n_nodes + final_nodes**2
    need = 4 * matrices + decoder_values * tc.dtype.itemsize
    budget = max_memory_bytes if max_memory_bytes is not None else _physical_memory() // 2
    if need > budget:
        raise ConfigError(
            f"this graph has {k} active features and {n_nodes} nodes; its adjacency and the active features' "
            f"decoder vectors need about {need / 2**30:.1f} GiB, more than the {budget / 2**30:.1f} GiB "
            "allowed. Use a shorter prompt or raise max_memory_bytes")


def _decoder_blocks(s: _Setup) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """Decoder rows of active features scaled by activation, in blocks of one (source layer, position):
    an edge block is then one matmul of the gradient at that position with the block's rows.
    Each block: (layer, position, first node, end node, rows [n, n_targets * d])."""
    blocks = []
    for l in range(s.L):
        sel = (s.features[:, 0] == l).nonzero().squeeze(-1)
        if not sel.numel():
            continue
        rows = s.tc.decoder_rows(l, s.features[sel, 2]).detach().to(s.acc) * s.feat_acts[sel, None, None].to(s.acc)
        rows = rows.reshape(len(sel), -1)
        positions = s.features[sel, 1]
        for p in positions.unique().tolist():
            at = (positions == p).nonzero().squeeze(-1)
            block = sel[at]  # contiguous: features are sorted by (layer, position)
            blocks.append((l, p, int(block[0]), int(block[-1]) + 1, rows[at]))
    return blocks


class _Retained:
    """One frozen forward on the prompt's first P tokens, repeated B times, kept for many backwards.

    Every value in the frozen model is the same for each copy; the copies exist so that one backward
    gives B independent gradients. Causality lets a target at position p use any prefix longer than p,
    so targets are grouped by position and each group shares one forward."""

    def __init__(self, s: _Setup, P: int, B: int):
        self.s, self.P = s, P
        self.leaves: dict[int, torch.Tensor] = {}      # MLP-output leaves by layer
        self.inputs: dict[int, torch.Tensor] = {}      # live transcoder inputs by layer
        self.final: dict[int, torch.Tensor] = {}       # live final-norm output
        adapter = adapter_for(s.model)
        tc = s.tc

        def embed(_: int, o: torch.Tensor) -> torch.Tensor:
            self.emb = o.detach().expand(B, -1, -1).clone().requires_grad_(True)
            return self.emb

        def pin(l: int, o: torch.Tensor) -> torch.Tensor:
            leaf = torch.zeros(B, P, tc.d_model, dtype=o.dtype, requires_grad=True)
            self.leaves[l] = leaf
            base = s.y[:P, l].to(o.dtype)
            if tc.cfg.skip:  # the skip path is linear: let gradients through it
                skip = tc.skip(self.inputs[l].to(tc.dtype), l).to(o.dtype)
                return base - skip.detach() + skip + leaf
            return base + leaf

        mlps = [f"{adapter.layers}.{l}.{adapter.mlp}" for l in range(s.L)]  # pinned anyway: not computed
        with replace_outputs(s.model, [(adapter.embed, "output")], embed), \
                record(s.model, s.in_points, self.inputs, detach=False), \
                replace_outputs(s.model, s.out_points, pin), \
                record(s.model, [(adapter.final_norm, "output")], self.final, detach=False), \
                not_computed(s.model, mlps), s.ff.frozen(), torch.enable_grad():
            getattr(s.model, "base_model", s.model)(s.ids[:, :P].expand(B, -1))  # no LM head needed

    def gradients(self, batch: Sequence[Row]) -> tuple[torch.Tensor | None, ...]:
        """d(target)/d(embeddings, MLP outputs below the batch's deepest layer); autograd walks only
        the part of the graph below the layers the targets read."""
        L = self.s.L
        deepest = max(t[1] for t in batch)
        seeds: dict[int, torch.Tensor] = {}
        for b, (_, layer, pos, vec, _) in enumerate(batch):
            src = self.final[0] if layer == L else self.inputs[layer]
            if layer not in seeds:
                seeds[layer] = torch.zeros(src.shape, dtype=src.dtype)
            seeds[layer][b, pos] = vec.to(src.dtype)
        outputs = [self.final[0] if layer == L else self.inputs[layer] for layer in seeds]
        wrt = [self.emb] + [self.leaves[l] for l in range(min(deepest, L))]
        with torch.enable_grad():
            return torch.autograd.grad(outputs, wrt, list(seeds.values()), retain_graph=True,  # type: ignore[arg-type]
                                       allow_unused=True)


class _Rows:
    """The rows computed so far. When every feature gets a row, rows sit at their node index, so the
    buffer *is* the adjacency; otherwise one buffer row per computed target, in computation order."""

    def __init__(self, s: _Setup, n_logits: int, n_feature_rows: int, progress: bool):
        self.s = s
        k, T, L = len(s.features), s.T, s.L
        self.k, self.n_err = k, L * T
        self.n_nodes = k + L * T + T + n_logits
        self.in_place = n_feature_rows == k
        self.buffer = torch.zeros(self.n_nodes if self.in_place else n_feature_rows + n_logits, self.n_nodes)
        self.row_of: dict[int, int] = {}
        self.targets: list[Row] = []
        self.passes = 0
        self.blocks = _decoder_blocks(s)
        self.embeddings = get_module(s.model, adapter_for(s.model).embed)(s.ids)[0].detach()
        self.bar = tqdm(total=n_feature_rows + n_logits, desc="attribution", unit="target", disable=not progress)

    def compute(self, run: _Retained, batch: Sequence[Row]) -> None:
        """One backward pass: the incoming edges of every target in `batch`."""
        s, n, P = self.s, len(batch), run.P
        grads = [g[:n] if g is not None else None for g in run.gradients(batch)]
        self.passes += 1
        self.bar.update(n)
        g_emb = grads[0]
        assert g_emb is not None
        g_out = torch.zeros(n, P, s.L, s.tc.d_model, dtype=s.acc)  # layers at or above the deepest: 0
        for l, gr in enumerate(grads[1:]):
            if gr is not None:
                g_out[:, :, l] = gr
        for t in batch:
            self.row_of[t[0]] = t[0] if self.in_place else len(self.row_of)
            self.targets.append(t)
        rows = torch.tensor([self.row_of[t[0]] for t in batch])
        deepest = max(t[1] for t in batch)
        for l, p, start, stop, scaled in self.blocks:  # feature -> target edges
            if p >= P or l >= deepest:
                continue  # later positions and same-or-deeper layers cannot reach these targets
            n_t = scaled.shape[1] // s.tc.d_model
            grad_at = g_out[:, p, l:l + n_t].reshape(n, -1)  # [n, n_t * d]
            self.buffer[rows, start:stop] = (grad_at @ scaled.T).float()
        err_edges = torch.zeros(n, s.L, s.T, dtype=s.acc)
        err_edges[:, :, :P] = torch.einsum("btld,tld->blt", g_out, s.errors[:P].to(s.acc))
        k = self.k
        self.buffer[rows, k:k + self.n_err] = err_edges.reshape(n, self.n_err).float()
        self.buffer[rows, k + self.n_err:k + self.n_err + P] = torch.einsum(
            "btd,td->bt", g_emb.to(s.acc), self.embeddings[:P].to(s.acc)).float()

    def estimated_feature_influence(self, logit_rows: Sequence[Row], weights: torch.Tensor) -> torch.Tensor:
        """Influence on the logits of every feature, from the rows computed so far."""
        a = self.buffer[: len(self.row_of)].abs()
        a = a / a.sum(1, keepdim=True).clamp(min=1e-10)
        start = torch.zeros(len(self.row_of))
        for j, t in enumerate(logit_rows):
            start[self.row_of[t[0]]] = weights[j]
        row_nodes = torch.tensor(list(self.row_of), dtype=torch.long)  # node index of each computed row
        return influence(a, start, row_nodes)[: self.k]

    def adjacency(self) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[int, int]]:
        """(square adjacency over the selected features + errors + tokens + logits, the left-out features'
        effect on each row, the selected feature indices, old node index -> new node index)."""
        k = self.k
        selected = sorted(i for i in self.row_of if i < k)
        keep = torch.tensor(selected + list(range(k, self.n_nodes)), dtype=torch.long)
        new_index = {int(old): new for new, old in enumerate(keep.tolist())}
        dropped = torch.zeros(len(keep), dtype=torch.float32)
        if self.in_place:
            return self.buffer, dropped, selected, new_index  # all nodes kept, rows at their node index: no copy
        left_out = torch.ones(k, dtype=torch.bool)
        left_out[selected] = False
        adjacency = torch.zeros(len(keep), len(keep), dtype=torch.float32)
        dest = torch.tensor([new_index[node] for node in self.row_of], dtype=torch.long)
        computed = self.buffer[: len(self.row_of)]
        adjacency[dest] = computed[:, keep]
        dropped[dest] = computed[:, :k][:, left_out].sum(1)
        return adjacency, dropped, selected, new_index


def _feature_rows(s: _Setup, rows: _Rows, full: _Retained, batch_size: int) -> None:
    """Every feature's row, in position groups that each share one forward on their prefix; inside a
    group by layer, so each backward stops at its batch's layer."""
    T, features = s.T, s.features
    n_groups = min(T, POSITION_GROUPS)
    bounds = [round(T * (g + 1) / n_groups) for g in range(n_groups)]
    lo = 0
    for hi in bounds:
        in_group = ((features[:, 1] >= lo) & (features[:, 1] < hi)).nonzero().squeeze(-1)
        lo = hi
        if not in_group.numel():
            continue
        run = full if hi == T else _Retained(s, hi, batch_size)
        ordered = in_group[torch.argsort(features[in_group, 0] * T + features[in_group, 1], stable=True)].tolist()
        for start in range(0, len(ordered), batch_size):
            rows.compute(run, [_feature_row(s, i) for i in ordered[start:start + batch_size]])
        del run


def _feature_row(s: _Setup, i: int) -> Row:
    layer, pos, feature = s.features[i].tolist()
    return (i, layer, pos, s.tc.W_enc[layer][feature].detach(), feature)


def _values_and_constants(s: _Setup, targets: Sequence[Row], n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's value (feature pre-activation; logit, pre-softcap and demeaned) and its constant
    part: the same frozen linear model run with all sources (embeddings, MLP outputs) set to zero."""
    adapter, tc, L = adapter_for(s.model), s.tc, s.L
    runs: dict[str, dict[int, torch.Tensor]] = {}
    for mode in ("values", "constants"):
        ins: dict[int, torch.Tensor] = {}
        final: dict[int, torch.Tensor] = {}

        def bias_only(l: int, o: torch.Tensor, ins: dict[int, torch.Tensor] = ins) -> torch.Tensor:
            # no feature or error output, only the decoder bias (and the linear skip path)
            out = tc.b_dec[l].detach().to(o.dtype).expand_as(o)
            return out + tc.skip(ins[l].to(tc.dtype), l).to(o.dtype) if tc.cfg.skip else out

        zero = mode == "constants"
        embed_pts: list[Point] = [(adapter.embed, "output")] if zero else []
        out_pts: list[Point] = s.out_points if zero else []
        with torch.no_grad(), record(s.model, [(adapter.final_norm, "output")], final), \
                record(s.model, s.in_points, ins), \
                on_points(s.model, embed_pts, lambda _, o: torch.zeros_like(o)), \
                replace_outputs(s.model, out_pts, bias_only), s.ff.frozen():
            getattr(s.model, "base_model", s.model)(s.ids)
        runs[mode] = {L: final[0][0], **{l: ins[l][0] for l in range(L)}}
    rows_t = torch.tensor([t[0] for t in targets], dtype=torch.long)
    layer_t = torch.tensor([t[1] for t in targets], dtype=torch.long)
    pos_t = torch.tensor([t[2] for t in targets], dtype=torch.long)
    vec_t = torch.stack([t[3] for t in targets]).to(tc.dtype)
    feat_t = torch.tensor([t[4] for t in targets], dtype=torch.long)
    out = {mode: torch.zeros(n_nodes, dtype=torch.float32) for mode in runs}
    with torch.no_grad():
        for mode, r in runs.items():
            for layer in layer_t.unique().tolist():  # one vectorised dot product per source layer
                m = layer_t == layer
                v = (r[layer][pos_t[m]].to(s.acc) * vec_t[m].to(s.acc)).sum(-1)
                if layer < L:
                    v = v + tc.b_enc[layer].detach()[feat_t[m]]
                out[mode][rows_t[m]] = v.float()
    return out["values"], out["constants"]


def check_counts(max_logits: int, batch_size: int, max_feature_nodes: int | None) -> None:
    """Attribution's whole-number options (0 or a negative number would give an empty or broken graph)."""
    for name, count in (("max_logits", max_logits), ("batch_size", batch_size), ("max_feature_nodes", max_feature_nodes)):
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ConfigError(f"{name} must be a whole number of at least 1, not {count!r}")


def attribute(
    model: nn.Module,
    transcoder: Transcoder,
    input_ids: torch.Tensor,
    *,
    max_logits: int = 10,
    logit_cumulative: float = 0.95,
    batch_size: int = 64,
    zero_bos: bool = True,
    max_memory_bytes: int | None = None,
    custom_targets: list[Target] | None = None,
    progress: bool = False,
    max_feature_nodes: int | None = None,
) -> Graph:
    """Exact attribution graph of `input_ids` ([T] or [1, T]) over all active features.

    With `max_feature_nodes`, only that many features become nodes: logit rows are computed first,
    then feature rows in order of estimated influence on the logits, re-estimated after every batch
    (as circuit-tracer does). Effects of the features left out are reported per row in
    `graph.dropped`, so value = sum(edges) + constant + dropped still holds exactly.

    Output nodes are the top logits (up to `logit_cumulative` probability, at most `max_logits`),
    or `custom_targets` (see `clt_hub.attribution.targets`) when given.

    Graphs whose dense adjacency would not fit in `max_memory_bytes` (default: half the machine's
    memory) are refused up front with the estimate, instead of failing with an out-of-memory."""
    check_counts(max_logits, batch_size, max_feature_nodes)
    check_compatible(model, transcoder)
    ids = input_ids.reshape(1, -1)
    check_prompt(model, ids)
    clock = {"start": time.perf_counter()}
    s = _record_forward(model, transcoder, ids, zero_bos)
    _plan_memory(s, max_logits, max_feature_nodes, max_memory_bytes)
    tokens, directions, target_weights = output_targets(model, s.logits, custom_targets, max_logits,
                                                        logit_cumulative, transcoder.dtype)
    k = len(s.features)
    n_feature_rows = k if max_feature_nodes is None else max(0, min(k, max_feature_nodes))
    rows = _Rows(s, len(tokens), n_feature_rows, progress)
    logit_rows = [(k + rows.n_err + s.T + j, s.L, s.T - 1, directions[j], tok) for j, tok in enumerate(tokens.tolist())]
    clock["setup"] = time.perf_counter()

    full = _Retained(s, s.T, batch_size)
    for start in range(0, len(logit_rows), batch_size):
        rows.compute(full, logit_rows[start:start + batch_size])
    if rows.in_place:
        _feature_rows(s, rows, full, batch_size)
    else:
        weights = target_weights.float()
        while len(rows.row_of) - len(logit_rows) < n_feature_rows:
            est = rows.estimated_feature_influence(logit_rows, weights)
            todo = [i for i in est.argsort(descending=True).tolist() if i not in rows.row_of]
            take = min(batch_size, n_feature_rows - (len(rows.row_of) - len(logit_rows)), len(todo))
            rows.compute(full, [_feature_row(s, i) for i in todo[:take]])
    del full
    rows.bar.close()
    clock["rows"] = time.perf_counter()

    adjacency, dropped, selected, new_index = rows.adjacency()
    targets = [(new_index[t[0]], *t[1:]) for t in rows.targets]
    values, constants = _values_and_constants(s, targets, len(adjacency))  # type: ignore[arg-type]
    clock["end"] = time.perf_counter()
    timings = {"forward_and_encode_s": clock["setup"] - clock["start"], "rows_s": clock["rows"] - clock["setup"],
               "values_and_constants_s": clock["end"] - clock["rows"], "active_features": k,
               "backward_passes": rows.passes}
    return Graph(input_ids=ids[0], features=s.features[selected], activations=s.feat_acts[selected].float(),
                 logit_tokens=tokens, logit_probabilities=target_weights, adjacency=adjacency, values=values,
                 constants=constants, n_layers=s.L, n_pos=s.T, dropped=dropped, meta={"timings": timings})
