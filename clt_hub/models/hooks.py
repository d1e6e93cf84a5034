"""Every hook clt_hub puts on a model, in one place.

A point is (absolute module path, side): the module's input (forward pre-hook) or its output (forward
hook). `on_points` is the one primitive: a function sees the tensor at each point and, at an output
point, may return a replacement. Reading activations, pinning MLP outputs, running the transcoder in
place of the MLPs and not computing modules whose outputs are overwritten are all built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clt_hub.models.adapters import Side, adapter_for, get_module

if TYPE_CHECKING:
    from clt_hub.config import TranscoderConfig
    from clt_hub.transcoders.transcoder import Transcoder

Point = tuple[str, Side]
PointFn = Callable[[int, torch.Tensor], torch.Tensor | None]


def mlp_points(model: nn.Module, cfg: TranscoderConfig) -> tuple[list[Point], list[Point]]:
    """The points a transcoder reads (MLP inputs) and writes (MLP outputs) in every layer."""
    adapter = adapter_for(model)
    return (adapter.layer_points(cfg.feature_input_hook, cfg.n_layers),
            adapter.layer_points(cfg.feature_output_hook, cfg.n_layers))


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def on_points(model: nn.Module, points: Sequence[Point], fn: PointFn) -> Iterator[None]:
    """Call `fn(i, tensor)` with the tensor at `points[i]` during every forward pass in the block. At an
    output point, a tensor returned by `fn` replaces the module's output (the first element of a tuple)."""
    handles = []
    for i, (path, side) in enumerate(points):
        module = get_module(model, path)
        if side == "input":
            def pre(mod: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                fn(i, _first(args, kwargs))
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod: nn.Module, args: tuple, out: Any, i: int = i) -> Any:
                new = fn(i, out[0] if isinstance(out, tuple) else out)
                if new is None:
                    return None
                return (new, *out[1:]) if isinstance(out, tuple) else new
            handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record(model: nn.Module, points: Sequence[Point], store: dict[int, torch.Tensor],
           detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """store[i] = the tensor at points[i] (detached unless `detach=False`, when gradients must flow)."""
    def keep(i: int, t: torch.Tensor) -> None:
        store[i] = t.detach() if detach else t
    with on_points(model, points, keep):
        yield store


@contextmanager
def capture(model: nn.Module, points: Mapping[str, Point]) -> Iterator[dict[str, torch.Tensor]]:
    """Record module inputs/outputs (detached) during a forward pass by name: name -> (module path, side)."""
    names = list(points)
    store: dict[str, torch.Tensor] = {}

    def keep(i: int, t: torch.Tensor) -> None:
        store[names[i]] = t.detach()
    with on_points(model, [points[n] for n in names], keep):
        yield store


@contextmanager
def replace_outputs(model: nn.Module, points: Sequence[Point], fn: Callable[[int, torch.Tensor], torch.Tensor]
                    ) -> Iterator[None]:
    """Each output point's module output becomes fn(i, original output)."""
    with on_points(model, points, fn):
        yield


def _zeros_like_input(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return torch.zeros_like(x)


@contextmanager
def not_computed(model: nn.Module, paths: Sequence[str]) -> Iterator[None]:
    """Modules whose outputs a hook overwrites anyway are not run (they return zeros shaped like their
    input): attribution pins every MLP output, so the MLPs' own work would be thrown away."""
    modules = [get_module(model, p) for p in paths]
    for m in modules:
        m.forward = _zeros_like_input  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in modules:
            del m.forward


@contextmanager
def weights_constant(*modules: nn.Module) -> Iterator[None]:
    """Parameters that need no gradient for a while: autograd then keeps no layer inputs for weight
    gradients, which on a long prompt is most of a retained forward (GPT-2 small at 2,048 tokens: 3x)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _recorded_forward(model: nn.Module, run: nn.Module, input_ids: torch.Tensor, input_hook: str, output_hook: str,
                      forward_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """`run(input_ids)` (the model or its trunk) with every layer's MLP input and output recorded."""
    adapter = adapter_for(model)
    n = adapter.n_layers(model)
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    with record(model, adapter.layer_points(input_hook, n), ins), \
            record(model, adapter.layer_points(output_hook, n), outs):
        result = run(input_ids, **forward_kwargs)
    return (torch.stack([ins[l] for l in range(n)], dim=2), torch.stack([outs[l] for l in range(n)], dim=2),
            result)


@torch.no_grad()
def mlp_io(model: nn.Module, input_ids: torch.Tensor, input_hook: str = "hook_resid_mid",
           output_hook: str = "hook_mlp_out", **forward_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcoder inputs and targets for every layer: two tensors [batch, pos, n_layers, d_model]."""
    trunk = getattr(model, "base_model", model)  # the LM head is not needed for MLP activations
    x, y, _ = _recorded_forward(model, trunk, input_ids, input_hook, output_hook, forward_kwargs)
    return x, y


@torch.no_grad()
def mlp_io_and_logits(model: nn.Module, input_ids: torch.Tensor, input_hook: str = "hook_resid_mid",
                      output_hook: str = "hook_mlp_out", **forward_kwargs: Any
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mlp_io` and the model's logits [batch, pos, vocab] from one forward pass (the LM head included), for
    a caller that needs both: one pass instead of two."""
    x, y, out = _recorded_forward(model, model, input_ids, input_hook, output_hook, forward_kwargs)
    return x, y, out.logits


@dataclass
class Anchor:
    """The real forward pass the replacement model is anchored to: true MLP outputs y and the transcoder's
    inputs x and activations on it ([..., n_layers, d] / [..., n_layers, d_sae])."""

    y: torch.Tensor
    x: torch.Tensor
    acts: torch.Tensor


@contextmanager
def transcoder_in_place(model: nn.Module, tc: Transcoder, *, anchor: Anchor | None = None,
                        edit: Callable[[int, torch.Tensor], None] | None = None,
                        acts: dict[int, torch.Tensor] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """The replacement model: every MLP output is the transcoder's reconstruction from this very run's MLP
    inputs (`Transcoder.decode_layer`). With `anchor`, the error nodes are added: MLP output = y + (what the
    transcoder writes now - what it wrote on the anchor run), which is exactly y wherever nothing changed,
    so the replacement model with errors reproduces the model bit for bit. `edit(layer, acts)` changes a
    layer's activations in place before they are decoded (interventions). Yields the activations by layer."""
    acts = {} if acts is None else acts
    inputs: dict[int, torch.Tensor] = {}
    ins, outs = mlp_points(model, tc.cfg)
    skip = tc.cfg.skip
    if anchor is not None:
        anchored = {s: anchor.acts[..., s, :] for s in range(tc.n_layers)}
        written = [tc.decode_layer(anchored, l, anchor.x[..., l, :] if skip else None) for l in range(tc.n_layers)]

    def encode(l: int, x: torch.Tensor) -> None:
        x = x.to(tc.dtype)
        a = tc.encode_layer(x, l)
        if edit is not None:
            edit(l, a)
        inputs[l], acts[l] = x, a

    def decode(l: int, original: torch.Tensor) -> torch.Tensor:
        out = tc.decode_layer(acts, l, inputs[l] if skip else None)
        if anchor is not None:
            out = anchor.y[..., l, :] + (out - written[l])
        return out.to(original.dtype)

    with on_points(model, ins, encode), replace_outputs(model, outs, decode):
        yield acts
