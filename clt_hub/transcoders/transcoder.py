"""Cross-layer and per-layer transcoders as one torch module.

A PLT is a CLT whose only decoder is layer l -> l, so both share one implementation and the
tracing code never branches on the kind: it asks for `decoder_rows(layer, features)` and gets
[k, n_targets, d_model] either way. Everything that reconstructs MLP outputs (attribution,
interventions, evaluation, training) decodes through `decode` or `decode_layer` here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from clt_hub.artifacts.lazy import RowSource, exchanged
from clt_hub.config import TranscoderConfig, torch_dtype
from clt_hub.errors import ConfigError
from clt_hub.transcoders.activations import activate
from clt_hub.transcoders.hub_mixin import HubMixin
from clt_hub.transcoders.sparse import ActiveIndex, active_decode, gather_decode
from clt_hub.transcoders.state import canonical_tensors, fill_from_tensors, paper_init

__all__ = ["CrossLayerTranscoder", "PerLayerTranscoder", "Transcoder"]


class Transcoder(HubMixin, nn.Module):
    """Encoders per layer, decoders per (source, target >= source) pair, per-target b_dec.

    Tensor layout (also the canonical state-dict names, `<name>.<layer>`):
    W_enc [F, d], b_enc [F], threshold [F] (JumpReLU), W_dec [F, n_targets(l), d] where target
    index j means layer l + j, b_dec [d] (bias of the reconstruction at layer l), W_skip [d_out, d_in].
    """

    # below this fraction of non-zero activations, decoding gathers active rows instead of a dense matmul
    SPARSE_DECODE_DENSITY = 0.02

    def __init__(
        self,
        cfg: TranscoderConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        lazy_decoders: Mapping[int, RowSource] | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg  # its shape fields are fixed by the tensors below, so they are copied once
        self.n_layers, self.d_model, self.d_sae = cfg.n_layers, cfg.d_model, cfg.d_sae
        dt = torch_dtype(dtype if dtype is not None else cfg.dtype)
        kw: dict[str, Any] = {"device": device, "dtype": dt}
        L, d, F = cfg.n_layers, cfg.d_model, cfg.d_sae
        self.W_enc = nn.ParameterList([nn.Parameter(torch.empty(F, d, **kw)) for _ in range(L)])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(F, **kw)) for _ in range(L)])
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(d, **kw)) for _ in range(L)])
        self.threshold = nn.ParameterList(
            [nn.Parameter(torch.zeros(F, **kw)) for _ in range(L)] if cfg.activation == "jumprelu" else []
        )
        self.W_skip = nn.ParameterList(
            [nn.Parameter(torch.zeros(d, d, **kw)) for _ in range(L)] if cfg.skip else []
        )
        self._lazy: dict[int, RowSource] = dict(lazy_decoders or {})
        if self._lazy and set(self._lazy) != set(range(L)):
            raise ValueError("lazy_decoders must cover every layer")
        self.W_dec = nn.ParameterList(
            [] if self._lazy else
            [nn.Parameter(torch.empty(F, cfg.n_targets(l), d, **kw)) for l in range(L)]
        )
        self.reset_parameters()

    @staticmethod
    def from_config(cfg: TranscoderConfig, **kwargs: Any) -> Transcoder:
        return _concrete(cfg)(cfg, **kwargs)

    @classmethod
    def from_tensors(
        cls,
        cfg: TranscoderConfig,
        tensors: Mapping[str, torch.Tensor],
        lazy_decoders: Mapping[int, RowSource] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> Transcoder:
        """Assemble from canonical tensors `<name>.<layer>` (already checked against `cfg` by the layout
        reader). Building through `cls` means `CrossLayerTranscoder.from_pretrained` refuses a PLT."""
        concrete = _concrete(cfg)
        if not issubclass(concrete, cls):
            raise ConfigError(f"the artifact holds a {concrete.__name__}, not a {cls.__name__}; "
                              "load it with clt_hub.Transcoder.from_pretrained")
        with torch.device("meta"):
            model = concrete(cfg, dtype=dtype, lazy_decoders=lazy_decoders)
        return fill_from_tensors(model, tensors, device, dtype)

    def reset_parameters(self, generator: torch.Generator | None = None, threshold: float = 0.0,
                         shard: tuple[int, int] = (0, 1)) -> None:
        """Paper-style init (`clt_hub.transcoders.state.paper_init`); `shard=(rank, world)` for feature parallelism."""
        paper_init(self, generator, threshold, shard)

    @property
    def is_lazy(self) -> bool:
        return bool(self._lazy)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc[0].dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc[0].device

    def pre_activations(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Encoder pre-activations of `layer` for MLP inputs x [..., d_model]."""
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def activate(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        theta = self.threshold[layer] if self.cfg.activation == "jumprelu" else None
        return activate(z, self.cfg.activation, theta=theta, k=self.cfg.topk, bandwidth=self.cfg.jumprelu_bandwidth)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return self.activate(self.pre_activations(x, layer), layer)

    def encode(self, x: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        """MLP inputs [..., n_layers, d_model] -> activations [..., n_layers, d_sae].

        `sparse=True` returns a coalesced COO tensor, which is what attribution wants for long
        prompts with wide transcoders (a few hundred active features out of millions)."""
        self._check_input(x)
        acts = [self.encode_layer(x[..., l, :], l) for l in range(self.n_layers)]
        if sparse:
            return torch.stack([a.to_sparse() for a in acts], dim=-2).coalesce()
        return torch.stack(acts, dim=-2)

    def decoder_rows(self, layer: int, features: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder vectors of `features` at `layer`: [k, n_targets(layer), d_model].

        For a lazy transcoder only these rows are read from disk."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.n_layers - 1}")
        if features is not None:
            features = torch.as_tensor(features, dtype=torch.long)
            if features.numel() and (int(features.min()) < 0 or int(features.max()) >= self.d_sae):
                raise IndexError(f"feature index out of range 0..{self.d_sae - 1} at layer {layer}")
        if self._lazy:
            reader = self._lazy[layer]
            rows = reader.all() if features is None else reader.rows(features)
            return rows.to(device=self.device, dtype=self.dtype)
        w = self.W_dec[layer]
        return w if features is None else w[features.to(w.device)]

    def prefetch_decoder_rows(self, features: Mapping[int, torch.Tensor]) -> None:
        """Announce the rows about to be read (`features[l]`: layer l's ids) and hold them; see `RowSource`."""
        for l, ids in features.items():
            if l in self._lazy:
                self._lazy[l].prefetch(ids)

    def decoder_rows_exchanged(self, features: Mapping[int, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """Rows `features[l]` readable inside the block, dropped after unless held before (sharded decoders:
        a collective, entered by every rank with the same features; other decoders: nothing to do)."""
        return exchanged(self._lazy, features)

    def decoder_norms(self) -> torch.Tensor:
        """[n_layers, d_sae]: norm of each feature's concatenated decoder vectors (sparsity penalty)."""
        return torch.stack([self.decoder_rows(l).flatten(1).norm(dim=-1) for l in range(self.n_layers)])

    def skip(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if not self.cfg.skip:
            raise ValueError("this transcoder has no skip connection")
        return x @ self.W_skip[layer].T

    def _contract(self, a: torch.Tensor, layer: int, targets: slice, dense: bool = False) -> torch.Tensor:
        """a [N, d_sae] at source `layer` -> its writes [N, len(targets), d_model] to target indices `targets`.

        Lazy decoders, or few active features, gather the active rows instead of a dense matmul."""
        n_t = len(range(*targets.indices(self.cfg.n_targets(layer))))
        if self._lazy or (not dense and a.count_nonzero() < self.SPARSE_DECODE_DENSITY * a.numel()):
            def rows(features: torch.Tensor) -> torch.Tensor:  # the active ones, unique: exchanged for this read
                with self.decoder_rows_exchanged({layer: features}):
                    return self.decoder_rows(layer, features)[:, targets].reshape(len(features), -1)
            return gather_decode(a, rows, n_t * self.d_model, self.dtype).reshape(-1, n_t, self.d_model)
        w = self.W_dec[layer][:, targets]
        return (a @ w.reshape(self.d_sae, -1)).reshape(-1, n_t, self.d_model)

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, dense: bool = False) -> torch.Tensor:
        """Activations [..., n_layers, d_sae] (dense or sparse) -> reconstructions [..., n_layers, d_model].

        Skip transcoders need the MLP inputs `x` as well. `reduce` is applied to the features' summed
        writes before the biases are added: feature-parallel training passes the all-reduce over ranks
        there, so a rank's slice of the features decodes exactly like the whole transcoder. `dense=True`
        always multiplies whole decoder matrices, as training does whatever the sparsity."""
        if acts.is_sparse:
            acts = acts.to_dense()
        if acts.shape[-2:] != (self.n_layers, self.d_sae):
            raise ValueError(f"activations must end in ({self.n_layers}, {self.d_sae}), got {tuple(acts.shape)}")
        batch = acts.shape[:-2]
        flat = acts.reshape(-1, self.n_layers, self.d_sae)
        # unbind, not flat[:, l] / out[:, span] += ...: per-layer indexing of one big tensor makes the backward
        # zero a whole-tensor gradient per index (L^2 memory traffic); unbind's backward stacks once
        writes: list[list[torch.Tensor]] = [[] for _ in range(self.n_layers)]  # by target layer, sources in order
        for l, a in enumerate(flat.unbind(1)):
            span = self.cfg.target_layers(l)
            for t, w in zip(range(span.start, span.stop), self._contract(a, l, slice(None), dense).unbind(1),
                            strict=True):
                writes[t].append(w)
        out = torch.stack([sum(ws, torch.zeros((), dtype=self.dtype, device=acts.device)) for ws in writes], dim=1)
        out = self._finish(out, x, reduce, biases=True)
        return out.reshape(*batch, self.n_layers, self.d_model)

    def _finish(self, out: torch.Tensor, x: torch.Tensor | None, reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                biases: bool) -> torch.Tensor:
        """The features' summed writes [N, n_layers, d_model], reduced over ranks, plus b_dec and skip paths."""
        if reduce is not None:
            out = reduce(out)
        if not biases:
            return out
        out = out + torch.stack(list(self.b_dec))
        if self.cfg.skip:
            if x is None:
                raise ValueError("a skip transcoder needs the MLP inputs: decode(acts, x)")
            self._check_input(x)
            xf = x.reshape(-1, self.n_layers, self.d_model)
            out = out + torch.stack([self.skip(xf[:, l], l) for l in range(self.n_layers)], dim=1)
        return out

    def decode_active(self, values: Sequence[torch.Tensor], index: Sequence[ActiveIndex],
                      x: torch.Tensor | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      biases: bool = True) -> torch.Tensor:
        """`decode` from each source layer's active entries (`index[l]`, `values[l]` [n_l]) of N tokens -> [N,
        n_layers, d_model], at a cost that follows the entries, not d_sae (`clt_hub.transcoders.sparse`; training's
        TopK path). `x` and `reduce` as in `decode`; `biases=False` returns the features' writes alone."""
        if self._lazy:
            raise ValueError("decode_active trains decoders; this transcoder's decoders are lazy (read-only)")
        if len(values) != self.n_layers or len(index) != self.n_layers:
            raise ValueError(f"decode_active needs one entry set per layer ({self.n_layers})")
        spans = [(r.start, r.stop) for r in map(self.cfg.target_layers, range(self.n_layers))]
        out = active_decode(list(values), [w.reshape(self.d_sae, -1) for w in self.W_dec], list(index), spans,
                            self.d_model)
        return self._finish(out, x, reduce, biases)

    def decode_layer(self, acts: Sequence[torch.Tensor] | Mapping[int, torch.Tensor], layer: int,
                     x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of MLP output `layer` [..., d_model] from the activations of the layers that
        write to it (`acts[s]`: [..., d_sae] for every source layer s <= layer): what stands in for that
        MLP when the transcoder runs inside the model. Skip transcoders need the layer's MLP input `x`."""
        out = self.b_dec[layer]
        for s in self.cfg.source_layers(layer):
            a = acts[s]
            flat = a.reshape(-1, self.d_sae)
            j = layer - s
            out = out + self._contract(flat, s, slice(j, j + 1)).reshape(*a.shape[:-1], self.d_model)
        if self.cfg.skip:
            if x is None:
                raise ValueError("a skip transcoder needs the MLP input: decode_layer(acts, layer, x)")
            out = out + self.skip(x, layer)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLP inputs [..., n_layers, d_model] -> (reconstructed MLP outputs, activations)."""
        acts = self.encode(x)
        return self.decode(acts, x if self.cfg.skip else None), acts

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-2:] != (self.n_layers, self.d_model):
            raise ValueError(
                f"MLP inputs must end in (n_layers={self.n_layers}, d_model={self.d_model}), got {tuple(x.shape)}"
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Canonical tensors `<name>.<layer>`; lazy decoders are read in full here."""
        return canonical_tensors(self)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"{type(self).__name__}(n_layers={c.n_layers}, d_model={c.d_model}, d_sae={c.d_sae}, "
                f"activation={c.activation!r}, skip={c.skip}, lazy={self.is_lazy}, model={c.model_name!r})")


class CrossLayerTranscoder(Transcoder):
    """Each layer-l feature writes to every layer l' >= l (Ameisen et al. 2025)."""

    def __init__(self, cfg: TranscoderConfig, **kwargs: Any):
        if cfg.kind != "clt":
            raise ConfigError("CrossLayerTranscoder needs kind='clt'")
        super().__init__(cfg, **kwargs)


class PerLayerTranscoder(Transcoder):
    """A set of per-layer (optionally skip) transcoders: only l -> l decoders."""

    def __init__(self, cfg: TranscoderConfig, **kwargs: Any):
        if cfg.kind != "plt":
            raise ConfigError("PerLayerTranscoder needs kind='plt'")
        super().__init__(cfg, **kwargs)


def _concrete(cfg: TranscoderConfig) -> type[Transcoder]:
    return CrossLayerTranscoder if cfg.kind == "clt" else PerLayerTranscoder
