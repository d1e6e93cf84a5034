"""Shared builders for tests, and the float tolerances they compare with (derived in tests/TOLERANCES.md)."""

from __future__ import annotations

import copy

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



def sum_rounding_bound(n_terms: int, magnitude: torch.Tensor | float, dtype: torch.dtype = torch.float32,
                       runs: int = 2) -> torch.Tensor | float:
    """How far `runs` computations of the same sums, each in its own order, can be apart: a sum of n terms
    in floating point is within n*u/(1-n*u) of the exact sum times the sum of the terms' magnitudes, whatever
    the order, blocking or FMA (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1), so two
    runs differ by at most twice that. `magnitude`: the sum of |terms| (or a bound on it)."""
    u = torch.finfo(dtype).eps / 2
    return runs * n_terms * u / (1 - n_terms * u) * magnitude


def decode_rounding_bound(model: Transcoder, acts: torch.Tensor) -> torch.Tensor:
    """Per-element bound on how far two float32 decodes of `acts` may differ when only their summation order
    differs (a dense matmul against gathered rows, another CPU's kernels): each output sums at most
    n_layers x d_sae products and the bias; their magnitudes are what the same decode gives with every
    decoder weight, bias and activation replaced by its absolute value. Skip paths are not covered."""
    assert not model.cfg.skip
    magnitudes = copy.deepcopy(model)
    with torch.no_grad():
        for p in magnitudes.parameters():
            p.abs_()
    bound = sum_rounding_bound(model.n_layers * model.d_sae + 1, magnitudes.decode(acts.abs(), dense=True),
                               dtype=acts.dtype)
    assert isinstance(bound, torch.Tensor)
    return bound
