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

import inspect
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from clt_hub.attribution.graph import Graph
from clt_hub.attribution.options import TraceOptions, check_counts
from clt_hub.attribution.targets import Target, output_targets
from clt_hub.distributed import agree_min, all_reduce, rank_world
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.frozen import FrozenForward, pattern_rows
from clt_hub.models.hooks import (
    Point,
    mlp_points,
    not_computed,
    on_points,
    record,
    replace_outputs,
    weights_constant,
)
from clt_hub.models.loading import check_compatible, check_prompt
from clt_hub.transcoders.transcoder import Transcoder

# features are traced in up to this many position groups, each sharing one forward on its prompt prefix,
# of at least this many positions each (a short prompt is one group: a forward costs more than it saves)
POSITION_GROUPS = 8
MIN_GROUP_POSITIONS = 32
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
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad(), ff.recording(), record(model, in_points, xs), record(model, out_points, ys):
        logits = model(ids, **keep_last).logits[0, -1]  # the LM head on the last position only
    L, dtype = tc.n_layers, tc.dtype
    x = torch.stack([xs.pop(l)[0] for l in range(L)], dim=1).to(dtype)    # [T, L, d]
    y = torch.stack([ys.pop(l)[0] for l in range(L)], dim=1).to(dtype)    # [T, L, d]
    with torch.no_grad():
        acts = torch.empty(x.shape[0], L, tc.d_sae, dtype=dtype)  # [T, L, F], filled a layer at a time (no 2nd copy)
        for l in range(L):
            acts[:, l] = tc.encode_layer(x[:, l], l)
        if zero_bos:
            acts[0] = 0  # BOS features are huge and uninformative; the error node at position 0 absorbs them
        errors = y - tc.decode(acts, x if tc.cfg.skip else None)
    T = ids.shape[1]
    pos_l_f = acts.nonzero()  # [k, 3] (pos, layer, feature)
    order = torch.argsort(pos_l_f[:, 1] * T * tc.d_sae + pos_l_f[:, 0] * tc.d_sae + pos_l_f[:, 2])
    pos_l_f = pos_l_f[order]
    return _Setup(model, tc, ids, ff, in_points, out_points, y, errors, features=pos_l_f[:, [1, 0, 2]],
                  feat_acts=acts[pos_l_f[:, 0], pos_l_f[:, 1], pos_l_f[:, 2]], logits=logits)


def _give_back_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps freed blocks of up to 32 MB in its arenas): the
    recording pass's transients would otherwise stay in the resident set under the rows and gradients that
    follow, about 0.6 GB at 2,048 tokens. A no-op where there is no glibc."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


@dataclass
class _Plan:
    """How attribution fits its memory budget: the seeds per backward pass, and whether the active
    features' scaled decoder rows are held for all passes or gathered again in each one."""

    batch: int
    hold_decoders: bool
    need: int  # estimated peak bytes


def _plan_memory(s: _Setup, n_logits: int, n_feature_rows: int, batch_size: int,
                 max_memory_bytes: int | None) -> _Plan:
    """Pick the largest batch (at most `batch_size`) and decoder storage that fit the budget, or refuse up
    front with the estimate and the knob to turn. The terms: the rows being computed (one per target, a
    column per node), the gradients of one backward pass (a [T, d] tensor per layer and seed), the retained
    frozen forward, one layer's attention pattern recomputed in the backward pass ([heads, T, T], a few
    temporaries), and the decoder rows of the active features."""
    tc, k, T, L, d = s.tc, len(s.features), s.T, s.L, s.tc.d_model
    acc = torch.finfo(s.acc).bits // 8
    n_nodes = k + (L + 1) * T + n_logits
    n_rows = n_feature_rows + n_logits
    final_nodes = n_feature_rows + (L + 1) * T + n_logits
    world = rank_world()[1]

    def rows_bytes(batch: int) -> int:  # the rows this rank holds, and the final graph's copy when one is made
        copy = n_feature_rows < k or world > 1
        return 4 * _rows_held(n_rows, batch, world) * n_nodes + (4 * n_rows * final_nodes if copy else 0)

    rows = rows_bytes(batch_size)
    per_layer = torch.bincount(s.features[:, 0], minlength=L).tolist()  # active features per layer
    decoders = acc * sum(n * tc.cfg.n_targets(l) * d for l, n in enumerate(per_layer))
    # what the recorded pass keeps (true MLP outputs, errors, queries and keys) and the retained frozen forward with
    # its weights constant (the MLP-output leaves, transcoder inputs, a few saved activations per layer); measured on
    # GPT-2 small at 2,048 tokens: 384 + 157 MiB against this 576
    forward = 8 * T * L * d * acc
    heads = int(getattr(s.model.config, "num_attention_heads", 0) or getattr(s.model.config, "n_head", 0) or 1)
    attention = 4 * heads * min(T, pattern_rows(heads, T)) * T * acc  # one block of a recomputed pattern, temporaries
    # one seed's gradients at every layer, their copy gathered for the feature edges, and the backward pass's own
    # temporaries (measured on GPT-2 small at 2,048 tokens: 187 MiB per seed against this 180)
    per_seed = (2 * (L + 1) + 4) * T * d * acc
    allowed = max_memory_bytes if max_memory_bytes is not None else _physical_memory() // 2
    budget = int(allowed * (1 - PLAN_MARGIN))
    fixed = rows + forward + attention
    hold = fixed + decoders + per_seed <= budget and decoders <= budget * HOLD_DECODERS_FRACTION
    room = budget - fixed - (decoders if hold else 0)
    # targets per round: chosen as for one process whatever the world size, so the rounds (and under a node budget
    # the features chosen between them) are the same; a rank runs only its share of each round's seeds and keeps
    # only those rows. Ranks on machines of other sizes agree on the smallest batch, and hold the decoders only if
    # all can (holding or exchanging them per pass must be the same on every rank)
    batch, hold_all = agree_min([min(batch_size, max(1, room // per_seed)), int(hold)])
    hold = bool(hold_all)
    need = fixed - rows + rows_bytes(batch) + (decoders if hold else 0) + -(-batch // world) * per_seed
    if need > budget:
        biggest = max(("the rows (one per target, a column per node)", rows), ("the retained forward", forward),
                      ("one backward pass's gradients", per_seed), ("the attention pattern recomputed", attention),
                      key=lambda kv: kv[1])
        raise ConfigError(
            f"this graph has {k} active features, {n_rows} target rows and {n_nodes} nodes; its rows, gradients "
            f"and the active features' decoder vectors need about {_gib(need)} GiB, more than the {_gib(budget)} GiB "
            f"planned for ({1 - PLAN_MARGIN:.0%} of max_memory_bytes, {_gib(allowed)} GiB), most of it for "
            f"{biggest[0]} ({_gib(biggest[1])} GiB). Lower max_feature_nodes, trace a shorter prompt, or raise "
            "max_memory_bytes")
    return _Plan(int(batch), hold, int(need))


def _rows_held(n_rows: int, batch: int, world: int) -> int:
    """Rows one rank holds: all of them on one process; with several, its share of every round (at most
    ceil(round / world) each, so at most one row per round over an even split)."""
    if world == 1:
        return n_rows
    rounds = -(-n_rows // batch) + POSITION_GROUPS + 2
    return min(n_rows, -(-n_rows // world) + rounds)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g}"


def _layer_spans(s: _Setup) -> list[tuple[int, int]]:
    """[start, end) node range of each source layer's features (features are sorted by layer, position)."""
    counts = torch.bincount(s.features[:, 0], minlength=s.L).tolist()
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [(end - c, end) for c, end in zip(counts, ends, strict=True)]


def _scaled_decoders(s: _Setup, l: int, start: int, stop: int) -> torch.Tensor:
    """Decoder rows of features start..stop (all at source layer l) times their activations:
    [n, n_targets(l), d] in the accumulation dtype."""
    rows = s.tc.decoder_rows(l, s.features[start:stop, 2]).detach().to(s.acc)
    return rows * s.feat_acts[start:stop, None, None].to(s.acc)


class _Retained:
    """One frozen forward on the prompt's first P tokens, kept for many backwards.

    Each backward pass sends a batch of gradient seeds through it at once (is_grads_batched: the backward
    is vectorised over the seeds), so memory holds one copy of the prompt's forward, not one per seed.
    Causality lets a target at position p use any prefix longer than p, so targets are grouped by
    position and each group shares one forward on its prefix."""

    def __init__(self, s: _Setup, P: int):
        self.s, self.P = s, P
        self.leaves: dict[int, torch.Tensor] = {}      # MLP-output leaves by layer
        self.inputs: dict[int, torch.Tensor] = {}      # live transcoder inputs by layer
        self.final: dict[int, torch.Tensor] = {}       # live final-norm output
        adapter = adapter_for(s.model)
        tc = s.tc

        def embed(_: int, o: torch.Tensor) -> torch.Tensor:
            self.emb = o.detach().clone().requires_grad_(True)
            return self.emb

        def pin(l: int, o: torch.Tensor) -> torch.Tensor:
            leaf = torch.zeros(1, P, tc.d_model, dtype=o.dtype, requires_grad=True)
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
            getattr(s.model, "base_model", s.model)(s.ids[:, :P])  # no LM head needed

    def gradients(self, batch: Sequence[Row]) -> tuple[torch.Tensor | None, ...]:
        """d(target)/d(embeddings, MLP outputs below the batch's deepest layer), each [n, P, d]; autograd
        walks only the part of the graph below the layers the targets read."""
        L, n = self.s.L, len(batch)
        deepest = max(t[1] for t in batch)
        seeds: dict[int, torch.Tensor] = {}
        for b, (_, layer, pos, vec, _) in enumerate(batch):
            src = self.final[0] if layer == L else self.inputs[layer]
            if layer not in seeds:
                seeds[layer] = torch.zeros(n, *src.shape, dtype=src.dtype)
            seeds[layer][b, 0, pos] = vec.to(src.dtype)
        outputs = [self.final[0] if layer == L else self.inputs[layer] for layer in seeds]
        wrt = [self.emb] + [self.leaves[l] for l in range(min(deepest, L))]
        with torch.enable_grad():
            grads = torch.autograd.grad(outputs, wrt, list(seeds.values()), retain_graph=True,  # type: ignore[arg-type]
                                        allow_unused=True, is_grads_batched=True)
        return tuple(None if g is None else g[:, 0] for g in grads)


FEATURE_CHUNK = 1024  # features contracted at once (bounds the [n, chunk, d] gradient gather)
# The plan fills at most this much less than max_memory_bytes: its terms were calibrated on one machine (a 2,048-token
# graph peaked at 4,093 MiB for a 4 GiB budget) and another machine's allocator and kernels took 3% more (4,201 MiB)
PLAN_MARGIN = 0.10
HOLD_DECODERS_FRACTION = 0.25  # decoder rows are held for all passes when they take at most this of the budget
FINISH_CHUNK = 64  # rows gathered at a time when the final graph keeps only some features


class _Rows:
    """The rows computed so far: [target rows, every node's column]. When every feature gets a row, a
    feature's row sits at its node index and logit j's at n_features + j; otherwise rows are in computation
    order and `finish` puts the selected features' rows first."""

    def __init__(self, s: _Setup, n_logits: int, n_feature_rows: int, plan: _Plan, progress: bool):
        self.s, self.plan = s, plan
        k, T, L = len(s.features), s.T, s.L
        self.k, self.n_err, self.n_logits = k, L * T, n_logits
        self.n_nodes = k + L * T + T + n_logits
        self.in_place = n_feature_rows == k
        self.world = rank_world()[1]
        self.buffer = torch.zeros(_rows_held(n_feature_rows + n_logits, plan.batch, self.world), self.n_nodes)
        self.local_rows: list[int] = []  # the global row each local buffer row holds (several processes)
        self.row_of: dict[int, int] = {}
        self.targets: list[Row] = []
        self.passes = 0
        self.spans = _layer_spans(s)
        self.held: list[torch.Tensor] | None = None
        if plan.hold_decoders:
            self.held = []
            for l, (a, b) in enumerate(self.spans):
                with s.tc.decoder_rows_exchanged({l: s.features[a:b, 2]}):
                    self.held.append(_scaled_decoders(s, l, a, b))
        self.embeddings = get_module(s.model, adapter_for(s.model).embed)(s.ids)[0].detach()
        self.bar = tqdm(total=n_feature_rows + n_logits, desc="attribution", unit="target", disable=not progress)

    def _row(self, node: int) -> int:
        if not self.in_place:
            return len(self.row_of)
        return node if node < self.k else self.k + node - (self.n_nodes - self.n_logits)

    def compute(self, run: _Retained, batch: Sequence[Row]) -> None:
        """One round: the incoming edges of every target in `batch`. Under torch.distributed the targets are dealt
        round-robin over the ranks and each runs one backward pass over its share and keeps those rows; what the
        next round's choice needs from the others is reduced across ranks (`estimated_feature_influence`), so the
        graph does not depend on the world size."""
        rank, world = rank_world()
        for t in batch:
            self.row_of[t[0]] = self._row(t[0])
            self.targets.append(t)
        mine = list(batch[rank::world])
        if world == 1:
            local = torch.tensor([self.row_of[t[0]] for t in batch])
        else:
            used = len(self.local_rows)
            if used + len(mine) > len(self.buffer):  # past the bound (cannot happen by construction): grow
                self.buffer = torch.cat([self.buffer, torch.zeros(len(mine), self.n_nodes)])
            local = torch.arange(used, used + len(mine))
            self.local_rows += [self.row_of[t[0]] for t in mine]
        self._edges(run, mine, self.buffer, local, layers=min(max(t[1] for t in batch), self.s.L))
        self.passes += 1
        self.bar.update(len(batch))

    def _edges(self, run: _Retained, batch: Sequence[Row], out: torch.Tensor, rows: torch.Tensor, layers: int) -> None:
        """One backward pass: the incoming edges of the targets in `batch`, written to `out[rows]`. `layers`: the
        source layers below the round's deepest target, whose feature chunks every rank walks (see
        `_decoder_chunks`), with seeds this round or not."""
        s, n, P = self.s, len(batch), run.P
        if not batch:
            for _ in self._decoder_chunks(P, layers):
                pass
            return
        grads = run.gradients(batch)
        g_emb = grads[0]
        assert g_emb is not None
        by_layer = list(grads[1:])  # [n, P, d] per MLP-output layer below the deepest target, or None
        reach = len(by_layer)  # layers a feature can write to and still reach a target
        g_out = torch.zeros(n, P, reach, s.tc.d_model, dtype=s.acc)  # [n, P, layer, d]: one matmul per block
        for l, g in enumerate(by_layer):
            if g is not None:
                g_out[:, :, l] = g
        for l, c0, decoders in self._decoder_chunks(P, layers):  # feature -> target edges
            if l < reach and decoders is not None:  # same-or-deeper layers cannot reach these targets
                out[rows, c0:c0 + len(decoders)] = self._feature_edges(g_out, l, c0, decoders)
        k = self.k
        for l, g in enumerate(by_layer):  # error -> target edges
            if g is not None:
                cols = k + l * s.T
                out[rows, cols:cols + P] = (g.to(s.acc) * s.errors[:P, l].to(s.acc)).sum(-1).float()
        out[rows, k + self.n_err:k + self.n_err + P] = torch.einsum(
            "btd,td->bt", g_emb.to(s.acc), self.embeddings[:P].to(s.acc)).float()

    def _decoder_chunks(self, P: int, layers: int) -> Iterator[tuple[int, int, torch.Tensor | None]]:
        """(source layer, first feature, scaled decoder rows of the chunk's features before position P, or None
        where there are none) for every chunk of the first `layers` layers' features. Rows the plan does not hold
        are read per pass, which for sharded decoders is a collective: every rank walks the same chunks."""
        s = self.s
        for l, (start, stop) in enumerate(self.spans[:layers]):
            for c0 in range(start, stop, FEATURE_CHUNK):
                reach = int((s.features[c0:min(c0 + FEATURE_CHUNK, stop), 1] < P).sum())  # sorted by position
                if not reach:
                    yield l, c0, None
                elif self.held is not None:
                    yield l, c0, self.held[l][c0 - start:c0 - start + reach]
                else:
                    with s.tc.decoder_rows_exchanged({l: s.features[c0:c0 + reach, 2]}):
                        decoders = _scaled_decoders(s, l, c0, c0 + reach)
                    yield l, c0, decoders

    def _feature_edges(self, g_out: torch.Tensor, l: int, c0: int, decoders: torch.Tensor) -> torch.Tensor:
        """Edges from the features c0.. of `decoders` ([n_features, n_targets, d], source layer l) into the batch:
        activation x decoder rows . gradients, over every layer the features write to, as one matmul per position
        (features are sorted by position within a layer)."""
        n, f = g_out.shape[0], len(decoders)
        pos = self.s.features[c0:c0 + f, 1]
        m = min(decoders.shape[1], g_out.shape[2] - l)  # target layers that can still reach the batch
        flat = decoders[:, :m].reshape(f, -1)                                 # [f, m * d]
        out = torch.empty(n, f, dtype=g_out.dtype)
        at, counts = torch.unique_consecutive(pos, return_counts=True)
        a = 0
        for p, c in zip(at.tolist(), counts.tolist(), strict=True):
            out[:, a:a + c] = g_out[:, p, l:l + m].reshape(n, -1) @ flat[a:a + c].T
            a += c
        return out.float()

    @property
    def n_held(self) -> int:
        """Rows this process holds: all of them on one, its share under torch.distributed."""
        return len(self.local_rows) if self.world > 1 else len(self.buffer)

    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows this process holds, the global row index of each): every computed row on one process, the
        rows this rank computed on several."""
        if self.world > 1:
            return self.buffer[: len(self.local_rows)], torch.tensor(self.local_rows, dtype=torch.long)
        n = len(self.buffer) if self.in_place else len(self.row_of)
        return self.buffer[:n], torch.arange(n)

    def estimated_feature_influence(self, logit_rows: Sequence[Row], weights: torch.Tensor) -> torch.Tensor:
        """Influence on the logits of every feature, from the rows computed so far (normalised |rows|, read
        column block by column block, so the buffer is never copied whole). Every step is a sum over rows, so
        with the rows spread over ranks each rank sums its own and the sums are all-reduced."""
        local, ids = self._held()
        inverse = 1.0 / local.abs().sum(1).clamp(min=1e-10)
        start = torch.zeros(len(self.row_of))
        for j, t in enumerate(logit_rows):
            start[self.row_of[t[0]]] = weights[j]
        row_nodes = torch.tensor(list(self.row_of), dtype=torch.long)  # node index of each computed row
        # Paths run through computed rows only, so the series is summed on the small square of their
        # columns, and spread over all nodes by one pass over the buffer (not one pass per path length).
        among = local[:, row_nodes].abs()                            # [rows held here, every computed row]
        reached = torch.zeros(len(row_nodes))
        term = start
        for _ in range(len(self.row_of) + 1):
            reached += term
            term = all_reduce((term[ids] * inverse) @ among)
            if not bool(term.any()):
                break
        return all_reduce(_abs_matvec(reached[ids] * inverse, local))[: self.k]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[int, int]]:
        """(rows over the selected features + errors + tokens + logits, selected features first then logits;
        the left-out features' effect on each row; the selected feature indices; old node -> new node). With
        several ranks each fills the rows it holds and an all-reduce completes them (every other rank adds zeros),
        so every rank returns the whole graph, whose size the node budget bounds."""
        k = self.k
        selected = sorted(i for i in self.row_of if i < k)
        keep = torch.tensor(selected + list(range(k, self.n_nodes)), dtype=torch.long)
        new_index = {int(old): new for new, old in enumerate(keep.tolist())}
        kept = self.s.features[selected]  # their decoder rows stay readable for what reads the graph next (labels, QK)
        self.s.tc.prefetch_decoder_rows({l: kept[kept[:, 0] == l, 2] for l in range(self.s.L)})
        if self.in_place and self.world == 1:  # every feature kept, rows already in node order: no copy
            return self.buffer, torch.zeros(len(keep)), selected, new_index
        left_out = torch.ones(k, dtype=torch.bool)
        left_out[selected] = False
        left_out_ids = left_out.nonzero().flatten()
        order = sorted(self.row_of, key=lambda node: new_index[node])  # selected features, then logits
        final_row = {self.row_of[node]: i for i, node in enumerate(order)}
        local, ids = self._held()
        dst = torch.tensor([final_row[g] for g in ids.tolist()], dtype=torch.long)
        rows = torch.zeros(len(order), len(keep), dtype=self.buffer.dtype)
        left = torch.zeros(len(order), dtype=self.buffer.dtype)
        for c in range(0, len(local), FINISH_CHUNK):  # a few rows at a time: no full-width copy of the buffer
            part = local[c:c + FINISH_CHUNK]
            rows[dst[c:c + FINISH_CHUNK]] = part[:, keep]
            left[dst[c:c + FINISH_CHUNK]] = part[:, left_out_ids].sum(1)
        all_reduce(rows)
        all_reduce(left)
        dropped = torch.zeros(len(keep))
        dropped[torch.tensor([new_index[node] for node in order])] = left
        return rows, dropped, selected, new_index


def _abs_matvec(x: torch.Tensor, a: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
    """x @ |a|, a column block at a time (no full-size |a| copy)."""
    out = torch.empty(a.shape[1], dtype=a.dtype)
    for c in range(0, a.shape[1], block):
        out[c:c + block] = x @ a[:, c:c + block].abs()
    return out


def _feature_rows(s: _Setup, rows: _Rows, full: _Retained, batch: int) -> None:
    """Every feature's row, in position groups that each share one forward on their prefix; inside a
    group by layer, so each backward stops at its batch's layer."""
    T, features = s.T, s.features
    n_groups = max(1, min(POSITION_GROUPS, T // MIN_GROUP_POSITIONS))
    bounds = [round(T * (g + 1) / n_groups) for g in range(n_groups)]
    lo = 0
    for hi in bounds:
        in_group = ((features[:, 1] >= lo) & (features[:, 1] < hi)).nonzero().squeeze(-1)
        lo = hi
        if not in_group.numel():
            continue
        run = full if hi == T else _Retained(s, hi)
        ordered = in_group[torch.argsort(features[in_group, 0] * T + features[in_group, 1], stable=True)].tolist()
        for start in range(0, len(ordered), batch):
            rows.compute(run, [_feature_row(s, i) for i in ordered[start:start + batch]])
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


def _compute_rows(s: _Setup, rows: _Rows, logit_rows: list[Row], weights: torch.Tensor, n_feature_rows: int,
                  batch: int) -> None:
    """The logit rows, then the feature rows: all of them in node order, or under a budget the most influential
    first, influence re-estimated from the rows so far after every batch. One retained forward serves them."""
    full = _Retained(s, s.T)
    _give_back_freed_memory()
    for start in range(0, len(logit_rows), batch):
        rows.compute(full, logit_rows[start:start + batch])
    if rows.in_place:
        _feature_rows(s, rows, full, batch)
    else:
        while len(rows.row_of) - len(logit_rows) < n_feature_rows:
            est = rows.estimated_feature_influence(logit_rows, weights)
            todo = [i for i in est.argsort(descending=True).tolist() if i not in rows.row_of]
            take = min(batch, n_feature_rows - (len(rows.row_of) - len(logit_rows)), len(todo))
            rows.compute(full, [_feature_row(s, i) for i in todo[:take]])
    del full
    rows.bar.close()


def attribute(
    model: nn.Module,
    transcoder: Transcoder,
    input_ids: torch.Tensor,
    *,
    max_logits: int = TraceOptions.max_logits,
    logit_cumulative: float = TraceOptions.logit_cumulative,
    batch_size: int = TraceOptions.batch_size,
    zero_bos: bool = True,
    max_memory_bytes: int | None = None,
    custom_targets: list[Target] | None = None,
    progress: bool = False,
    max_feature_nodes: int | None = None,
) -> Graph:
    """Exact attribution graph of `input_ids` ([T] or [1, T]) over all active features.

    With `max_feature_nodes`, only that many features become nodes, the most influential on the logits (as
    circuit-tracer chooses them; see _compute_rows). Effects of the features left out are reported per row
    in `graph.dropped`, so value = sum(edges) + constant + dropped still holds exactly.

    Output nodes are the top logits (up to `logit_cumulative` probability, at most `max_logits`),
    or `custom_targets` (see `clt_hub.attribution.targets`) when given.

    Memory: the seeds of a backward pass share one retained forward; only features and logits get rows
    (a column per node; no square matrix is built); the active features' decoder rows are held when they
    fit a quarter of `max_memory_bytes` (default: half the machine's memory) and gathered per pass when not;
    the batch shrinks below `batch_size` when its gradients would not fit. A graph that cannot fit even so is
    refused up front with the estimate and the knob to turn, instead of failing with an out-of-memory."""
    check_counts(max_logits, batch_size, max_feature_nodes)
    check_compatible(model, transcoder)
    ids = input_ids.reshape(1, -1)
    check_prompt(model, ids)
    with weights_constant(model, transcoder):  # gradients flow to activations only
        clock = {"start": time.perf_counter()}
        s = _record_forward(model, transcoder, ids, zero_bos)
        _give_back_freed_memory()
        tokens, directions, target_weights = output_targets(model, s.logits, custom_targets, max_logits,
                                                            logit_cumulative, transcoder.dtype)
        k = len(s.features)
        n_feature_rows = k if max_feature_nodes is None else min(k, max_feature_nodes)
        plan = _plan_memory(s, len(tokens), n_feature_rows, batch_size, max_memory_bytes)
        rows = _Rows(s, len(tokens), n_feature_rows, plan, progress)
        logit_rows = [(k + rows.n_err + s.T + j, s.L, s.T - 1, directions[j], tok) for j, tok in enumerate(tokens.tolist())]
        clock["setup"] = time.perf_counter()

        _compute_rows(s, rows, logit_rows, target_weights.float(), n_feature_rows, plan.batch)
        clock["rows"] = time.perf_counter()

        edges, dropped, selected, new_index = rows.finish()
        targets = [(new_index[t[0]], *t[1:]) for t in rows.targets]
        n_final, counts = edges.shape[1], {"backward_passes": rows.passes, "rows_held": rows.n_held}
        del rows
        values, constants = _values_and_constants(s, targets, n_final)  # type: ignore[arg-type]
        clock["end"] = time.perf_counter()
        timings = {"forward_and_encode_s": clock["setup"] - clock["start"], "rows_s": clock["rows"] - clock["setup"],
                   "values_and_constants_s": clock["end"] - clock["rows"], "active_features": k, **counts,
                   "batch": plan.batch, "decoders_held": plan.hold_decoders, "estimated_peak_bytes": plan.need}
        return Graph(input_ids=ids[0], features=s.features[selected], activations=s.feat_acts[selected].float(),
                     logit_tokens=tokens, logit_probabilities=target_weights, rows=edges, values=values,
                     constants=constants, n_layers=s.L, n_pos=s.T, dropped=dropped, meta={"timings": timings})
