"""Attribution graphs on the local replacement model (Ameisen et al. 2025).

With attention patterns and norm denominators frozen (clt_hub.frozen) and every MLP output pinned
to a constant, the map from MLP outputs and token embeddings to any later encoder pre-activation
or logit is linear. One backward pass per batch of targets gives the gradient at every layer's
MLP-output point; contracting it with `activation * decoder vector` (features), error vectors and
embeddings gives all incoming edges of those targets at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from clt_hub.adapters import Side, adapter_for, get_module
from clt_hub.errors import ConfigError
from clt_hub.frozen import FrozenForward
from clt_hub.transcoder import Transcoder


@dataclass(frozen=True)
class Target:
    """A custom output to attribute: `direction` . (final-norm output at the last position).

    `token` is the vocabulary id for single-token targets, -1 otherwise; `weight` is its share in
    pruning and scores (default: equal shares)."""

    label: str
    direction: torch.Tensor
    token: int = -1
    weight: float | None = None


def token_target(model: nn.Module, token: int, label: str | None = None) -> Target:
    W_U = _unembedding(model)
    _check_token(model, token)
    return Target(label or f"token {token}", (W_U[token] - W_U.mean(0)).detach(), token)


def logit_difference_target(model: nn.Module, token: int, minus: int | Sequence[int], label: str | None = None
                            ) -> Target:
    """E.g. ' Austin' minus ' Dallas': which nodes push the model toward one answer over the other.
    With several `minus` tokens, their mean logit is subtracted (one answer against its rivals)."""
    W_U = _unembedding(model)
    rivals = [minus] if isinstance(minus, int) else list(minus)
    if not rivals:
        raise ConfigError("logit_difference_target needs at least one token to subtract")
    for t in [token, *rivals]:
        _check_token(model, t)
    return Target(label or f"{token} - {minus}", (W_U[token] - W_U[rivals].mean(0)).detach())


def _unembedding(model: nn.Module) -> torch.Tensor:
    return get_module(model, adapter_for(model).unembed).weight.detach()  # type: ignore[operator]


def _check_token(model: nn.Module, token: int) -> None:
    vocab = _unembedding(model).shape[0]
    if not 0 <= token < vocab:
        raise ConfigError(f"target token id {token} is not in the vocabulary (0..{vocab - 1})")


@dataclass
class Graph:
    """Dense adjacency over nodes [features | errors | tokens | logits]; rows are targets.

    adjacency[i, j] is the direct effect of node j on node i. Features are (layer, pos, feature);
    errors are (layer, pos) flattened layer-major; tokens are positions; logits are token ids at the
    last position. `constants[i]` is what row i's value is made of besides its edges (biases,
    positional embeddings): value = sum(adjacency[i]) + constants[i]."""

    input_ids: torch.Tensor
    features: torch.Tensor           # [n_features, 3] (layer, pos, feature id)
    activations: torch.Tensor        # [n_features]
    logit_tokens: torch.Tensor       # [n_logits]
    logit_probabilities: torch.Tensor  # [n_logits]
    adjacency: torch.Tensor          # [n_nodes, n_nodes]
    values: torch.Tensor             # [n_nodes]: pre-activation of features, logit of logits, 0 otherwise
    constants: torch.Tensor          # [n_nodes]
    n_layers: int
    n_pos: int
    dropped: torch.Tensor | None = None  # [n_nodes] effect of features left out by max_feature_nodes
    meta: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + i


def _points(model: nn.Module, hook: str, n_layers: int) -> list[tuple[str, Side]]:
    adapter = adapter_for(model)
    module, side = adapter.hook_point(hook)
    return [(f"{adapter.layers}.{l}.{module}", side) for l in range(n_layers)]


def _check_compatible(model: nn.Module, tc: Transcoder) -> None:
    adapter = adapter_for(model)
    n = adapter.n_layers(model)
    d = model.config.hidden_size  # type: ignore[union-attr]
    if (tc.n_layers, tc.d_model) != (n, d):
        raise ConfigError(f"transcoder has n_layers={tc.n_layers}, d_model={tc.d_model} but the model has "
                          f"{n} layers and hidden size {d}; use a transcoder trained for this model")


def _trunk(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (ends at the final norm), where available."""
    return getattr(model, "base_model", model)


def _context_length(model: nn.Module) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def _physical_memory() -> int:
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _check_prompt(model: nn.Module, ids: torch.Tensor) -> None:
    if ids.numel() == 0:
        raise ConfigError("the prompt is empty; give at least one token")
    limit = _context_length(model)
    if limit is not None and ids.shape[-1] > limit:
        raise ConfigError(f"the prompt has {ids.shape[-1]} tokens but the model's context is {limit}; "
                          "shorten the prompt")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConfigError(f"token ids must be in 0..{vocab - 1}; was the prompt tokenized for another model?")


def _estimated_feature_influence(rows: torch.Tensor, row_of: dict[int, int], logit_targets: list,
                                 logit_weights: torch.Tensor, k: int) -> torch.Tensor:
    """Influence on the logits of every feature, from the rows computed so far (A + A^2 + ...)."""
    a = rows.abs()
    a = a / a.sum(1, keepdim=True).clamp(min=1e-10)
    row_nodes = torch.tensor(list(row_of), dtype=torch.long)  # node index of each computed row
    current = torch.zeros(len(row_of))
    for j, t in enumerate(logit_targets):
        current[row_of[t[0]]] = logit_weights[j]
    total = torch.zeros(a.shape[1])
    for _ in range(len(row_of) + 1):
        contribution = current @ a           # influence on every node
        total += contribution
        current = contribution[row_nodes]    # propagate only through nodes whose rows we know
        if not bool(current.any()):
            break
    return total[:k]


# features are traced in this many position groups, each sharing one forward on its prompt prefix
POSITION_GROUPS = 8


def _zeros_like_input(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Stand-in MLP forward while its output is overwritten anyway (saves most of the forward)."""
    return torch.zeros_like(x)


def select_logits(probs: torch.Tensor, max_logits: int = 10, cumulative: float = 0.95) -> torch.Tensor:
    """Most likely tokens until `cumulative` probability is covered, at most `max_logits`."""
    p, idx = probs.sort(descending=True)
    n = int((p.cumsum(0) < cumulative).sum().item()) + 1
    return idx[: min(n, max_logits)]


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
    or `custom_targets` (see `token_target`, `logit_difference_target`) when given.

    Graphs whose dense adjacency would not fit in `max_memory_bytes` (default: half the machine's
    memory) are refused up front with the estimate, instead of failing with an out-of-memory."""
    _check_compatible(model, transcoder)
    ids = input_ids.reshape(1, -1)
    _check_prompt(model, ids)
    T = ids.shape[1]
    adapter = adapter_for(model)
    L = transcoder.n_layers
    cfg = transcoder.cfg
    in_points = _points(model, cfg.feature_input_hook, L)
    out_points = _points(model, cfg.feature_output_hook, L)
    ff = FrozenForward(model, adapter)
    dtype = transcoder.dtype
    acc = torch.promote_types(dtype, torch.float32)  # edges are accumulated in at least float32

    import time

    clock = {"start": time.perf_counter()}
    # 1. real forward: record frozen quantities, transcoder inputs and true MLP outputs
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for l, ((pin, sin), (pout, sout)) in enumerate(zip(in_points, out_points, strict=True)):
        for name, path, side in ((f"in{l}", pin, sin), (f"out{l}", pout, sout)):
            module = get_module(model, path)
            if side == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, n=name: captured.__setitem__(n, a[0].detach())))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, a, o, n=name: captured.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad(), ff.recording():
            logits = model(ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    x = torch.stack([captured[f"in{l}"][0] for l in range(L)], dim=1).to(dtype)    # [T, L, d]
    y = torch.stack([captured[f"out{l}"][0] for l in range(L)], dim=1).to(dtype)   # [T, L, d]

    with torch.no_grad():
        pre = torch.stack([transcoder.pre_activations(x[:, l], l) for l in range(L)], dim=1)  # [T, L, F]
        acts = torch.stack([transcoder.activate(pre[:, l], l) for l in range(L)], dim=1)
        if zero_bos:
            acts[0] = 0  # BOS features are huge and uninformative; the error node at position 0 absorbs them
        recon = transcoder.decode(acts, x if cfg.skip else None)
        errors = y - recon
    pos_l_f = acts.nonzero()  # [k, 3] (pos, layer, feature)
    order = torch.argsort(pos_l_f[:, 1] * T * transcoder.d_sae + pos_l_f[:, 0] * transcoder.d_sae + pos_l_f[:, 2])
    pos_l_f = pos_l_f[order]
    features = pos_l_f[:, [1, 0, 2]]  # (layer, pos, feature)
    feat_acts = acts[pos_l_f[:, 0], pos_l_f[:, 1], pos_l_f[:, 2]]
    k = len(features)
    n_nodes_planned = k + (transcoder.n_layers + 1) * T + max_logits
    n_rows_planned = (k if max_feature_nodes is None else min(k, max_feature_nodes)) + max_logits
    final_nodes = n_rows_planned + (transcoder.n_layers + 1) * T
    per_layer = torch.bincount(features[:, 0], minlength=L).tolist()  # active features per source layer
    decoder_bytes = sum(n * transcoder.cfg.n_targets(l) * transcoder.d_model for l, n in enumerate(per_layer))
    all_rows = max_feature_nodes is None or max_feature_nodes >= k  # rows written in place: one matrix
    matrices = n_nodes_planned**2 if all_rows else n_rows_planned * n_nodes_planned + final_nodes**2
    need = 4 * matrices + decoder_bytes * transcoder.dtype.itemsize
    budget = max_memory_bytes if max_memory_bytes is not None else _physical_memory() // 2
    if need > budget:
        raise ConfigError(
            f"this graph has {k} active features and {n_nodes_planned} nodes; its adjacency and the active "
            f"features' decoder vectors need about "
            f"{need / 2**30:.1f} GiB, more than the {budget / 2**30:.1f} GiB allowed. Use a shorter prompt "
            "or raise max_memory_bytes"
        )

    probs = torch.softmax(logits.float(), -1)
    if custom_targets:
        tokens = torch.tensor([t.token for t in custom_targets], dtype=torch.long)
        directions = torch.stack([t.direction for t in custom_targets]).to(dtype)
        given = [t.weight for t in custom_targets]
        target_weights = torch.tensor([w if w is not None else 1.0 / len(given) for w in given])
    else:
        tokens = select_logits(probs, max_logits, logit_cumulative)
        W_U = _unembedding(model)
        directions = (W_U[tokens] - W_U.mean(0)).to(dtype)          # demeaned unembedding rows
        target_weights = probs[tokens]

    # 2. target list: every active feature (its encoder row) and every logit direction
    n_err, n_tok = L * T, T
    n_nodes = k + n_err + n_tok + len(tokens)
    budget_features = k if max_feature_nodes is None else max(0, min(k, max_feature_nodes))
    n_rows = budget_features + len(tokens)
    # every feature gets a row: store rows at their node index, so the buffer *is* the adjacency;
    # otherwise one buffer row per computed target, in computation order
    in_place = budget_features == k
    row_adj = torch.zeros(n_nodes if in_place else n_rows, n_nodes, dtype=torch.float32)
    row_of: dict[int, int] = {}
    targets: list[tuple[int, int, int, torch.Tensor, int]] = []  # (node, layer or L for logits, pos, vector, -)
    feature_target = {i: (i, l, p, transcoder.W_enc[l][f].detach(), f) for i, (l, p, f) in enumerate(features.tolist())}
    final_pos = T - 1
    logit_targets = [(k + n_err + n_tok + j, L, final_pos, directions[j], tok) for j, tok in enumerate(tokens.tolist())]

    # decoder rows of active features, scaled by activation, in blocks of one (source layer, position):
    # an edge block is then one matmul of the gradient at that position with the block's rows
    blocks = []
    for l in range(L):
        sel = (features[:, 0] == l).nonzero().squeeze(-1)
        if not sel.numel():
            continue
        rows = transcoder.decoder_rows(l, features[sel, 2]).detach().to(acc) * feat_acts[sel, None, None].to(acc)
        rows = rows.reshape(len(sel), -1)  # [k_l, n_targets * d]
        positions = features[sel, 1]
        for p in positions.unique().tolist():
            at = (positions == p).nonzero().squeeze(-1)
            block = sel[at]  # contiguous: features are sorted by (layer, position)
            blocks.append((l, p, int(block[0]), int(block[-1]) + 1, rows[at]))

    embed = get_module(model, adapter.embed)
    final_norm = get_module(model, adapter.final_norm)
    B = batch_size

    class _Retained:
        """One frozen forward on the prompt's first P tokens, repeated B times, kept for many backwards.

        Every value in the frozen model is the same for each copy; the copies exist so that one
        backward gives B independent gradients. Causality lets a target at position p use any
        prefix longer than p, so targets are grouped by position and each group shares one forward."""

        def __init__(self, P: int):
            self.P = P
            self.leaves: dict[str, torch.Tensor] = {}
            self.inputs: dict[int, torch.Tensor] = {}
            self.final: torch.Tensor | None = None
            hooks = []

            def embed_hook(m: nn.Module, a: tuple, o: torch.Tensor) -> torch.Tensor:
                leaf = o.detach().expand(B, -1, -1).clone().requires_grad_(True)
                self.leaves["emb"] = leaf
                return leaf

            hooks.append(embed.register_forward_hook(embed_hook))
            for l, (pout, _) in enumerate(out_points):
                def out_hook(m: nn.Module, a: tuple, o: torch.Tensor, l: int = l) -> torch.Tensor:
                    leaf = torch.zeros(B, P, transcoder.d_model, dtype=o.dtype, requires_grad=True)
                    self.leaves[f"out{l}"] = leaf
                    base = y[:P, l].to(o.dtype)
                    if cfg.skip:  # the skip path is linear: let gradients through it
                        s = transcoder.skip(self.inputs[l].to(dtype), l).to(o.dtype)
                        return base - s.detach() + s + leaf
                    return base + leaf
                hooks.append(get_module(model, pout).register_forward_hook(out_hook))
            for l, (pin, sin) in enumerate(in_points):
                module = get_module(model, pin)
                if sin == "input":
                    hooks.append(module.register_forward_pre_hook(lambda m, a, l=l: self.inputs.__setitem__(l, a[0])))
                else:
                    hooks.append(module.register_forward_hook(
                        lambda m, a, o, l=l: self.inputs.__setitem__(l, o[0] if isinstance(o, tuple) else o)))
            hooks.append(final_norm.register_forward_hook(lambda m, a, o: setattr(self, "final", o)))
            # every MLP output is replaced by its pinned value + a leaf: don't compute the MLPs
            mlps = [get_module(model, f"{adapter.layers}.{l}.{adapter.mlp}") for l in range(L)]
            for mlp in mlps:
                mlp.forward = _zeros_like_input  # type: ignore[method-assign]
            try:
                with ff.frozen(), torch.enable_grad():
                    _trunk(model)(ids[:, :P].expand(B, -1))  # the unembedding is not needed for gradients
            finally:
                for h in hooks:
                    h.remove()
                for mlp in mlps:
                    del mlp.forward

        def gradients(self, batch: list) -> tuple[torch.Tensor, ...]:
            """d(target)/d(embeddings, MLP outputs below the batch's deepest layer).

            Autograd walks only the part of the graph below the layers the targets read."""
            deepest = max(t[1] for t in batch)
            seeds: dict[int, torch.Tensor] = {}
            for b, (_, layer, pos, vec, _) in enumerate(batch):
                src = self.final if layer == L else self.inputs[layer]
                assert src is not None
                if layer not in seeds:
                    seeds[layer] = torch.zeros(src.shape, dtype=src.dtype)
                seeds[layer][b, pos] = vec.to(src.dtype)
            outputs = [self.final if layer == L else self.inputs[layer] for layer in seeds]
            wrt = [self.leaves["emb"]] + [self.leaves[f"out{l}"] for l in range(min(deepest, L))]
            with torch.enable_grad():
                return torch.autograd.grad(outputs, wrt, list(seeds.values()), retain_graph=True,  # type: ignore[arg-type]
                                           allow_unused=True)

    from tqdm.auto import tqdm

    clock["setup"] = time.perf_counter()
    bar = tqdm(total=n_rows, desc="attribution", unit="target", disable=not progress)
    emb_out = embed(ids)[0].detach()

    passes: list[int] = []

    def compute(run: _Retained, batch: list[tuple[int, int, int, torch.Tensor, int]]) -> None:
        n = len(batch)
        P = run.P
        grads = [g[:n] if g is not None else None for g in run.gradients(batch)]
        passes.append(P)
        bar.update(n)
        g_emb = grads[0]
        assert g_emb is not None
        B = n
        g_out = torch.zeros(B, P, L, transcoder.d_model, dtype=acc)  # layers at or above the deepest: 0
        for l, gr in enumerate(grads[1:]):
            if gr is not None:
                g_out[:, :, l] = gr
        for t in batch:
            row_of[t[0]] = t[0] if in_place else len(row_of)
            targets.append(t)
        rows_idx = torch.tensor([row_of[t[0]] for t in batch])
        deepest = max(t[1] for t in batch)
        for l, p, start, stop, scaled in blocks:  # feature -> target edges
            if p >= P or l >= deepest:
                continue  # later positions and same-or-deeper layers cannot reach these targets
            n_t = scaled.shape[1] // transcoder.d_model
            grad_at = g_out[:, p, l:l + n_t].reshape(B, -1)  # [B, n_t * d]
            row_adj[rows_idx, start:stop] = (grad_at @ scaled.T).float()
        err_edges = torch.zeros(B, L, T, dtype=acc)
        err_edges[:, :, :P] = torch.einsum("btld,tld->blt", g_out, errors[:P].to(acc))
        row_adj[rows_idx, k:k + n_err] = err_edges.reshape(B, n_err).float()
        row_adj[rows_idx, k + n_err:k + n_err + P] = torch.einsum(
            "btd,td->bt", g_emb.to(acc), emb_out[:P].to(acc)).float()

    full = _Retained(T)
    for start in range(0, len(logit_targets), batch_size):
        compute(full, logit_targets[start:start + batch_size])
    if budget_features == k:
        # features in position groups, each with one shared forward on its prefix; inside a group,
        # by layer, so each backward stops at its batch's layer
        n_groups = min(T, POSITION_GROUPS)
        bounds = [round(T * (g + 1) / n_groups) for g in range(n_groups)]
        lo = 0
        for hi in bounds:
            in_group = ((features[:, 1] >= lo) & (features[:, 1] < hi)).nonzero().squeeze(-1)
            lo = hi
            if not in_group.numel():
                continue
            run = full if hi == T else _Retained(hi)
            ordered = in_group[torch.argsort(features[in_group, 0] * T + features[in_group, 1], stable=True)].tolist()
            for start in range(0, len(ordered), batch_size):
                compute(run, [feature_target[i] for i in ordered[start:start + batch_size]])
            del run
    else:
        logit_w = target_weights.float()
        while len(row_of) - len(logit_targets) < budget_features:
            est = _estimated_feature_influence(row_adj[: len(row_of)], row_of, logit_targets, logit_w, k)
            todo = [i for i in est.argsort(descending=True).tolist() if i not in row_of]
            take = min(batch_size, budget_features - (len(row_of) - len(logit_targets)), len(todo))
            compute(full, [feature_target[i] for i in todo[:take]])
    del full
    bar.close()

    clock["rows"] = time.perf_counter()
    # square adjacency over the selected features + errors + tokens + logits
    selected = sorted(i for i in row_of if i < k)
    keep = torch.tensor(selected + list(range(k, n_nodes)), dtype=torch.long)
    new_index = {int(old): new for new, old in enumerate(keep.tolist())}
    n_final = len(keep)
    dropped = torch.zeros(n_final, dtype=torch.float32)
    left_out = torch.ones(k, dtype=torch.bool)
    left_out[selected] = False
    if in_place:
        adjacency = row_adj  # all nodes kept, rows already at their node index: no copy
    else:
        adjacency = torch.zeros(n_final, n_final, dtype=torch.float32)
        dest = torch.tensor([new_index[node] for node in row_of], dtype=torch.long)
        computed = row_adj[: len(row_of)]
        adjacency[dest] = computed[:, keep]
        dropped[dest] = computed[:, :k][:, left_out].sum(1)
    targets = [(new_index[t[0]], *t[1:]) for t in targets]
    features, feat_acts = features[selected], feat_acts[selected]
    values = torch.zeros(n_final, dtype=torch.float32)
    constants = torch.zeros(n_final, dtype=torch.float32)

    # values of logit nodes (pre-softcap, demeaned direction), and every target's constant part:
    # the same frozen linear model run with all sources (embeddings, MLP outputs) set to zero
    runs: dict[str, dict[str, torch.Tensor]] = {}
    for mode in ("values", "constants"):
        store: dict[str, torch.Tensor] = {}
        ins: dict[int, torch.Tensor] = {}
        hooks = [final_norm.register_forward_hook(lambda m, a, o, st=store: st.__setitem__("h", o))]
        for l, (pin, sin) in enumerate(in_points):
            module = get_module(model, pin)
            if sin == "input":
                hooks.append(module.register_forward_pre_hook(lambda m, a, l=l, d=ins: d.__setitem__(l, a[0])))
            else:
                hooks.append(module.register_forward_hook(
                    lambda m, a, o, l=l, d=ins: d.__setitem__(l, o[0] if isinstance(o, tuple) else o)))
        if mode == "constants":
            hooks.append(embed.register_forward_hook(lambda m, a, o: torch.zeros_like(o)))
            for l, (pout, _) in enumerate(out_points):
                def zero_out(m: nn.Module, a: tuple, o: torch.Tensor, l: int = l, d: dict = ins) -> torch.Tensor:
                    # no feature or error output, only the decoder bias (and the linear skip path)
                    out = transcoder.b_dec[l].detach().to(o.dtype).expand_as(o)
                    return out + transcoder.skip(d[l].to(dtype), l).to(o.dtype) if cfg.skip else out
                hooks.append(get_module(model, pout).register_forward_hook(zero_out))
        try:
            with torch.no_grad(), ff.frozen():
                _trunk(model)(ids)
        finally:
            for h in hooks:
                h.remove()
        runs[mode] = {"final": store["h"][0], **{f"in{l}": ins[l][0] for l in range(L)}}
    rows_t = torch.tensor([t[0] for t in targets], dtype=torch.long)
    layer_t = torch.tensor([t[1] for t in targets], dtype=torch.long)
    pos_t = torch.tensor([t[2] for t in targets], dtype=torch.long)
    vec_t = torch.stack([t[3] for t in targets]).to(dtype)
    feat_t = torch.tensor([t[4] for t in targets], dtype=torch.long)
    for mode, out in (("values", values), ("constants", constants)):
        r = runs[mode]
        with torch.no_grad():
            for layer in layer_t.unique().tolist():  # one vectorised dot product per source layer
                m = layer_t == layer
                src = r["final"] if layer == L else r[f"in{layer}"]
                v = (src[pos_t[m]].to(acc) * vec_t[m].to(acc)).sum(-1)
                if layer < L:
                    v = v + transcoder.b_enc[layer].detach()[feat_t[m]]
                out[rows_t[m]] = v.float()
    clock["end"] = time.perf_counter()
    timings = {"forward_and_encode_s": clock["setup"] - clock["start"], "rows_s": clock["rows"] - clock["setup"],
               "values_and_constants_s": clock["end"] - clock["rows"], "active_features": k,
               "backward_passes": len(passes)}
    return Graph(input_ids=ids[0], features=features, activations=feat_acts.float(), logit_tokens=tokens,
                 logit_probabilities=target_weights, adjacency=adjacency, values=values, constants=constants,
                 n_layers=L, n_pos=T, dropped=dropped, meta={"timings": timings})
