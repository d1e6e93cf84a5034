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


def word_lines(n: int = 300, vocab: int = 60, seed: int = 0) -> list[str]:
    """Seeded lines of 5 to 29 random words "w0".."w59" (the word tokenizer's vocabulary): a training corpus."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        k = int(torch.randint(5, 30, (1,), generator=g))
        lines.append(" ".join(f"w{int(t)}" for t in torch.randint(0, vocab, (k,), generator=g)))
    return lines

