"""A transcoder's parameters as canonical tensors `<name>.<layer>`: out, in, and freshly drawn.

The layout readers and writers (`clt_hub.artifacts.layouts`) and training's checkpoints speak these names;
keeping the mapping here leaves `Transcoder` with what it computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from clt_hub.config import torch_dtype

if TYPE_CHECKING:
    from clt_hub.transcoders.transcoder import Transcoder

__all__ = ["canonical_tensors", "fill_from_tensors", "paper_init"]


def canonical_tensors(tc: Transcoder, decoders: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter under its canonical name; lazy decoders are read in full (`decoders=False`: left out)."""
    out: dict[str, torch.Tensor] = {}
    for l in range(tc.n_layers):
        out[f"W_enc.{l}"] = tc.W_enc[l].detach()
        out[f"b_enc.{l}"] = tc.b_enc[l].detach()
        out[f"b_dec.{l}"] = tc.b_dec[l].detach()
        if decoders:
            out[f"W_dec.{l}"] = tc.decoder_rows(l).detach()
        if tc.cfg.activation == "jumprelu":
            out[f"threshold.{l}"] = tc.threshold[l].detach()
        if tc.cfg.skip:
            out[f"W_skip.{l}"] = tc.W_skip[l].detach()
    return out


def fill_from_tensors(model: Transcoder, tensors: Mapping[str, torch.Tensor],
                      device: torch.device | str | None, dtype: torch.dtype | str | None) -> Transcoder:
    """Materialise a transcoder built on the meta device from canonical tensors (already checked against its
    config by the layout reader), in `dtype` or the config's."""
    target = torch_dtype(dtype) if dtype is not None else torch_dtype(model.cfg.dtype)
    model.to_empty(device=device or "cpu")
    with torch.no_grad():
        for name, t in tensors.items():
            base, layer = name.rsplit(".", 1)
            getattr(model, base)[int(layer)].data = t.to(device=device or "cpu", dtype=target)
    return model


@torch.no_grad()
def paper_init(tc: Transcoder, generator: torch.Generator | None = None, threshold: float = 0.0,
               shard: tuple[int, int] = (0, 1)) -> None:
    """Encoder U(+-1/sqrt(F)), decoders U(+-1/sqrt(L*d)), zero biases and skips, JumpReLU thresholds `threshold`.

    `shard=(rank, world)`: `tc` holds feature slice `rank` of a transcoder `world` times as wide (feature-parallel
    training). Full-size tensors are drawn layer by layer from `generator` and sliced, so one seed gives the same
    transcoder on any world size."""
    rank, world = shard
    L, d, F = tc.cfg.n_layers, tc.cfg.d_model, tc.cfg.d_sae
    full = F * world
    rows = slice(rank * F, (rank + 1) * F)
    enc_bound, dec_bound = 1.0 / math.sqrt(full), 1.0 / math.sqrt(L * d)
    for l in range(L):
        w = torch.empty(full, d, dtype=torch.float32).uniform_(-enc_bound, enc_bound, generator=generator)
        tc.W_enc[l].copy_(w[rows])
        if not tc.is_lazy:
            shape = (full, tc.cfg.n_targets(l), d)
            w = torch.empty(shape, dtype=torch.float32).uniform_(-dec_bound, dec_bound, generator=generator)
            tc.W_dec[l].copy_(w[rows])
        tc.b_enc[l].zero_()
        tc.b_dec[l].zero_()
        if tc.cfg.activation == "jumprelu":
            tc.threshold[l].fill_(threshold)
        if tc.cfg.skip:
            tc.W_skip[l].zero_()
