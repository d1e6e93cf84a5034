"""Cross-layer and per-layer transcoders as one torch module.

A PLT is a CLT whose only decoder is layer l -> l, so both share one implementation and the
tracing code never branches on the kind: it asks for `decoder_rows(layer, features)` and gets
[k, n_targets, d_model] either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clt_hub.activations import jumprelu, topk_relu
from clt_hub.config import TranscoderConfig
from clt_hub.errors import ConfigError

if TYPE_CHECKING:
    from clt_hub.lazy import RowReader

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(TORCH_DTYPES)}") from None


class Transcoder(nn.Module):
    """Encoders per layer, decoders per (source, target >= source) pair, per-target b_dec.

    Tensor layout (also the canonical state-dict names, `<name>.<layer>`):
    W_enc [F, d], b_enc [F], threshold [F] (JumpReLU), W_dec [F, n_targets(l), d] where target
    index j means layer l + j, b_dec [d] (bias of the reconstruction at layer l), W_skip [d_out, d_in].
    """

    # below this fraction of non-zero activations, decode gathers active rows instead of a dense matmul
    SPARSE_DECODE_DENSITY = 0.02

    def __init__(
        self,
        cfg: TranscoderConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        lazy_decoders: Mapping[int, RowReader] | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
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
        self._lazy: dict[int, RowReader] = dict(lazy_decoders or {})
        if self._lazy and set(self._lazy) != set(range(L)):
            raise ValueError("lazy_decoders must cover every layer")
        self.W_dec = nn.ParameterList(
            [] if self._lazy else
            [nn.Parameter(torch.empty(F, cfg.n_targets(l), d, **kw)) for l in range(L)]
        )
        self.reset_parameters()

    # ----------------------------------------------------------------- construction
    @staticmethod
    def from_config(cfg: TranscoderConfig, **kwargs: Any) -> Transcoder:
        cls = CrossLayerTranscoder if cfg.kind == "clt" else PerLayerTranscoder
        return cls(cfg, **kwargs)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Paper-style init: encoder U(+-1/sqrt(F)), decoders U(+-1/sqrt(L*d)), zero biases."""
        L, d, F = self.cfg.n_layers, self.cfg.d_model, self.cfg.d_sae
        enc_bound = 1.0 / math.sqrt(F)
        dec_bound = 1.0 / math.sqrt(L * d)
        for w in self.W_enc:
            w.copy_(torch.empty(w.shape, dtype=torch.float32).uniform_(-enc_bound, enc_bound, generator=generator))
        for w in self.W_dec:
            w.copy_(torch.empty(w.shape, dtype=torch.float32).uniform_(-dec_bound, dec_bound, generator=generator))

    # ----------------------------------------------------------------- properties
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def is_lazy(self) -> bool:
        return bool(self._lazy)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc[0].dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc[0].device

    # ----------------------------------------------------------------- encoder
    def pre_activations(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Encoder pre-activations of `layer` for MLP inputs x [..., d_model]."""
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def activate(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        act = self.cfg.activation
        if act == "jumprelu":
            return jumprelu(z, self.threshold[layer], self.cfg.jumprelu_bandwidth)
        if act == "relu":
            return torch.relu(z)
        assert self.cfg.topk is not None
        return topk_relu(z, self.cfg.topk)

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

    # ----------------------------------------------------------------- decoder
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

    def decoder_norms(self) -> torch.Tensor:
        """[n_layers, d_sae]: norm of each feature's concatenated decoder vectors (sparsity penalty)."""
        return torch.stack([self.decoder_rows(l).flatten(1).norm(dim=-1) for l in range(self.n_layers)])

    def skip(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if not self.cfg.skip:
            raise ValueError("this transcoder has no skip connection")
        return x @ self.W_skip[layer].T

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Activations [..., n_layers, d_sae] (dense or sparse) -> reconstructions [..., n_layers, d_model].

        Skip transcoders need the MLP inputs `x` as well."""
        if acts.is_sparse:
            acts = acts.to_dense()
        if acts.shape[-2:] != (self.n_layers, self.d_sae):
            raise ValueError(f"activations must end in ({self.n_layers}, {self.d_sae}), got {tuple(acts.shape)}")
        batch = acts.shape[:-2]
        flat = acts.reshape(-1, self.n_layers, self.d_sae)
        out = torch.zeros(flat.shape[0], self.n_layers, self.d_model, dtype=self.dtype, device=acts.device)
        out = out + torch.stack(list(self.b_dec))
        for l in range(self.n_layers):
            a = flat[:, l, :]
            targets = self.cfg.target_layers(l)
            width = len(targets) * self.d_model
            if self._lazy or a.count_nonzero() < self.SPARSE_DECODE_DENSITY * a.numel():
                # attribution-style batches: a few active features per token; touch only their rows
                pos, feat = a.nonzero(as_tuple=True)
                if feat.numel() == 0:
                    continue
                unique, inverse = feat.unique(return_inverse=True)
                rows = self.decoder_rows(l, unique).reshape(len(unique), width)
                contrib = torch.zeros(flat.shape[0], width, dtype=out.dtype, device=out.device)
                contrib.index_add_(0, pos, rows[inverse] * a[pos, feat][:, None])
            else:
                contrib = a @ self.W_dec[l].reshape(self.d_sae, width)
            out[:, targets.start:targets.stop] += contrib.reshape(flat.shape[0], len(targets), self.d_model)
        if self.cfg.skip:
            if x is None:
                raise ValueError("a skip transcoder needs the MLP inputs: decode(acts, x)")
            self._check_input(x)
            xf = x.reshape(-1, self.n_layers, self.d_model)
            out = out + torch.stack([xf[:, l] @ self.W_skip[l].T for l in range(self.n_layers)], dim=1)
        return out.reshape(*batch, self.n_layers, self.d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLP inputs [..., n_layers, d_model] -> (reconstructed MLP outputs, activations)."""
        acts = self.encode(x)
        return self.decode(acts, x if self.cfg.skip else None), acts

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-2:] != (self.n_layers, self.d_model):
            raise ValueError(
                f"MLP inputs must end in (n_layers={self.n_layers}, d_model={self.d_model}), got {tuple(x.shape)}"
            )

    # ----------------------------------------------------------------- state
    def tensors(self) -> dict[str, torch.Tensor]:
        """Canonical tensors `<name>.<layer>`; lazy decoders are read in full here."""
        out: dict[str, torch.Tensor] = {}
        for l in range(self.n_layers):
            out[f"W_enc.{l}"] = self.W_enc[l].detach()
            out[f"b_enc.{l}"] = self.b_enc[l].detach()
            out[f"b_dec.{l}"] = self.b_dec[l].detach()
            out[f"W_dec.{l}"] = self.decoder_rows(l).detach()
            if self.cfg.activation == "jumprelu":
                out[f"threshold.{l}"] = self.threshold[l].detach()
            if self.cfg.skip:
                out[f"W_skip.{l}"] = self.W_skip[l].detach()
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `tensors()`: copy canonical tensors in (shapes checked by the caller)."""
        for name, value in tensors.items():
            base, layer = name.rsplit(".", 1)
            if base == "W_dec" and self._lazy:
                continue
            plist = getattr(self, base)
            plist[int(layer)].data = value.to(device=self.device, dtype=self.dtype).clone()

    def __repr__(self) -> str:
        c = self.cfg
        return (f"{type(self).__name__}(n_layers={c.n_layers}, d_model={c.d_model}, d_sae={c.d_sae}, "
                f"activation={c.activation!r}, skip={c.skip}, lazy={self.is_lazy}, model={c.model_name!r})")

    # ----------------------------------------------------------------- Hub I/O
    def save_pretrained(self, save_directory: str | Path, layout: str = "native", overwrite: bool = True) -> Path:
        """Write the artifact atomically (the folder appears complete or not at all)."""
        from clt_hub.layouts import save

        return save(self, save_directory, layout=layout, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> Transcoder:
        """Load from a local folder, a Hub repo id or a registry name. See `clt_hub.hub.load`."""
        from clt_hub.hub import load

        model = load(name_or_path, **kwargs)
        if cls is not Transcoder and not isinstance(model, cls):
            raise ConfigError(f"{name_or_path} holds a {type(model).__name__}, not a {cls.__name__}; "
                              "load it with clt_hub.Transcoder.from_pretrained")
        return model

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Publish to the Hub; returns the commit URL. See `clt_hub.hub.push`."""
        from clt_hub.hub import push

        return push(self, repo_id, **kwargs)


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
