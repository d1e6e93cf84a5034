"""Edge Pruning (Bhaskar et al. 2024): learn a mask per edge by gradient descent, then binarise.

Each edge has a hard-concrete (L0) gate with a learned log alpha (Louizos et al. 2018): a sample
z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (r - l) + l, 0, 1) with u ~ U(0, 1). The loss is
KL(full model || circuit) at the prompt's last token, the circuit being the disentangled model with every edge
scaled by its gate and the rest patched from the corrupted run, plus a Lagrangian term
lambda1 (t - s) + lambda2 (t - s)^2 that drives the expected edge sparsity s to the target t (annealed from 0 over
the warm-up); the lambdas are trained by gradient ascent. At the end the circuit is the (1 - t) fraction of
edges with the highest log alpha (a threshold on log alpha, found exactly by sorting).

Seeded and resumable: every step's batch and gate noise come from (seed, step) alone, and a checkpoint (the log
alphas, lambdas and both optimisers' states in safetensors, the step and config in JSON, written atomically)
lets an interrupted run go on to bit-identical masks. Node masks (the paper also prunes nodes) are not learned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clt_hub.circuits.edge_model import EdgeModel, check_memory
from clt_hub.circuits.evaluate import Reference, keep_top, kl_to_full, reference
from clt_hub.circuits.tasks import Batch
from clt_hub.config import load_json
from clt_hub.errors import ArtifactError, ConfigError

L_STRETCH, R_STRETCH = -0.1, 1.1
CHECKPOINT_TENSORS, CHECKPOINT_STATE = "masks.safetensors", "state.json"


@dataclass(frozen=True)
class EdgePruningConfig:
    sparsity: float = 0.95        # target fraction of edges removed, in [0, 1)
    steps: int = 300
    lr: float = 0.1               # Adam on the log alphas
    reg_lr: float = 0.1           # Adam (gradient ascent) on the Lagrange multipliers
    warmup: float = 0.5           # fraction of the steps over which the target sparsity rises from 0
    beta: float = 2.0 / 3.0       # hard-concrete temperature
    init: float = 3.0             # initial log alpha (every gate almost surely open)
    seed: int = 0
    checkpoint_every: int = 50    # steps between checkpoints (when a checkpoint folder is given)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> None:
            raise ConfigError(f"EdgePruningConfig.{name} = {getattr(self, name)!r}: {rule}")
        for name in ("steps", "seed", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(name, "must be an integer")
        for name in ("sparsity", "lr", "reg_lr", "warmup", "beta", "init"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if not 0.0 <= self.sparsity < 1.0:
            bad("sparsity", "the fraction of edges removed must be in [0, 1)")
        if self.steps < 1 or self.checkpoint_every < 1:
            bad("steps" if self.steps < 1 else "checkpoint_every", "must be at least 1")
        if self.lr <= 0 or self.reg_lr <= 0 or self.beta <= 0:
            bad("lr" if self.lr <= 0 else "reg_lr" if self.reg_lr <= 0 else "beta", "must be positive")
        if not 0.0 <= self.warmup <= 1.0:
            bad("warmup", "must be in [0, 1]")


@dataclass
class EdgePruningResult:
    log_alpha: torch.Tensor           # [E] the learned gates (ranking: higher = kept first)
    keep: torch.Tensor                # [E] bool, the binarised circuit at the target sparsity
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0              # training steps' time, summed over the runs a resumed run went on from
    resumed_from: int = 0


def hard_concrete(log_alpha: torch.Tensor, beta: float, u: torch.Tensor | None) -> torch.Tensor:
    """Gate values in [0, 1]; u = None gives the deterministic gate (the noise's median)."""
    if u is None:
        s = torch.sigmoid(log_alpha / beta)
    else:
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (R_STRETCH - L_STRETCH) + L_STRETCH).clamp(0.0, 1.0)


def expected_density(log_alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """P(gate != 0) per edge."""
    return torch.sigmoid(log_alpha - beta * math.log(-L_STRETCH / R_STRETCH))


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def _batch_index(seed: int, step: int, n: int) -> int:
    epoch, i = divmod(step, n)
    return int(torch.randperm(n, generator=_generator(seed + 7919, epoch))[i])


def fingerprint(em: EdgeModel, batches: Sequence[Batch]) -> str:
    """What a checkpoint must match: the model's edges and the training data."""
    h = hashlib.sha256("\n".join(em.graph.edge_names()).encode())
    for b in batches:
        for t in (b.clean, b.corrupted, b.last, b.answers, b.wrong):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class _Trainer:
    def __init__(self, em: EdgeModel, batches: Sequence[Batch], config: EdgePruningConfig):
        self.em, self.batches, self.cfg = em, list(batches), config
        E = em.graph.n_edges
        self.log_alpha = torch.full((E,), float(config.init), dtype=torch.float32, requires_grad=True)
        self.lambdas = torch.zeros(2, dtype=torch.float32, requires_grad=True)
        self.opt = torch.optim.Adam([self.log_alpha], lr=config.lr)
        self.reg_opt = torch.optim.Adam([self.lambdas], lr=config.reg_lr, maximize=True)
        self.refs: dict[int, Reference] = {}
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0  # training time over every run that led here (a resumed run adds its own)

    def target(self, step: int) -> float:
        ramp = self.cfg.warmup * self.cfg.steps
        return self.cfg.sparsity * (min(1.0, (step + 1) / ramp) if ramp > 0 else 1.0)

    def ref(self, i: int) -> Reference:
        if i not in self.refs:  # the same values whenever computed, so caching never changes the result
            self.refs[i] = reference(self.em, self.batches[i])
        return self.refs[i]

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        i = _batch_index(cfg.seed, step, len(self.batches))
        batch, ref = self.batches[i], self.ref(i)
        u = torch.rand(self.log_alpha.shape, generator=_generator(cfg.seed, step)).clamp(1e-6, 1 - 1e-6)
        gates = hard_concrete(self.log_alpha, cfg.beta, u)
        logits = self.em.run(batch.clean, batch.last, mask=gates.to(self.em.dtype), corrupt=ref.corrupt_writers).logits
        kl = kl_to_full(logits, ref.full_logprobs).mean()
        sparsity = 1.0 - expected_density(self.log_alpha, cfg.beta).mean()
        gap = self.target(step) - sparsity
        loss = kl + self.lambdas[0] * gap + self.lambdas[1] * gap**2
        self.opt.zero_grad()
        self.reg_opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.reg_opt.step()
        self.step += 1
        row = {"step": step, "kl": float(kl.detach()), "expected_sparsity": float(sparsity.detach()),
               "target": self.target(step)}
        self.history.append(row)
        return row

    # --- checkpoints -------------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"log_alpha": self.log_alpha.detach().clone(), "lambdas": self.lambdas.detach().clone()}
        groups = {}
        for name, opt in (("opt", self.opt), ("reg_opt", self.reg_opt)):
            sd = opt.state_dict()
            for k, v in sd["state"].get(0, {}).items():
                tensors[f"{name}.{k}"] = v.detach().clone().reshape(-1) if v.dim() == 0 else v.detach().clone()
            groups[name] = sd["param_groups"]
        return tensors, {"step": self.step, "param_groups": groups, "history": self.history, "seconds": self.seconds}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])
            self.lambdas.copy_(tensors["lambdas"])
        for name, opt in (("opt", self.opt), ("reg_opt", self.reg_opt)):
            state = {k.split(".", 1)[1]: (v.reshape(()) if k.endswith(".step") else v)
                     for k, v in tensors.items() if k.startswith(name + ".")}
            opt.load_state_dict({"state": {0: state} if state else {}, "param_groups": meta["param_groups"][name]})
        self.step = int(meta["step"])
        self.history = list(meta["history"])
        self.seconds = float(meta.get("seconds", 0.0))


def save_checkpoint(folder: Path, trainer: _Trainer, config: EdgePruningConfig, fp: str) -> None:
    from safetensors.torch import save_file

    from clt_hub.artifacts.atomic import atomic_directory

    tensors, meta = trainer.state()
    with atomic_directory(folder) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(
            {**meta, "config": dataclasses.asdict(config), "fingerprint": fp}, indent=1) + "\n")
        (tmp / "README.md").write_text("clt_hub Edge Pruning checkpoint (resumable; delete it to start over)\n")


def load_checkpoint(folder: Path, config: EdgePruningConfig, fp: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    if not (folder / CHECKPOINT_STATE).is_file():
        return None
    meta = load_json(folder / CHECKPOINT_STATE, what="checkpoint state", error=ArtifactError,
                     fix=f"delete the checkpoint {folder} to start over")
    if not isinstance(meta, dict):
        raise ArtifactError(f"{folder / CHECKPOINT_STATE}: a JSON {type(meta).__name__}, not the checkpoint's state "
                            f"object; delete the checkpoint {folder} to start over")
    try:
        tensors = load_file(str(folder / CHECKPOINT_TENSORS))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {folder} is unreadable ({exc}); delete it to start over") from None
    saved = meta.get("config", {})
    if saved != dataclasses.asdict(config):
        diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items() if saved.get(k) != v}
        raise ConfigError(f"checkpoint {folder} was made with other settings ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                          "use the same settings to resume, or another checkpoint folder to start over")
    if meta.get("fingerprint") != fp:
        raise ConfigError(f"checkpoint {folder} was made for another model or other training examples; use another "
                          "checkpoint folder to start over")
    return tensors, meta


def edge_pruning(em: EdgeModel, batches: Sequence[Batch], config: EdgePruningConfig | None = None, *,
                 checkpoint: str | Path | None = None, progress: bool = True,
                 on_step: Callable[[dict[str, float]], None] | None = None) -> EdgePruningResult:
    """Learn edge masks on `batches` (training examples) for the target sparsity. With `checkpoint`, state is saved
    every `checkpoint_every` steps and at the end, and a run finding a matching checkpoint there goes on from it."""
    config = config or EdgePruningConfig()
    if not batches:
        raise ConfigError("Edge Pruning needs at least one training batch")
    check_memory(em.graph, max(len(b) for b in batches), max(b.tokens for b in batches), grad=True,
                 dtype_bytes=torch.finfo(em.dtype).bits // 8, vocab=int(getattr(em.model.config, "vocab_size", 0)))
    trainer = _Trainer(em, batches, config)
    folder = Path(checkpoint) if checkpoint is not None else None
    fp = fingerprint(em, batches)
    resumed = 0
    if folder is not None:
        found = load_checkpoint(folder, config, fp)
        if found is not None:
            trainer.load(*found)
            resumed = trainer.step
    bar = tqdm(total=config.steps, initial=trainer.step, desc=f"Edge Pruning (sparsity {config.sparsity:g})",
               disable=not progress, leave=False)
    while trainer.step < config.steps:
        tick = time.perf_counter()
        row = trainer.train_step()
        trainer.seconds += time.perf_counter() - tick
        bar.update()
        bar.set_postfix(kl=f"{row['kl']:.3g}", sparsity=f"{row['expected_sparsity']:.3f}")
        if on_step is not None:
            on_step(row)
        if folder is not None and (trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps):
            save_checkpoint(folder, trainer, config, fp)
    bar.close()
    log_alpha = trainer.log_alpha.detach().clone()
    return EdgePruningResult(log_alpha, keep_top(log_alpha, config.sparsity), trainer.history, trainer.seconds,
                             resumed)
