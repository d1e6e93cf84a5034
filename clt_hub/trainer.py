"""Training cross-layer (and per-layer) transcoders, on one process or many (torch.distributed).

Loss (Ameisen et al. 2025): MSE of every layer's reconstruction, plus a tanh sparsity penalty on
`||W_dec_i|| * a_i` ramped up over the first part of training, plus a pre-activation penalty that
pulls dead JumpReLU features back toward their threshold. Inputs and targets are scaled per layer
to mean squared norm d_model while training; the scales are folded into the weights at save time,
so the artifact works on raw model activations.

Parallelism: `data` splits each batch across ranks and averages gradients; `features` gives each
rank a slice of every layer's features (encoder rows and their decoders) and sums the partial
reconstructions, for CLTs whose decoders (F * d * L(L+1)/2 values) do not fit one device.
Checkpoints always hold the full tensors, so a run can resume on any world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt_hub.config import ACTIVATIONS, KINDS, TranscoderConfig, check_fields
from clt_hub.errors import CltHubError, ConfigError
from clt_hub.transcoder import Transcoder


class TrainingError(CltHubError):
    """Training cannot go on (NaN loss, unwritable checkpoint); the message names the last good checkpoint."""


@dataclass
class TrainConfig:
    """One training run. Every field can come from YAML or the command line."""

    model: str
    dataset: str
    out_dir: str = "clt_out"
    text_field: str = "text"
    split: str = "train"
    kind: str = "clt"
    d_sae: int = 1024
    activation: str = "jumprelu"
    topk: int | None = None
    batch_topk: bool = False
    skip: bool = False
    n_tokens: int = 1_000_000
    batch_size: int = 1024
    lr: float = 2e-4
    warmup_steps: int = 100
    decay_fraction: float = 0.2          # linear decay to 0 over this last fraction of steps
    sparsity_coeff: float = 1e-3
    sparsity_c: float = 1.0              # tanh(c * ||W_dec|| * a)
    sparsity_warmup_fraction: float = 0.5
    preact_coeff: float = 3e-6
    threshold_init: float = 0.1
    jumprelu_bandwidth: float = 1.0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    context_size: int = 128
    model_batch: int = 8
    buffer_tokens: int = 16384
    input_hook: str = "hook_resid_mid"
    output_hook: str = "hook_mlp_out"
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    dead_after_tokens: int = 1_000_000   # a feature silent for this many tokens counts as dead
    parallel: str = "data"               # data | features (with torchrun, world size > 1)
    amp: bool = False                    # bfloat16 autocast on CUDA
    device: str = "cpu"
    push_to_hub: str | None = None
    eval_dataset: str | None = None      # held-out text: evaluated after training, metrics into the artifact
    eval_tokens: int = 20000
    tensorboard: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("d_sae", "n_tokens", "batch_size", "context_size", "model_batch", "checkpoint_every",
                    "log_every", "buffer_tokens")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"training field '{name}' must be a positive integer, got {v!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"training field 'kind' is {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"training field 'activation' is {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.activation == "topk" and not (isinstance(self.topk, int) and 0 < self.topk <= self.d_sae):
            raise ConfigError(f"activation 'topk' needs 'topk' in 1..d_sae={self.d_sae}, got {self.topk!r}")
        if self.batch_topk and self.activation != "topk":
            raise ConfigError("batch_topk needs activation 'topk'")
        if self.parallel not in ("data", "features"):
            raise ConfigError(f"training field 'parallel' is {self.parallel!r}; use 'data' or 'features'")
        for name in ("lr", "sparsity_c", "jumprelu_bandwidth", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"training field '{name}' must be a positive number, got {v!r}")
        for name in ("decay_fraction", "sparsity_warmup_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"training field '{name}' must be in [0, 1], got {v!r}")
        if self.n_tokens < self.batch_size:
            raise ConfigError(f"n_tokens ({self.n_tokens}) is smaller than one batch ({self.batch_size})")

    @property
    def total_steps(self) -> int:
        return self.n_tokens // self.batch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "training config") -> TrainConfig:
        check_fields(cls, data, ("model", "dataset"), source)
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_config_file(path), source=str(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML training config (the CLI merges flags into it before validating)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read training config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of TrainConfig fields")
    return data


# ----------------------------------------------------------------------------- distributed helpers
def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SumOverRanks(torch.autograd.Function):
    """Sum of partial reconstructions across feature shards. The loss computed from the sum is the
    same on every rank, so its gradient is already the full gradient: backward is the identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _all_reduce(t: torch.Tensor, average: bool = False) -> torch.Tensor:
    import torch.distributed as dist

    rank, world = _dist()
    if world > 1:
        dist.all_reduce(t)
        if average:
            t /= world
    return t


def _gather_features(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's feature slice (dim 0)."""
    import torch.distributed as dist

    rank, world = _dist()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- the model being trained
SHARDED = ("W_enc", "b_enc", "threshold", "W_dec")   # feature dim first: split across ranks
REPLICATED = ("b_dec", "W_skip")


def _schedule(step: int, cfg: TrainConfig) -> float:
    total = cfg.total_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1 - cfg.decay_fraction))
    if cfg.decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


class Trainer:
    """Holds the transcoder (or this rank's feature slice), the optimiser and the run's state."""

    def __init__(self, cfg: TrainConfig, n_layers: int, d_model: int, model_name: str = ""):
        self.cfg = cfg
        self.rank, self.world = _dist()
        self.features_parallel = cfg.parallel == "features" and self.world > 1
        if self.features_parallel:
            if cfg.d_sae % self.world:
                raise ConfigError(f"d_sae={cfg.d_sae} features do not divide across {self.world} ranks; "
                                  f"use a multiple of {self.world}")
            if cfg.activation == "topk":
                raise ConfigError("TopK needs all of a layer's features on one rank; use parallel='data'")
        if cfg.batch_size % self.world and not self.features_parallel:
            raise ConfigError(f"batch_size={cfg.batch_size} does not divide across {self.world} ranks")
        if cfg.batch_topk and self.world > 1 and not self.features_parallel:
            raise ConfigError("BatchTopK ranks the whole batch; it cannot be split across ranks (use one process)")
        self.n_layers, self.d_model = n_layers, d_model
        self.local_f = cfg.d_sae // self.world if self.features_parallel else cfg.d_sae
        self.tc_cfg = TranscoderConfig(
            n_layers=n_layers, d_model=d_model, d_sae=cfg.d_sae, kind=cfg.kind,  # type: ignore[arg-type]
            activation=cfg.activation, topk=cfg.topk, skip=cfg.skip, model_name=model_name,
            feature_input_hook=cfg.input_hook, feature_output_hook=cfg.output_hook,
            context_size=cfg.context_size, dataset_path=cfg.dataset, jumprelu_bandwidth=cfg.jumprelu_bandwidth)
        local_cfg = dataclasses.replace(self.tc_cfg, d_sae=self.local_f)
        self.device = torch.device(cfg.device)
        self.tc = Transcoder.from_config(local_cfg, device=self.device, dtype=torch.float32)
        self._init_weights()
        self.optimizer = torch.optim.AdamW(self.tc.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                           weight_decay=cfg.weight_decay)
        self.step = 0
        self.scale_in = torch.ones(n_layers)
        self.scale_out = torch.ones(n_layers)
        self.last_fired = torch.zeros(n_layers, self.local_f, dtype=torch.long)  # step of last activation
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_weights(self) -> None:
        """Full-size tensors from one seeded generator, then this rank's slice: the same run on any world size."""
        cfg, L, d, F = self.cfg, self.n_layers, self.d_model, self.cfg.d_sae
        g = torch.Generator().manual_seed(cfg.seed)
        lo = self.rank * self.local_f if self.features_parallel else 0
        sl = slice(lo, lo + self.local_f)
        # the paper's init: encoder U(+-1/sqrt(F)), decoders U(+-1/sqrt(L * d)), zero biases
        enc_bound, dec_bound = 1.0 / math.sqrt(F), 1.0 / math.sqrt(L * d)
        for l in range(L):
            n_t = self.tc_cfg.n_targets(l)
            self.tc.W_enc[l].copy_(torch.empty(F, d).uniform_(-enc_bound, enc_bound, generator=g)[sl])
            self.tc.W_dec[l].copy_(torch.empty(F, n_t, d).uniform_(-dec_bound, dec_bound, generator=g)[sl])
            self.tc.b_enc[l].zero_()
            self.tc.b_dec[l].zero_()
            if cfg.activation == "jumprelu":
                self.tc.threshold[l].fill_(cfg.threshold_init)
            if cfg.skip:
                self.tc.W_skip[l].zero_()

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_scales(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Per-layer scalars making E||x||^2 = E||y||^2 = d_model on this batch (same on every rank)."""
        d = self.d_model
        self.scale_in = (d / x.pow(2).sum(-1).mean(0).clamp(min=1e-12)).sqrt().cpu()
        self.scale_out = (d / y.pow(2).sum(-1).mean(0).clamp(min=1e-12)).sqrt().cpu()

    # ------------------------------------------------------------------ one step
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations and activations [B, L, F_local] (BatchTopK ranks the whole batch per layer)."""
        pre = torch.stack([self.tc.pre_activations(x[:, l], l) for l in range(self.n_layers)], dim=1)
        if self.cfg.batch_topk:
            assert self.cfg.topk is not None
            B = pre.shape[0]
            flat = torch.relu(pre).permute(1, 0, 2).reshape(self.n_layers, -1)      # [L, B*F]
            vals, idx = flat.topk(self.cfg.topk * B, dim=-1)
            acts = torch.zeros_like(flat).scatter(-1, idx, vals).reshape(self.n_layers, B, -1).permute(1, 0, 2)
            return pre, acts
        acts = torch.stack([self.tc.activate(pre[:, l], l) for l in range(self.n_layers)], dim=1)
        return pre, acts

    def _decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, L, d = acts.shape[0], self.n_layers, self.d_model
        out = torch.zeros(B, L, d, device=acts.device, dtype=acts.dtype)
        for l in range(L):
            targets = self.tc_cfg.target_layers(l)
            contrib = acts[:, l] @ self.tc.W_dec[l].reshape(self.local_f, -1)
            out[:, targets.start:targets.stop] += contrib.reshape(B, len(targets), d)
        if self.features_parallel:
            out = _SumOverRanks.apply(out)
        out = out + torch.stack(list(self.tc.b_dec))
        if self.cfg.skip:
            out = out + torch.stack([x[:, l] @ self.tc.W_skip[l].T for l in range(L)], dim=1)
        return out

    def _decoder_norms(self) -> torch.Tensor:
        return torch.stack([self.tc.W_dec[l].flatten(1).norm(dim=-1) for l in range(self.n_layers)])  # [L, F]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """x, y: the full global batch [B, L, d] (raw activations); each rank takes its part."""
        cfg = self.cfg
        x = (x.to(self.device) * self.scale_in.to(self.device)[None, :, None])
        y = (y.to(self.device) * self.scale_out.to(self.device)[None, :, None])
        if self.world > 1 and not self.features_parallel:
            part = x.shape[0] // self.world
            x, y = x[self.rank * part:(self.rank + 1) * part], y[self.rank * part:(self.rank + 1) * part]
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * _schedule(self.step, cfg)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            pre, acts = self._encode(x)
            recon = self._decode(acts, x)
            err = (recon.float() - y).pow(2).sum(-1)               # [B, L]
            mse = err.sum(-1).mean()
            norms = self._decoder_norms()                          # [L, F_local]
            lam = cfg.sparsity_coeff * min(1.0, (self.step + 1) / max(1, cfg.sparsity_warmup_fraction * cfg.total_steps))
            sparsity = torch.tanh(cfg.sparsity_c * acts.float() * norms[None]).sum((-1, -2)).mean()
            loss = mse + lam * sparsity if cfg.activation != "topk" else mse
            if cfg.activation == "jumprelu" and cfg.preact_coeff > 0:
                theta = torch.stack(list(self.tc.threshold))       # [L, F_local]
                preact = (torch.relu(theta[None] - pre) * norms[None]).sum((-1, -2)).mean()
                loss = loss + cfg.preact_coeff * preact
        if not torch.isfinite(loss):
            last = self.latest_checkpoint()
            raise TrainingError(
                f"loss became {loss.item()} at step {self.step}; last good checkpoint: "
                f"{last if last else 'none yet'}. Lower lr or sparsity_coeff and resume with --resume")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_gradients()
        self._clip_gradients()
        self.optimizer.step()
        with torch.no_grad():
            fired = (acts > 0).any(0)                                # [L, F_local]
            self.last_fired[fired.cpu()] = self.step + 1
            l0 = (acts > 0).float().sum(-1).mean()
            var = (y - y.mean(0, keepdim=True)).pow(2).sum(-1).sum(0)  # [L]
            stats = torch.stack([err.sum(0).sum(), var.sum(), l0 * (x.shape[0]), torch.tensor(float(x.shape[0]))])
            if self.world > 1 and not self.features_parallel:
                _all_reduce(stats)
            l0_total = l0.clone()
            if self.features_parallel:
                _all_reduce(l0_total)  # features add up across shards
                stats[2] = l0_total * stats[3]
            dead_steps = max(1, cfg.dead_after_tokens // cfg.batch_size)
            dead = ((self.step + 1 - self.last_fired) >= dead_steps).float().mean()
            if self.features_parallel:
                dead = _all_reduce(dead.clone(), average=True)
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "mse": float(mse.detach()),
                "fvu": float(stats[0] / stats[1].clamp(min=1e-12)), "l0": float(stats[2] / stats[3]),
                "dead": float(dead), "lr": self.optimizer.param_groups[0]["lr"], "sparsity_coeff": lam}

    def _sync_gradients(self) -> None:
        if self.world == 1 or self.features_parallel:
            return  # feature shards own their gradients; replicated params got identical ones
        for p in self.tc.parameters():
            if p.grad is not None:
                _all_reduce(p.grad, average=True)

    def _clip_gradients(self) -> None:
        sharded: list[torch.Tensor] = []
        replicated: list[torch.Tensor] = []
        for name, p in self.tc.named_parameters():
            if p.grad is None:
                continue
            (sharded if name.split(".")[0] in SHARDED else replicated).append(p.grad)
        sq = torch.zeros((), device=self.device)
        for g in sharded:
            sq = sq + g.pow(2).sum()
        if self.features_parallel:
            _all_reduce(sq)
        for g in replicated:
            sq = sq + g.pow(2).sum()
        total = sq.sqrt()
        factor = (self.cfg.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        for g in sharded + replicated:
            g.mul_(factor)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return Path(self.cfg.out_dir) / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        root = self.checkpoint_root
        if not root.is_dir():
            return None
        done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue exactly, as full (all-rank) tensors plus JSON metadata."""
        tensors: dict[str, torch.Tensor] = {}
        opt_state = self.optimizer.state
        for name, p in self.tc.named_parameters():
            shard = self.features_parallel and name.split(".")[0] in SHARDED
            full = (lambda t: _gather_features(t)) if shard else (lambda t: t)  # noqa: E731
            tensors[f"param.{name}"] = full(p.detach()).cpu()
            st = opt_state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"adam.{key}.{name}"] = full(st[key]).cpu()
            if "step" in st:
                tensors[f"adam.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        tensors["scale_in"] = self.scale_in.clone()
        tensors["scale_out"] = self.scale_out.clone()
        tensors["last_fired"] = _gather_features(self.last_fired.T.contiguous()).T.contiguous() if self.features_parallel \
            else self.last_fired.clone()
        tensors["rng_torch"] = torch.get_rng_state()
        meta = {"step": self.step, "config": dataclasses.asdict(self.cfg), "tc_config": self.tc_cfg.to_dict(),
                "world_size": self.world, "history": self.history}
        return tensors, meta

    def save_checkpoint(self) -> Path | None:
        """Atomic: a checkpoint folder is complete (state.json written last) or absent."""
        from safetensors.torch import save_file

        from clt_hub.atomic import atomic_directory

        tensors, meta = self._full_state()  # collective: every rank takes part
        path = self.checkpoint_root / f"step_{self.step:08d}"
        if self.rank == 0:
            previous = self.latest_checkpoint()
            try:
                with atomic_directory(path) as tmp:
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
                    (tmp / "state.json").write_text(json.dumps(meta))
            except OSError as exc:
                raise TrainingError(
                    f"could not write checkpoint {path} ({exc.strerror or exc}); the previous checkpoint "
                    f"{previous or '(none)'} is intact. Free disk space and resume with --resume") from None
            done = sorted(p for p in self.checkpoint_root.glob("step_*") if (p / "state.json").is_file())
            for old in done[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @torch.no_grad()
    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        lo = self.rank * self.local_f if self.features_parallel else 0
        sl = slice(lo, lo + self.local_f)
        for name, p in self.tc.named_parameters():
            shard = name.split(".")[0] in SHARDED
            full = tensors[f"param.{name}"]
            if full.shape[0 if shard else -1] != (self.cfg.d_sae if shard else p.shape[-1]):
                raise ConfigError(f"checkpoint {path} has {name} of shape {tuple(full.shape)}, which does not "
                                  "match this run's config; resume with the config it was written with")
            p.copy_(full[sl] if shard else full)
            if f"adam.exp_avg.{name}" in tensors:
                st = self.optimizer.state[p]
                st["step"] = tensors[f"adam.step.{name}"].reshape(())
                st["exp_avg"] = (tensors[f"adam.exp_avg.{name}"][sl] if shard else tensors[f"adam.exp_avg.{name}"]).to(p.device).clone()
                st["exp_avg_sq"] = (tensors[f"adam.exp_avg_sq.{name}"][sl] if shard
                                    else tensors[f"adam.exp_avg_sq.{name}"]).to(p.device).clone()
        self.scale_in, self.scale_out = tensors["scale_in"], tensors["scale_out"]
        self.last_fired = tensors["last_fired"][:, sl].clone()
        torch.set_rng_state(tensors["rng_torch"])
        self.step = int(meta["step"])
        self.history = meta.get("history", [])

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self) -> Transcoder:
        """The full transcoder with the normalisation folded in (works on raw activations)."""
        tensors, _ = self._full_state()
        tc = Transcoder.from_config(self.tc_cfg)
        s_in, s_out = self.scale_in, self.scale_out
        for l in range(self.n_layers):
            targets = list(self.tc_cfg.target_layers(l))
            tc.W_enc[l].copy_(tensors[f"param.W_enc.{l}"] * s_in[l])
            tc.b_enc[l].copy_(tensors[f"param.b_enc.{l}"])
            tc.W_dec[l].copy_(tensors[f"param.W_dec.{l}"] / s_out[targets][None, :, None])
            tc.b_dec[l].copy_(tensors[f"param.b_dec.{l}"] / s_out[l])
            if self.cfg.activation == "jumprelu":
                tc.threshold[l].copy_(tensors[f"param.threshold.{l}"])
            if self.cfg.skip:
                tc.W_skip[l].copy_(tensors[f"param.W_skip.{l}"] * s_in[l] / s_out[l])
        return tc


# ----------------------------------------------------------------------------- the run
def _batches(cfg: TrainConfig, model: nn.Module, tokenizer: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's batch stream, identical on every rank and on every (re)start (so resume can replay it)."""
    from clt_hub.activation_source import (
        ActivationCache,
        SourceConfig,
        model_activations,
        shuffled_batches,
    )
    from clt_hub.texts import iter_texts

    src = SourceConfig(context_size=cfg.context_size, input_hook=cfg.input_hook, output_hook=cfg.output_hook,
                       model_batch=cfg.model_batch)
    if cfg.cache_dir:
        cache_path = Path(cfg.cache_dir)
        if not (cache_path / "manifest.json").is_file():
            rank, _ = _dist()
            if rank == 0:
                ActivationCache.build(model, tokenizer, iter_texts(cfg.dataset, split=cfg.split, text_field=cfg.text_field),
                                      cache_path, cfg.n_tokens, src, dtype=cfg.cache_dtype, progress=True)
            if _dist()[1] > 1:
                import torch.distributed as dist

                dist.barrier()
        cache = ActivationCache(cache_path)
        if cache.n_tokens < cfg.batch_size:
            raise ConfigError(f"activation cache {cache_path} holds {cache.n_tokens} tokens, less than one batch")
        epoch = 0
        while True:
            yield from cache.batches(cfg.batch_size, cfg.seed, epoch)
            epoch += 1
    epoch = 0
    while True:
        texts = iter_texts(cfg.dataset, split=cfg.split, text_field=cfg.text_field)
        n = 0
        for batch in shuffled_batches(model_activations(model, tokenizer, texts, src), cfg.batch_size,
                                      cfg.buffer_tokens, cfg.seed + epoch):
            n += 1
            yield batch
        if n == 0:
            raise ConfigError(f"dataset {cfg.dataset} has fewer tokens than one batch of {cfg.batch_size}")
        epoch += 1  # small datasets repeat, reshuffled


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, model: nn.Module | None = None,
          tokenizer: Any = None) -> Path:
    """Train, checkpoint, export. Returns the artifact folder (out_dir/transcoder)."""
    from tqdm.auto import tqdm

    from clt_hub.adapters import adapter_for
    from clt_hub.trace import load_model

    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model)
    adapter = adapter_for(model)
    from clt_hub.activation_source import SourceConfig

    SourceConfig(context_size=cfg.context_size, input_hook=cfg.input_hook, output_hook=cfg.output_hook).validate(model)
    trainer = Trainer(cfg, adapter.n_layers(model), int(model.config.hidden_size),  # type: ignore[union-attr,arg-type]
                      model_name=getattr(model.config, "_name_or_path", "") or cfg.model)
    out = Path(cfg.out_dir)
    checkpoint = trainer.latest_checkpoint()
    if checkpoint is not None and not resume:
        raise ConfigError(f"{out} already has checkpoint {checkpoint.name}; pass --resume to continue it, "
                          "or choose another out_dir")
    if resume and checkpoint is None and trainer.rank == 0:
        print(f"no checkpoint in {trainer.checkpoint_root}; starting from scratch")
    out.mkdir(parents=True, exist_ok=True)
    batches = _batches(cfg, model, tokenizer)
    if checkpoint is not None and resume:
        trainer.load_checkpoint(checkpoint)
        for _ in range(trainer.step):  # replay the deterministic stream to the saved position
            next(batches)
    log = (out / "train_log.jsonl").open("a") if trainer.rank == 0 else None
    writer = _tensorboard(out) if cfg.tensorboard and trainer.rank == 0 else None
    bar = tqdm(total=cfg.total_steps, initial=trainer.step, desc="training", unit="step",
               disable=not progress or trainer.rank != 0)
    t0 = time.perf_counter()
    while trainer.step < cfg.total_steps:
        x, y = next(batches)
        if trainer.step == 0:
            trainer.fit_scales(x, y)
        stats = trainer.train_step(x, y)
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.total_steps:
            stats["tokens_per_s"] = cfg.log_every * cfg.batch_size / max(1e-9, time.perf_counter() - t0)
            t0 = time.perf_counter()
            trainer.history.append(stats)
            bar.set_postfix(loss=f"{stats['loss']:.3g}", l0=f"{stats['l0']:.1f}", fvu=f"{stats['fvu']:.3f}",
                            dead=f"{stats['dead']:.2f}")
            if log is not None:
                log.write(json.dumps(stats) + "\n")
                log.flush()
            if writer is not None:
                for key, value in stats.items():
                    writer.add_scalar(f"train/{key}", value, trainer.step)
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.total_steps:
            trainer.save_checkpoint()
    bar.close()
    tc = trainer.export()
    final = out / "transcoder"
    if trainer.rank == 0:
        last = trainer.history[-1] if trainer.history else {}
        tc.cfg.metrics = {k: round(float(last[k]), 6) for k in ("fvu", "l0", "dead") if k in last}
        tc.cfg.metrics["train_tokens"] = trainer.step * cfg.batch_size
        if cfg.eval_dataset:
            from clt_hub.evaluate import evaluate, plot_layers

            report = evaluate(model, tokenizer, tc, cfg.eval_dataset, n_tokens=cfg.eval_tokens,
                              text_field=cfg.text_field, context_size=cfg.context_size)
            tc.cfg.metrics.update(report.summary())
            plot_layers(report, out / "layers.png")
            (out / "eval.json").write_text(json.dumps(report.to_dict(), indent=1))
        tc.save_pretrained(final)
        from clt_hub.evaluate import plot_training

        plot_training(trainer.history, out / "training_curves.png")
        if cfg.push_to_hub:
            tc.push_to_hub(cfg.push_to_hub)
        if log is not None:
            log.close()
    trainer._barrier()
    return final


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed; logging to train_log.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def init_distributed() -> None:
    """Join the torchrun group (gloo on CPU, nccl on GPU) when launched by torchrun."""
    import torch.distributed as dist

    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
