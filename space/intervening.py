"""The Intervene tab: what a visitor asks (picked features, supernodes, multiply or set by an amount) checked and
turned into the library's interventions, and what comes back shown as top tokens and continuations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from clt_hub.attribution.interventions import Intervention, InterventionResult
from clt_hub.attribution.supernodes import interventions_for
from clt_hub.errors import ConfigError
from clt_hub.transcoders.transcoder import Transcoder
from space.views import InterventionOutcome

if TYPE_CHECKING:
    from space.state import Session


def amount_of(how: str, amount: Any) -> float:
    """The amount to multiply by or set to, as a finite number."""
    if how not in ("multiply", "set"):
        raise ConfigError(f"choose multiply or set, not {how!r}")
    try:  # the page sends a number; a visitor's script may send text (its error would repeat it), or 1e308
        value = float(amount)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError("give a finite number to set or multiply by")
    return value


def requested(session: Session, features: Sequence[str], supernodes: Sequence[str], how: str, amount: float
              ) -> list[Intervention]:
    """The interventions asked for: the picked kept features and the named supernodes' members."""
    kind: dict[str, float] = {"scale" if how == "multiply" else "value": amount}
    ivs = []
    if features:
        kept = set(session.kept_features())
        bad = [f for f in features if f not in kept]
        if bad:
            raise ConfigError(f"{', '.join(bad)} not kept features of this graph; trace again or pick from the list")
        ivs += interventions_for([["picked", *features]], "picked", **kind)
    for name in supernodes:
        ivs += interventions_for(session.supernodes, name, **kind)
    if not ivs:
        raise ConfigError("pick at least one feature or supernode to intervene on")
    return ivs


def continuation_length(new_tokens: int | None, limit: int) -> int:
    """How many tokens to continue: 8 (or the Space's limit) unless asked, never over the limit."""
    n = min(8, limit) if new_tokens is None else int(new_tokens)
    if not 0 <= n <= limit:
        raise ConfigError(f"the continuation is at most {limit} tokens on this Space ($CLT_SPACE_MAX_NEW_TOKENS), "
                          f"not {n}")
    return n


def check_fits(amount: float, transcoder: Transcoder) -> None:
    """The amount is a number the transcoder's dtype can hold (1e308 is finite, but not in float32)."""
    dtype = next(iter(transcoder.parameters())).dtype
    if abs(amount) > torch.finfo(dtype).max:
        raise ConfigError(f"{amount:g} is too large for this transcoder's {str(dtype).removeprefix('torch.')} "
                          f"numbers (at most {torch.finfo(dtype).max:.3g}); give a smaller number")


def outcome(tokenizer: Any, prompt: str, ids: torch.Tensor, mode: str, n: int, res: InterventionResult,
            plain: torch.Tensor, steered: torch.Tensor, top: int) -> InterventionOutcome:
    """Top tokens before and after, and both continuations (each cut after its first end-of-text token)."""
    def text(out: torch.Tensor) -> str:
        new = out[len(ids):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        return str(tokenizer.decode(new))

    def tops(original: bool) -> list[tuple[str, float]]:
        return [(str(tokenizer.decode([t])), p) for t, p in res.top_tokens(top, original=original)]

    return InterventionOutcome(prompt, mode, n, tops(True), tops(False), text(plain), text(steered))
