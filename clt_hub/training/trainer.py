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
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt_hub.errors import CltHubError, ConfigError
from clt_hub.loading.atomic import ARTIFACT_MARKERS, atomic_directory
from clt_hub.loading.lazy import read_header
from clt_hub.models.adapters import adapter_for
from clt_hub.models.known import public_name
from clt_hub.models.loading import load_model
from clt_hub.training.activation_store import (
    ActivationCache,
    SourceConfig,
    model_activations,
    shuffled_batches,
)
from clt_hub.training.config import (
    SHAPE_FIELDS,
    TrainConfig,
    config_changes,
    describe_changes,
    model_shape,
)
from clt_hub.training.distributed import (
    all_reduce,
    barrier,
    gather_features,
    rank_world,
    sum_over_ranks,
)
from clt_hub.training.evaluate import evaluate
from clt_hub.training.plots import plot_layers, plot_training
from clt_hub.training.texts import (
    BadRecordError,
    SkippedRecords,
    check_source,
    data_card,
    iter_texts,
)
from clt_hub.transcoders.sparse import ActiveIndex, active_preacts
from clt_hub.transcoders.transcoder import Transcoder


class TrainingError(CltHubError):
    """Training cannot go on (NaN loss, unwritable checkpoint); the message names the last good checkpoint."""


# ----------------------------------------------------------------------------- the model being trained
def latest_checkpoint(root: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The last complete checkpoint folder (step_*/state.json) under `root` whose files can be read, or None.
    A newer one that cannot (its tensors truncated by a full disk, say) is passed over for the one before it,
    and `report` is told which and why."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    for folder in reversed(done):
        why = _unreadable(folder)
        if why is None:
            return folder
        if report:
            report(f"checkpoint {folder} cannot be read ({why}); an earlier one is used")
    return None


def _set_aside_unreadable(root: Path, used: Path | None) -> None:
    """Rename the unreadable checkpoints newer than `used` to damaged_step_*: kept for a look, out of the way of
    the resumed run, which writes those steps again."""
    if rank_world()[0] != 0 or not root.is_dir():
        return
    for folder in sorted(root.glob("step_*")):
        if (folder / "state.json").is_file() and (used is None or folder.name > used.name):
            aside = folder.with_name("damaged_" + folder.name)
            folder.rename(aside)
            _say(f"moved it to {aside}")


def _unreadable(folder: Path) -> str | None:
    """Why a checkpoint's state cannot be loaded (None: it can), from its JSON and its safetensors header, which
    is checked against the file's size; no tensor is read."""
    try:
        json.loads((folder / "state.json").read_text())
        read_header(folder / "state.safetensors")
    except (OSError, ValueError, CltHubError) as exc:
        return str(exc).splitlines()[0].split("; ")[0] if str(exc) else type(exc).__name__
    return None


SHARDED = ("W_enc", "b_enc", "threshold", "W_dec")   # feature dim first: split across ranks; the rest replicated


def _schedule(step: int, cfg: TrainConfig) -> float:
    total = cfg.total_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1 - cfg.decay_fraction))
    if cfg.decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def _adamw(tc: Transcoder, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; on CPU torch's fused kernel where this torch has one (2.4+): one pass over each tensor instead of
    about seven, 4.7x faster over a Gemma-3-270M CLT's 2,048-feature decoders here (0.37 s against 1.76 s a
    step), the same update up to rounding. Elsewhere torch's default. Each parameter group carries an
    `lr_scale` (the skip path's is `skip_lr_scale`; one group when that is 1, as in earlier checkpoints)."""
    params: list[Any] = list(tc.parameters())
    if tc.cfg.skip and cfg.skip_lr_scale != 1:
        skip = {id(p) for p in tc.W_skip}
        params = [{"params": [p for p in params if id(p) not in skip], "lr_scale": 1.0},
                  {"params": list(tc.W_skip), "lr_scale": float(cfg.skip_lr_scale)}]
    kw: dict[str, Any] = {"lr": cfg.lr, "betas": (0.9, 0.999), "weight_decay": cfg.weight_decay}
    if device.type == "cpu":
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):  # a torch without the fused CPU kernel
            pass
    return torch.optim.AdamW(params, **kw)


class Trainer:
    """Holds the transcoder (or this rank's feature slice), the optimiser and the run's state."""

    def __init__(self, cfg: TrainConfig, n_layers: int, d_model: int, model_name: str = ""):
        self.cfg = cfg
        arch = cfg.transcoder
        self.rank, self.world = rank_world()
        self.features_parallel = cfg.parallel == "features" and self.world > 1
        if self.features_parallel:
            if arch.d_sae % self.world:
                raise ConfigError(f"d_sae={arch.d_sae} features do not divide across {self.world} ranks; "
                                  f"use a multiple of {self.world}")
            if arch.activation == "topk":
                raise ConfigError("TopK needs all of a layer's features on one rank; use parallel='data'")
        if cfg.batch_size % self.world and not self.features_parallel:
            raise ConfigError(f"batch_size={cfg.batch_size} does not divide across {self.world} ranks")
        if cfg.batch_topk and self.world > 1 and not self.features_parallel:
            raise ConfigError("BatchTopK ranks the whole batch; it cannot be split across ranks (use one process)")
        self.n_layers, self.d_model = n_layers, d_model
        cfg.check_memory(n_layers, d_model)  # before the transcoder and its optimiser are allocated
        shards = self.world if self.features_parallel else 1
        self.local_f = arch.d_sae // shards
        self.tc_cfg = arch.sized(n_layers, d_model, model_name=model_name, context_size=cfg.context_size,
                                 dataset_path=cfg.dataset)
        # this rank's slice of the features: a transcoder of its own, initialised as a slice of the whole
        self.device = torch.device(cfg.device)
        self.tc = Transcoder.from_config(dataclasses.replace(self.tc_cfg, d_sae=self.local_f), device=self.device,
                                         dtype=torch.float32)
        self.tc.reset_parameters(torch.Generator().manual_seed(cfg.seed), threshold=cfg.threshold_init,
                                 shard=(self.rank if self.features_parallel else 0, shards))
        self.optimizer = _adamw(self.tc, cfg, self.device)
        self.step = 0
        self.scale_in = torch.ones(n_layers)
        self.scale_out = torch.ones(n_layers)
        self.last_fired = torch.zeros(n_layers, self.local_f, dtype=torch.long)  # step of last activation
        self.history: list[dict[str, float]] = []
        self.config_changes: list[dict[str, Any]] = []  # resumes that changed the config (allow_config_change)

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_scales(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Per-layer scalars making E||x||^2 = E||y||^2 = d_model on this batch (same on every rank)."""
        d = self.d_model
        self.scale_in = (d / x.pow(2).sum(-1).mean(0).clamp(min=1e-12)).sqrt().cpu()
        self.scale_out = (d / y.pow(2).sum(-1).mean(0).clamp(min=1e-12)).sqrt().cpu()

    @torch.no_grad()
    def fit_skip(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each layer's skip path and output bias set to the least-squares affine map from its (scaled) MLP input
        to its (scaled) MLP output over `batches`: the best a transcoder with no features can do, so the
        features start by learning what that map leaves. Solved in float64 from the normal equations, with a
        ridge of 1e-8 of their mean diagonal (the same on every rank: every rank sees the whole batches)."""
        L, d = self.n_layers, self.d_model
        gram = torch.zeros(L, d + 1, d + 1, dtype=torch.float64)
        cross = torch.zeros(L, d + 1, d, dtype=torch.float64)
        for x, y in batches:
            xs = x.double() * self.scale_in.double()[None, :, None]
            ys = y.double() * self.scale_out.double()[None, :, None]
            xa = torch.cat([xs, torch.ones(*xs.shape[:2], 1, dtype=torch.float64)], dim=-1)   # [N, L, d+1]
            gram += torch.einsum("nli,nlj->lij", xa, xa)
            cross += torch.einsum("nli,nlj->lij", xa, ys)
        ridge = 1e-8 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)                                 # [L]
        solution = torch.linalg.solve(gram + ridge[:, None, None] * torch.eye(d + 1, dtype=torch.float64), cross)
        for l in range(L):
            self.tc.W_skip[l].copy_(solution[l, :d].T.to(self.tc.W_skip[l].dtype))
            self.tc.b_dec[l].copy_(solution[l, d].to(self.tc.b_dec[l].dtype))

    # ------------------------------------------------------------------ one step
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations and activations [B, L, F_local] (BatchTopK ranks the whole batch per layer)."""
        # layer by layer from a list, stacked once: indexing a stacked tensor per layer (pre[:, l]) makes its
        # backward allocate and zero a whole [B, L, F] gradient per layer, L^2 work that was most of a step
        pres = [self.tc.pre_activations(x[:, l], l) for l in range(self.n_layers)]
        pre = torch.stack(pres, dim=1)
        if self.cfg.batch_topk:
            k = self.tc_cfg.topk
            assert k is not None
            B = pre.shape[0]
            flat = torch.relu(pre).permute(1, 0, 2).reshape(self.n_layers, -1)      # [L, B*F]
            vals, idx = flat.topk(k * B, dim=-1)
            acts = torch.zeros_like(flat).scatter(-1, idx, vals).reshape(self.n_layers, B, -1).permute(1, 0, 2)
            return pre, acts
        acts = torch.stack([self.tc.activate(p, l) for l, p in enumerate(pres)], dim=1)
        return pre, acts

    @property
    def sparse_decode(self) -> bool:
        """Whether steps decode from the active entries (clt_hub.transcoders.sparse): TopK/BatchTopK unless the
        config says otherwise. The same function as the dense decode, at a cost that follows k, not d_sae."""
        chosen = self.cfg.sparse_decode
        return self.tc_cfg.activation == "topk" if chosen is None else bool(chosen)

    def _encode_active(self, x: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[ActiveIndex]]:
        """TopK/BatchTopK as active entries: pre-activations [B, L, F_local] (computed without autograd: the
        choice needs all of them), the activations [B, L, F_local] (no autograd, for the statistics), and per
        layer the chosen entries' values (with autograd through `active_preacts`) and their index."""
        k = self.tc_cfg.topk
        assert k is not None
        B, F = x.shape[0], self.local_f
        with torch.no_grad():
            pres = [self.tc.pre_activations(x[:, l], l) for l in range(self.n_layers)]
            pre = torch.stack(pres, dim=1)
        chosen: list[tuple[torch.Tensor, ActiveIndex]] = []
        if self.cfg.batch_topk:
            with torch.no_grad():  # the same ranking as _encode: all B*F entries of a layer at once
                flat = torch.relu(pre).permute(1, 0, 2).reshape(self.n_layers, -1)
                top = flat.topk(k * B, dim=-1).indices
            for l in range(self.n_layers):
                idx, entries = ActiveIndex.from_flat(top[l], B, F)
                chosen.append((pres[l].reshape(-1)[entries], idx))
        else:
            for l in range(self.n_layers):
                vals, top = pres[l].topk(k, dim=-1)          # as topk_relu does
                chosen.append((vals.reshape(-1), ActiveIndex.from_topk(top, F)))
        values = [torch.relu(active_preacts(c, x[:, l], self.tc.W_enc[l], self.tc.b_enc[l], idx))
                  for l, (c, idx) in enumerate(chosen)]
        index = [idx for _, idx in chosen]
        with torch.no_grad():
            acts = torch.zeros_like(pre)
            for l, (v, idx) in enumerate(zip(values, index, strict=True)):
                acts[:, l].index_put_((idx.pos, idx.feat), v.detach().to(acts.dtype))
        return pre, acts, values, index

    def _dead_mask(self) -> torch.Tensor:
        """[L, F_local] bool: features that fired in none of the last `dead_after_tokens` tokens (AuxK's dead
        latents; unlike the logged fraction, no feature counts as dead before that many tokens were seen)."""
        window = -(-self.cfg.dead_after_tokens // self.cfg.batch_size)   # steps
        return ((self.step - self.last_fired) >= window).to(self.device)

    def _auxk(self, x: torch.Tensor, y: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): the top `auxk_k` dead features of
        each token and layer, by pre-activation, reconstruct the main reconstruction's error e = y - recon
        (e taken as fixed: only the dead features learn from it), through their decoders alone (no bias, no
        skip; a CLT feature writes to every later layer as usual). Returns sum over layers of ||e - e_hat||^2,
        mean over tokens: the mse's units. Decoded from the active entries, so its cost follows auxk_k."""
        dead = self._dead_mask()
        if not bool(dead.any()):
            return torch.zeros((), device=recon.device)
        B, F = x.shape[0], self.local_f
        k = min(self.cfg.auxk_k, F)
        values: list[torch.Tensor] = []
        index: list[ActiveIndex] = []
        for l in range(self.n_layers):
            with torch.no_grad():
                masked = pre[:, l].detach().masked_fill(~dead[l], float("-inf"))
                vals, top = masked.topk(k, dim=-1)
                keep = (vals > 0).reshape(-1)                  # dead and positive (ReLU of the rest is 0)
                pos = torch.arange(B, device=x.device).repeat_interleave(k)[keep]
            idx = ActiveIndex.from_entries(pos, top.reshape(-1)[keep], B, F)
            values.append(torch.relu(active_preacts(vals.reshape(-1)[keep], x[:, l], self.tc.W_enc[l],
                                                    self.tc.b_enc[l], idx)))
            index.append(idx)
        e_hat = self.tc.decode_active(values, index, biases=False,
                                      reduce=sum_over_ranks if self.features_parallel else None)
        e = (y - recon.to(y.dtype)).detach()
        return (e_hat.to(y.dtype) - e).pow(2).sum(-1).sum(-1).mean()

    def sparsity_coefficient(self) -> float:
        """This step's `lam`: sparsity_coeff ramped up over sparsity_warmup_fraction of the steps."""
        cfg = self.cfg
        return cfg.sparsity_coeff * min(1.0, (self.step + 1) / max(1, cfg.sparsity_warmup_fraction * cfg.total_steps))

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The loss on a batch in training units (x, y [B, L, d] already times scale_in / scale_out), term by
        term at this step's sparsity coefficient `lam`: `mse`, `sparsity`, `preact`, `auxk` (per-token means
        before their coefficients) and `loss`, plus `pre`, `acts`, `recon`, `err` [B, L] for the step's
        statistics. TopK has no sparsity or preact term (both returned as 0, not computed); `auxk` is 0 unless
        auxk_coeff > 0. train_step minimises `loss`; experiments score a dictionary with the trainer's own
        objective."""
        cfg = self.cfg
        topk = self.tc_cfg.activation == "topk"
        reduce = sum_over_ranks if self.features_parallel else None
        skip_x = x if self.tc_cfg.skip else None
        if self.sparse_decode:
            pre, acts, values, index = self._encode_active(x)
            recon = self.tc.decode_active(values, index, skip_x, reduce=reduce)
        else:
            pre, acts = self._encode(x)
            recon = self.tc.decode(acts, skip_x, reduce=reduce, dense=True)
        err = (recon.to(y.dtype) - y).pow(2).sum(-1)           # [B, L]
        mse = err.sum(-1).mean()
        zero = torch.zeros((), device=mse.device)
        lam = self.sparsity_coefficient()
        sparsity = preact = auxk = zero
        loss = mse
        if not topk:  # the decoder norms only weigh the sparsity and pre-activation terms
            norms = self.tc.decoder_norms()                    # [L, F_local]
            sparsity = torch.tanh(cfg.sparsity_c * acts.float() * norms[None]).sum((-1, -2)).mean()
            # sparsity_per_d_model: the penalty in the MSE's own scale (a layer's target has mean squared norm
            # d_model in training units), so lam prices one active feature per layer in fractions of that energy
            loss = loss + lam * (self.d_model if cfg.sparsity_per_d_model else 1) * sparsity
            if self.tc_cfg.activation == "jumprelu" and cfg.preact_coeff > 0:
                theta = torch.stack(list(self.tc.threshold))   # [L, F_local]
                preact = (torch.relu(theta[None] - pre) * norms[None]).sum((-1, -2)).mean()
                loss = loss + cfg.preact_coeff * preact
        elif cfg.auxk_coeff > 0:
            auxk = self._auxk(x, y, pre, recon)
            loss = loss + cfg.auxk_coeff * auxk
        return {"mse": mse, "sparsity": sparsity, "preact": preact, "auxk": auxk, "lam": lam, "loss": loss,
                "pre": pre, "acts": acts, "recon": recon, "err": err}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """x, y: the full global batch [B, L, d] (raw activations); each rank takes its part."""
        cfg = self.cfg
        x = (x.to(self.device) * self.scale_in.to(self.device)[None, :, None])
        y = (y.to(self.device) * self.scale_out.to(self.device)[None, :, None])
        if self.world > 1 and not self.features_parallel:
            part = x.shape[0] // self.world
            x, y = x[self.rank * part:(self.rank + 1) * part], y[self.rank * part:(self.rank + 1) * part]
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * _schedule(self.step, cfg) * group.get("lr_scale", 1.0)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            terms = self.loss_terms(x, y)
        acts, err, mse, loss, lam = (terms[k] for k in ("acts", "err", "mse", "loss", "lam"))
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
            if self.world > 1 and not self.features_parallel:       # a feature fired if it fired on any rank
                fired = all_reduce(fired.to(torch.int32)) > 0
            self.last_fired[fired.cpu()] = self.step + 1
            l0 = (acts > 0).float().sum(-1).mean()
            var = (y - y.mean(0, keepdim=True)).pow(2).sum(-1).sum(0)  # [L]
            stats = torch.stack([err.sum(0).sum(), var.sum(), l0 * (x.shape[0]), torch.tensor(float(x.shape[0]))])
            if self.world > 1 and not self.features_parallel:
                all_reduce(stats)
            l0_total = l0.clone()
            if self.features_parallel:
                all_reduce(l0_total)  # features add up across shards
                stats[2] = l0_total * stats[3]
            # silent for dead_after_tokens, or for the whole run so far while it is shorter than that (else
            # a run shorter than the window would log 0 dead however many features never fire)
            dead_steps = max(1, min(cfg.dead_after_tokens // cfg.batch_size, self.step + 1))
            dead = ((self.step + 1 - self.last_fired) >= dead_steps).float().mean()
            if self.features_parallel:
                dead = all_reduce(dead.clone(), average=True)
        self.step += 1
        out = {"step": self.step, "loss": float(loss.detach()), "mse": float(mse.detach()),
               "fvu": float(stats[0] / stats[1].clamp(min=1e-12)), "l0": float(stats[2] / stats[3]),
               "dead": float(dead), "lr": self.optimizer.param_groups[0]["lr"], "sparsity_coeff": lam}
        if cfg.auxk_coeff > 0:
            out["auxk"] = float(terms["auxk"].detach())
        return out

    def _sync_gradients(self) -> None:
        if self.world == 1 or self.features_parallel:
            return  # feature shards own their gradients; replicated params got identical ones
        for p in self.tc.parameters():
            if p.grad is not None:
                all_reduce(p.grad, average=True)

    def _clip_gradients(self) -> None:
        sharded: list[torch.Tensor] = []
        replicated: list[torch.Tensor] = []
        for name, p in self.tc.named_parameters():
            if p.grad is None:
                continue
            (sharded if name.split(".")[0] in SHARDED else replicated).append(p.grad)
        # vector_norm, not g.pow(2).sum(): no squared copy of every gradient (0.04 s against 0.65 s a step over a
        # Gemma-3-270M CLT's 2,048-feature decoders)
        sq = torch.zeros((), device=self.device)
        for g in sharded:
            sq = sq + torch.linalg.vector_norm(g).pow(2)
        if self.features_parallel:
            all_reduce(sq)
        for g in replicated:
            sq = sq + torch.linalg.vector_norm(g).pow(2)
        total = sq.sqrt()
        factor = (self.cfg.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        if float(factor) < 1.0:  # times exactly 1 changes nothing: skip the pass
            for g in sharded + replicated:
                g.mul_(factor)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return Path(self.cfg.out_dir) / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_root)

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue exactly, as full (all-rank) tensors plus JSON metadata."""
        tensors: dict[str, torch.Tensor] = {}
        opt_state = self.optimizer.state
        for name, p in self.tc.named_parameters():
            shard = self.features_parallel and name.split(".")[0] in SHARDED
            full = (lambda t: gather_features(t)) if shard else (lambda t: t)  # noqa: E731
            tensors[f"param.{name}"] = full(p.detach()).cpu()
            st = opt_state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"adam.{key}.{name}"] = full(st[key]).cpu()
            if "step" in st:
                tensors[f"adam.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        tensors["scale_in"] = self.scale_in.clone()
        tensors["scale_out"] = self.scale_out.clone()
        tensors["last_fired"] = gather_features(self.last_fired.T.contiguous()).T.contiguous() if self.features_parallel \
            else self.last_fired.clone()
        tensors["rng_torch"] = torch.get_rng_state()
        meta = {"step": self.step, "config": dataclasses.asdict(self.cfg), "tc_config": self.tc_cfg.to_dict(),
                "world_size": self.world, "history": self.history, "config_changes": self.config_changes}
        return tensors, meta

    def save_checkpoint(self) -> Path | None:
        """Atomic: a checkpoint folder is complete (state.json written last) or absent."""
        from safetensors.torch import save_file

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
        barrier()
        return path

    @torch.no_grad()
    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        lo = self.rank * self.local_f if self.features_parallel else 0
        sl = slice(lo, lo + self.local_f)
        params = dict(self.tc.named_parameters())
        saved = {k.removeprefix("param."): tuple(v.shape) for k, v in tensors.items() if k.startswith("param.")}
        for name, p in params.items():  # check everything before changing anything
            shard = name.split(".")[0] in SHARDED
            want = ((self.tc_cfg.d_sae, *p.shape[1:]) if shard else tuple(p.shape))
            if saved.get(name) != want:
                got = "no such tensor" if name not in saved else f"shape {saved[name]}"
                raise ConfigError(f"checkpoint {path} has {got} for {name}, where this run's config needs "
                                  f"{want}; resume with the config it was written with, or choose another out_dir")
        extra = sorted(saved.keys() - params.keys())
        if extra:
            raise ConfigError(f"checkpoint {path} holds tensors this run's config has no place for ({', '.join(extra[:4])}); "
                              "resume with the config it was written with, or choose another out_dir")
        for name, p in params.items():
            shard = name.split(".")[0] in SHARDED
            full = tensors[f"param.{name}"]
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
        self.config_changes = list(meta.get("config_changes", []))

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
            if self.tc_cfg.activation == "jumprelu":
                tc.threshold[l].copy_(tensors[f"param.threshold.{l}"])
            if self.tc_cfg.skip:
                tc.W_skip[l].copy_(tensors[f"param.W_skip.{l}"] * s_in[l] / s_out[l])
        return tc


# ----------------------------------------------------------------------------- the run
def _batches(cfg: TrainConfig, model: nn.Module, tokenizer: Any, skipped: SkippedRecords
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's batch stream, identical on every rank and on every (re)start (so resume can replay it).
    Bad records of the first pass over the text (or of the cache build) are counted in `skipped`."""
    arch = cfg.transcoder
    src = SourceConfig(context_size=cfg.context_size, input_hook=arch.feature_input_hook,
                       output_hook=arch.feature_output_hook,
                       model_batch=cfg.model_batch)

    def texts(counter: SkippedRecords) -> Iterator[str]:
        return iter_texts(cfg.dataset, split=cfg.split, text_field=cfg.text_field, bad_records=cfg.bad_records,
                          skipped=counter)

    if cfg.cache_dir:
        cache_path = Path(cfg.cache_dir)
        if not (cache_path / "manifest.json").is_file():
            if rank_world()[0] == 0:
                ActivationCache.build(model, tokenizer, texts(skipped), cache_path, cfg.cache_tokens or cfg.n_tokens, src,
                                      dtype=cfg.cache_dtype, progress=True)
            barrier()
        cache = ActivationCache(cache_path)
        if cache.n_tokens < cfg.batch_size:
            raise ConfigError(f"activation cache {cache_path} holds {cache.n_tokens} tokens, less than one batch")
        epoch = 0
        while True:
            yield from cache.batches(cfg.batch_size, cfg.seed, epoch)
            epoch += 1
    epoch = 0
    while True:
        n = 0
        counter = skipped if epoch == 0 else SkippedRecords()  # later passes meet the same records again
        for batch in shuffled_batches(model_activations(model, tokenizer, texts(counter), src), cfg.batch_size,
                                      cfg.buffer_tokens, cfg.seed + epoch):
            n += 1
            yield batch
        if n == 0:
            raise ConfigError(f"dataset {cfg.dataset} has fewer tokens than one batch of {cfg.batch_size}")
        epoch += 1  # small datasets repeat, reshuffled


def _say(message: str) -> None:
    if rank_world()[0] == 0:
        print(message, file=sys.stderr, flush=True)


def _probe_write(folder: Path, out: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".clt_hub_write_check.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"out_dir {out} is not writable: cannot create files in {folder} "
                          f"({exc.strerror or exc}); choose another out_dir or fix its permissions") from None


def check_out_dir(out: Path) -> None:
    """Fail before any heavy work if the run folder cannot hold the run: a file, a file on its path, a folder
    without write permission, or a checkpoints/, transcoder/ or train_log.jsonl of the wrong kind."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; give a folder for the run (it holds checkpoints/, "
                          "train_log.jsonl and transcoder/)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out_dir {out} cannot be created: {existing} is a file; choose another out_dir")
    for folder in (existing, out / "checkpoints"):
        if folder.is_dir():
            _probe_write(folder, out)
    for name, is_folder in (("checkpoints", True), ("transcoder", True), ("train_log.jsonl", False)):
        path = out / name
        if path.exists() and path.is_dir() != is_folder:
            raise ConfigError(f"{path} is a {'file' if is_folder else 'folder'}, where the run writes its {name}; "
                              "move it away or choose another out_dir")
    final = out / "transcoder"
    if final.is_dir() and any(final.iterdir()) and not any((final / m).exists() for m in ARTIFACT_MARKERS):
        raise ConfigError(f"{final} holds files that are not a transcoder artifact, and the run would replace it; "
                          "move them away or choose another out_dir")


def _resume_point(cfg: TrainConfig, resume: bool, allow_config_change: bool
                  ) -> tuple[Path | None, dict[str, tuple[Any, Any]]]:
    """The checkpoint to continue (None: start afresh) and the config fields changed since it was written.
    Refuses, before anything is loaded, to start over a checkpoint or to continue one with another config."""
    out = Path(cfg.out_dir)
    checkpoint = latest_checkpoint(out / "checkpoints", report=_say if resume else None)
    if resume:
        _set_aside_unreadable(out / "checkpoints", checkpoint)
    if checkpoint is None:
        if resume:
            _say(f"no checkpoint in {out / 'checkpoints'}; starting from scratch")
        return None, {}
    if not resume:
        raise ConfigError(f"{out} already has checkpoint {checkpoint.name}; pass --resume to continue it, "
                          "or choose another out_dir")
    try:
        saved = json.loads((checkpoint / "state.json").read_text())["config"]
        if not isinstance(saved, dict):
            raise TypeError("'config' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {checkpoint} has an unreadable state.json ({exc}); delete that folder "
                          "to resume from the checkpoint before it") from None
    changes = config_changes(saved, cfg)
    if not changes:
        return checkpoint, {}
    reshaped = {k: v for k, v in changes.items() if k in SHAPE_FIELDS
                and (k != "transcoder.activation" or "jumprelu" in v)}  # relu <-> topk keep the same tensors
    if reshaped:
        raise ConfigError(f"cannot resume checkpoint {checkpoint} with {describe_changes(reshaped)}: the trained "
                          "weights have other shapes, so no override can continue them. Resume with the config "
                          "it was written with, or choose another out_dir for a new run")
    if not allow_config_change:
        raise ConfigError(f"checkpoint {checkpoint} was written with another training config (changed: "
                          f"{describe_changes(changes)}). Resume with the config it was written with, or pass "
                          "allow_config_change=True (CLI: --allow-config-change) to continue it with the new "
                          "settings (the artifact will describe them)")
    _say(f"warning: continuing {checkpoint} with a changed training config: {describe_changes(changes)}")
    return checkpoint, changes


def _check_data(cfg: TrainConfig, progress: bool) -> dict[str, int]:
    """Every text source the run will read opens and gives text, and (local files, read whole) has no bad
    record in "raise" mode; in "skip" mode the bad ones are counted and named once, up front. Returns the
    bad-record count of each source read whole ('dataset', 'eval_dataset')."""
    counts: dict[str, int] = {}
    cache_ready = bool(cfg.cache_dir) and (Path(str(cfg.cache_dir)) / "manifest.json").is_file()
    sources = [] if cache_ready else [("dataset", cfg.dataset, cfg.split)]
    if cfg.eval_dataset:
        sources.append(("eval_dataset", cfg.eval_dataset, "train"))
    for what, source, split in sources:
        try:
            found = check_source(source, split=split, text_field=cfg.text_field, bad_records=cfg.bad_records,
                                 what=what, progress=progress and rank_world()[0] == 0)
        except BadRecordError as exc:
            raise BadRecordError(exc.where, f"{exc.reason}. Nothing was trained: fix or remove it, or set "
                                 "bad_records=skip (CLI: --set bad_records=skip) to leave such records out "
                                 "with a count") from None
        if found.skipped.count:
            _say(f"warning: {what} {source}: {found.skipped.summary()}; they are left out (bad_records=skip)")
        if found.scanned:
            counts[what] = found.skipped.count
    return counts


def _trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (the checkpoint the run continues; 0 for a fresh start), so
    steps replayed after a resume are not logged twice. Atomic: the old log stays whole until replaced."""
    if not path.is_file():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    dropped = 0
    try:
        with path.open(encoding="utf-8", errors="replace") as src, tmp.open("w", encoding="utf-8") as dst:
            for line in src:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    record = None
                logged = record.get("step") if isinstance(record, dict) else None
                if isinstance(logged, int) and 0 < logged <= step:
                    dst.write(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
            dst.flush()
            os.fsync(dst.fileno())
        if dropped:
            os.replace(tmp, path)
        else:
            tmp.unlink()
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot rewrite {path} ({exc.strerror or exc})") from None


def _stopped(trainer: Trainer, exc: BadRecordError) -> TrainingError:
    """A bad record met mid-run (a streamed dataset cannot be checked ahead): keep the steps done so far."""
    last = trainer.latest_checkpoint()
    if trainer.step > (int(last.name.removeprefix("step_")) if last is not None else 0):
        last = trainer.save_checkpoint()
    kept = f"checkpoint {last} holds step {trainer.step}" if last is not None else "nothing was trained yet"
    return TrainingError(f"{exc}; training stopped ({kept}). Fix the data, or set bad_records=skip "
                         "(CLI: --set bad_records=skip) and continue with --resume")


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, model: nn.Module | None = None,
          tokenizer: Any = None, allow_config_change: bool = False) -> Path:
    """Train, checkpoint, export. Returns the artifact folder (out_dir/transcoder).

    Before the model is loaded: the device must be there, the transcoder's training must fit in its memory
    (`TrainConfig.check_memory`, on the shape of `model` or, when none is given, of the model's config alone;
    `Trainer` checks it again before it allocates), the run folder must be writable, a checkpoint there needs
    `resume=True`, and resuming refuses a changed training config (fields outside `FREE_ON_RESUME`) unless
    `allow_config_change`; the dataset and eval_dataset must open and give text, and local ones are scanned for
    bad records."""
    from tqdm.auto import tqdm

    cfg.check_device()
    shape: tuple[int, int] | None = None
    if model is not None and tokenizer is not None:  # the model this run trains on
        shape = adapter_for(model).n_layers(model), int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    else:  # the model's config alone, read before its weights (None when it is not on this machine)
        shape = model_shape(cfg.model)
    if shape is not None:
        cfg.check_memory(*shape)
    out = Path(cfg.out_dir)
    check_out_dir(out)
    checkpoint, changes = _resume_point(cfg, resume, allow_config_change)
    bad_counts = _check_data(cfg, progress)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model)
    adapter = adapter_for(model)
    SourceConfig(context_size=cfg.context_size, input_hook=cfg.transcoder.feature_input_hook,
                 output_hook=cfg.transcoder.feature_output_hook).validate(model)
    trainer = Trainer(cfg, adapter.n_layers(model), int(model.config.hidden_size),  # type: ignore[union-attr,arg-type]
                      model_name=public_name(model, cfg.model))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create out_dir {out} ({exc.strerror or exc})") from None
    remote = not Path(cfg.dataset).exists()
    skipped = SkippedRecords(on_first=(lambda msg: _say(f"warning: {msg}")) if remote else None)
    cache_ready = bool(cfg.cache_dir) and (Path(str(cfg.cache_dir)) / "manifest.json").is_file()
    batches = _batches(cfg, model, tokenizer, skipped)
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
        if changes:
            trainer.config_changes.append({"step": trainer.step, "changes": {k: list(v) for k, v in changes.items()}})
    if trainer.rank == 0:
        _trim_log(out / "train_log.jsonl", trainer.step)
    log = (out / "train_log.jsonl").open("a") if trainer.rank == 0 else None
    writer = _tensorboard(out) if cfg.tensorboard and trainer.rank == 0 else None
    bar = tqdm(total=cfg.total_steps, initial=trainer.step, desc="training", unit="step",
               disable=not progress or trainer.rank != 0)
    try:
        # replay the deterministic stream to the saved position; without an activation cache this reruns the
        # model's forward pass over every token already trained on, which takes minutes on a real model
        replay = tqdm(range(trainer.step), desc="replaying data" if cache_ready else
                      "replaying data (model forward; cache_dir makes this a read)", unit="step", leave=False,
                      disable=not progress or trainer.rank != 0 or trainer.step == 0)
        for _ in replay:
            next(batches)
        replay.close()
        if trainer.step == 0 and cfg.skip_init_tokens:
            # the first batches fit the skip path, then are trained on as usual (a resumed run has the fit in
            # its checkpoint and replays these batches above)
            first = [next(batches) for _ in range(-(-cfg.skip_init_tokens // cfg.batch_size))]
            trainer.fit_scales(*first[0])
            trainer.fit_skip(first)
            batches = itertools.chain(first, batches)
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
    except BadRecordError as exc:
        raise _stopped(trainer, exc) from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    tc = trainer.export()
    final = out / "transcoder"
    if trainer.rank == 0:
        last = trainer.history[-1] if trainer.history else {}
        # the last logged training batch (held-out figures from --eval-dataset replace fvu below)
        tc.cfg.metrics = {k: round(float(last[v]), 6) for k, v in
                          (("fvu", "fvu"), ("l0", "l0"), ("train_dead_fraction", "dead")) if v in last}
        tc.cfg.metrics["train_tokens"] = trainer.step * cfg.batch_size
        tc.cfg.metrics.update({f"data_{k}": v for k, v in data_card(cfg.dataset).items()})
        # bad records left out: of the whole local dataset (scanned up front), or of the streamed text read
        if cfg.bad_records == "skip" and "dataset" in bad_counts:
            tc.cfg.metrics["skipped_records"] = bad_counts["dataset"]
        elif cfg.bad_records == "skip" and not cache_ready:  # (a cache built earlier read its text then)
            tc.cfg.metrics["skipped_records"] = skipped.count
            if skipped.count:
                _say(f"warning: dataset {cfg.dataset}: {skipped.summary()} in the text this run read")
        if cfg.eval_dataset:
            eval_skipped = SkippedRecords()
            texts = iter_texts(cfg.eval_dataset, text_field=cfg.text_field, bad_records=cfg.bad_records,
                               skipped=eval_skipped)
            try:
                report = evaluate(model, tokenizer, tc, texts, n_tokens=cfg.eval_tokens, context_size=cfg.context_size,
                                  progress=progress and trainer.rank == 0)
            except BadRecordError as exc:
                raise TrainingError(f"{exc}; the trained weights are in checkpoint {trainer.latest_checkpoint()}: "
                                    "fix the data or set bad_records=skip, and evaluate and export them with "
                                    "--resume") from None
            tc.cfg.metrics.update(report.summary())
            if cfg.bad_records == "skip":
                tc.cfg.metrics["eval_skipped_records"] = bad_counts.get("eval_dataset", eval_skipped.count)
            plot_layers(report, out / "layers.png")
            (out / "eval.json").write_text(json.dumps(report.to_dict(), indent=1))
        tc.save_pretrained(final)
        plot_training(trainer.history, out / "training_curves.png")
        if cfg.push_to_hub:
            tc.push_to_hub(cfg.push_to_hub)
    barrier()
    return final


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed; logging to train_log.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))
