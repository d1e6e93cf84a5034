"""Shared builders for tests."""

from __future__ import annotations

import torch

from clt_hub import Transcoder, TranscoderConfig


def random_transcoder(kind: str = "clt", activation: str = "jumprelu", skip: bool = False, n_layers: int = 3,
                      d_model: int = 8, d_sae: int = 16, seed: int = 0, dtype: str = "float32",
                      **cfg_kwargs: object) -> Transcoder:
    """A transcoder with every tensor random (biases and thresholds too), so no field round-trips by luck."""
    cfg = TranscoderConfig(n_layers=n_layers, d_model=d_model, d_sae=d_sae, kind=kind,  # type: ignore[arg-type]
                           activation=activation, skip=skip, dtype=dtype,
                           topk=4 if activation == "topk" else None, **cfg_kwargs)  # type: ignore[arg-type]
    model = Transcoder.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.5)
        for t in model.threshold:
            t.copy_(torch.rand(t.shape, generator=g) * 0.5)
    return model
