"""Interventions on transcoder features, in the two modes the paper uses.

- constrained: attention, norms and every other feature frozen; the intervened features' change
  reaches MLP outputs through their decoders (and, for a skip transcoder, through the linear skip
  paths of the layers it reaches). This is the linear model the graph describes, so the measured
  effect on any target equals the graph's edges.
- open: the local replacement model runs for real (transcoder in place of each MLP plus the
  original error vectors); downstream features respond; attention optionally frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from clt_hub.config import finite_number
from clt_hub.errors import ConfigError
from clt_hub.models.frozen import FrozenForward
from clt_hub.models.hooks import Anchor, mlp_points, record, replace_outputs, transcoder_in_place
from clt_hub.models.loading import check_compatible, check_prompt, context_length
from clt_hub.transcoders.transcoder import Transcoder


@dataclass(frozen=True)
class Intervention:
    """Set (`value`) or scale (`scale`) feature `feature` at (`layer`, `pos`); pos=None: every position."""

    layer: int
    feature: int
    pos: int | None = None
    value: float | None = None
    scale: float | None = None

    def apply(self, acts: torch.Tensor) -> None:
        """acts: [T, F] activations of this layer, changed in place."""
        where = slice(None) if self.pos is None else self.pos
        if self.value is not None:
            acts[where, self.feature] = self.value
        else:
            acts[where, self.feature] = acts[where, self.feature] * (1.0 if self.scale is None else self.scale)


@dataclass
class InterventionResult:
    logits: torch.Tensor        # [T, vocab]
    activations: torch.Tensor   # [T, n_layers, d_sae] after the intervention
    original_logits: torch.Tensor
    original_activations: torch.Tensor

    def top_tokens(self, k: int = 5, original: bool = False) -> list[tuple[int, float]]:
        probs = torch.softmax((self.original_logits if original else self.logits)[-1].float(), -1)
        p, idx = probs.topk(k)
        return list(zip(idx.tolist(), p.tolist(), strict=True))


def check_interventions(tc: Transcoder, interventions: Sequence[Intervention], T: int | None) -> None:
    """Each intervention names a layer and feature of `tc` and a position of a `T`-token prompt (T=None: not
    checked yet), and sets or scales by a finite number."""
    for iv in interventions:
        if not 0 <= iv.layer < tc.n_layers:
            raise ConfigError(f"intervention layer {iv.layer} out of range 0..{tc.n_layers - 1}")
        if not 0 <= iv.feature < tc.d_sae:
            raise ConfigError(f"feature index {iv.feature} out of range 0..{tc.d_sae - 1} at layer {iv.layer}")
        if T is not None and iv.pos is not None and not 0 <= iv.pos < T:
            raise ConfigError(f"position {iv.pos} out of range 0..{T - 1} for a {T}-token prompt")
        if (iv.value is None) == (iv.scale is None):
            raise ConfigError("an intervention sets exactly one of value= or scale=")
        amount = iv.value if iv.value is not None else iv.scale
        if not finite_number(amount):
            raise ConfigError(f"intervention on layer {iv.layer} feature {iv.feature} by {amount}: give a finite number")


def check_distinct(interventions: Sequence[Intervention]) -> None:
    """No feature at a position is given twice (what a user types: a second scale would multiply the first, a
    second value would silently replace it)."""
    seen: set[tuple[int, int, int | None]] = set()
    for iv in interventions:
        key = (iv.layer, iv.feature, iv.pos)
        if key in seen:
            where = "every position" if iv.pos is None else f"position {iv.pos}"
            raise ConfigError(f"layer {iv.layer} feature {iv.feature} at {where} is set or scaled twice; give each "
                              "feature (at each position) once")
        seen.add(key)


@dataclass
class _Recorded:
    """The real forward pass: MLP inputs by layer, inputs and outputs [T, L, d], the features' activations."""

    x: dict[int, torch.Tensor]
    xs: torch.Tensor
    ys: torch.Tensor
    acts: torch.Tensor
    logits: torch.Tensor


def _record(model: nn.Module, transcoder: Transcoder, ids: torch.Tensor, ff: FrozenForward) -> _Recorded:
    L, dtype = transcoder.n_layers, transcoder.dtype
    ins, outs = mlp_points(model, transcoder.cfg)
    x: dict[int, torch.Tensor] = {}
    y: dict[int, torch.Tensor] = {}
    with torch.no_grad(), ff.recording(), record(model, ins, x), record(model, outs, y):
        logits = model(ids).logits[0]
    xs = torch.stack([x[l][0] for l in range(L)], dim=1).to(dtype)
    ys = torch.stack([y[l][0] for l in range(L)], dim=1).to(dtype)
    with torch.no_grad():
        # encoded layer by layer on [1, T, d], exactly as the open-loop hooks will, so nothing differs by a bit
        acts = torch.stack([transcoder.encode_layer(x[l].to(dtype), l)[0] for l in range(L)], dim=1)
    return _Recorded(x, xs, ys, acts, logits)


def _constrained(model: nn.Module, transcoder: Transcoder, ids: torch.Tensor, ff: FrozenForward, rec: _Recorded,
                 by_layer: dict[int, list[Intervention]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The graph's linear model: attention, norms and other features frozen; each MLP output is its recorded
    value plus the intervened features' decoder change (and, for a skip transcoder, the skip path's change)."""
    cfg, dtype = transcoder.cfg, transcoder.dtype
    acts = rec.acts.clone()
    for l, ivs in by_layer.items():
        for iv in ivs:
            iv.apply(acts[:, l])
    skip_in = rec.xs if cfg.skip else None  # cancels below: only the decoders carry the change
    delta = transcoder.decode(acts - rec.acts, skip_in) - transcoder.decode(torch.zeros_like(acts), skip_in)
    pinned = rec.ys + delta
    ins, outs = mlp_points(model, cfg)
    now: dict[int, torch.Tensor] = {}  # this pass's MLP inputs (a skip path reads them)

    def pin(l: int, o: torch.Tensor) -> torch.Tensor:
        # the skip path is linear and the graph lets gradients through it, so it follows the changed input
        out = pinned[None, :, l]
        if cfg.skip:
            out = out + transcoder.skip(now[l].to(dtype), l) - transcoder.skip(rec.x[l].to(dtype), l)
        return out.to(o.dtype)

    with torch.no_grad(), record(model, ins, now), replace_outputs(model, outs, pin), ff.frozen():
        return model(ids).logits[0], acts


def _open(model: nn.Module, transcoder: Transcoder, ids: torch.Tensor, ff: FrozenForward, rec: _Recorded,
          by_layer: dict[int, list[Intervention]], freeze_attention: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The replacement model run for real: the transcoder in place of every MLP, plus the recorded errors."""
    acts = rec.acts.clone()

    def edit(l: int, a: torch.Tensor) -> None:
        for iv in by_layer.get(l, []):
            iv.apply(a[0])
        acts[:, l] = a[0]

    attention = ff.frozen_attention_only() if freeze_attention else contextlib.nullcontext()
    with torch.no_grad(), transcoder_in_place(model, transcoder, anchor=Anchor(rec.ys, rec.xs, rec.acts),
                                              edit=edit), attention:
        return model(ids).logits[0], acts


def intervene(
    model: nn.Module,
    transcoder: Transcoder,
    input_ids: torch.Tensor,
    interventions: Sequence[Intervention],
    mode: Literal["constrained", "open"] = "constrained",
    freeze_attention: bool = True,
) -> InterventionResult:
    """Logits and activations with `interventions` applied, in the constrained or the open mode (see above)."""
    check_compatible(model, transcoder)
    ids = input_ids.reshape(1, -1)
    check_prompt(model, ids)
    check_interventions(transcoder, interventions, ids.shape[1])
    if mode not in ("constrained", "open"):
        raise ConfigError(f"mode must be 'constrained' or 'open', got {mode!r}")
    ff = FrozenForward(model)
    rec = _record(model, transcoder, ids, ff)
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)
    if mode == "constrained":
        logits, acts = _constrained(model, transcoder, ids, ff, rec, by_layer)
    else:
        logits, acts = _open(model, transcoder, ids, ff, rec, by_layer, freeze_attention)
    return InterventionResult(logits=logits, activations=acts, original_logits=rec.logits,
                              original_activations=rec.acts)


@torch.no_grad()
def generate(
    model: nn.Module,
    transcoder: Transcoder,
    input_ids: torch.Tensor,
    interventions: Sequence[Intervention],
    max_new_tokens: int = 20,
    freeze_attention: bool = False,
) -> torch.Tensor:
    """Greedy continuation of the open-loop replacement model with the interventions held on.

    Interventions with pos=None apply at every position, including generated ones; positional ones
    stay where they are. Each step reruns the prompt so far (error nodes are recomputed from the
    real model on the new sequence), so with no interventions this is the model's own greedy output."""
    if max_new_tokens < 0:
        raise ConfigError("max_new_tokens must be >= 0")
    ids = input_ids.reshape(-1).clone()
    limit = context_length(model)
    for _ in range(max_new_tokens):
        if limit is not None and len(ids) >= limit:
            break
        result = intervene(model, transcoder, ids, interventions, mode="open", freeze_attention=freeze_attention)
        ids = torch.cat([ids, result.logits[-1].argmax().reshape(1)])
    return ids


@torch.no_grad()
def patch_from(
    model: nn.Module,
    transcoder: Transcoder,
    source_ids: torch.Tensor,
    features: Sequence[tuple[int, int, int]],
    target_pos: int | None,
) -> list[Intervention]:
    """Interventions that set features to the values they take on another prompt.

    `features`: (layer, feature, source position), e.g. a supernode's members traced on the
    source prompt; each is set at `target_pos` (None: every position) of the prompt it is applied to."""
    result = intervene(model, transcoder, source_ids, [], mode="open")
    acts = result.original_activations
    out = []
    for layer, feature, pos in features:
        if not 0 <= pos < acts.shape[0]:
            raise ConfigError(f"source position {pos} out of range 0..{acts.shape[0] - 1}")
        out.append(Intervention(layer, feature, target_pos, value=float(acts[pos, layer, feature])))
    return out
