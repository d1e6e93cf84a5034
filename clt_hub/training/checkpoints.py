"""Training checkpoints: one folder per saved step (state.safetensors with full, all-rank tensors, and state.json),
written atomically, the newest few kept; the newest readable one found on resume, damaged ones set aside.

Tensors are gathered from every rank, so a checkpoint loads on any world size."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clt_hub.artifacts.atomic import atomic_directory
from clt_hub.artifacts.lazy import read_header
from clt_hub.distributed import barrier, gather_features, rank_world, say
from clt_hub.errors import CltHubError, ConfigError, TrainingError

if TYPE_CHECKING:
    from clt_hub.training.trainer import Trainer

SHARDED = ("W_enc", "b_enc", "threshold", "W_dec")   # feature dim first: split across ranks; the rest replicated


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


def set_aside_unreadable(root: Path, used: Path | None) -> None:
    """Rename the unreadable checkpoints newer than `used` to damaged_step_*: kept for a look, out of the way of
    the resumed run, which writes those steps again."""
    if rank_world()[0] != 0 or not root.is_dir():
        return
    for folder in sorted(root.glob("step_*")):
        if (folder / "state.json").is_file() and (used is None or folder.name > used.name):
            aside = folder.with_name("damaged_" + folder.name)
            folder.rename(aside)
            say(f"moved it to {aside}")


def _unreadable(folder: Path) -> str | None:
    """Why a checkpoint's state cannot be loaded (None: it can), from its JSON and its safetensors header, which
    is checked against the file's size; no tensor is read."""
    try:
        json.loads((folder / "state.json").read_text())
        read_header(folder / "state.safetensors")
    except (OSError, ValueError, CltHubError) as exc:
        return str(exc).splitlines()[0].split("; ")[0] if str(exc) else type(exc).__name__
    return None


def full_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to continue exactly, as full (all-rank) tensors plus JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    opt_state = trainer.optimizer.state
    for name, p in trainer.tc.named_parameters():
        shard = trainer.features_parallel and name.split(".")[0] in SHARDED
        full = (lambda t: gather_features(t)) if shard else (lambda t: t)  # noqa: E731
        tensors[f"param.{name}"] = full(p.detach()).cpu()
        st = opt_state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"adam.{key}.{name}"] = full(st[key]).cpu()
        if "step" in st:
            tensors[f"adam.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    tensors["scale_in"] = trainer.scale_in.clone()
    tensors["scale_out"] = trainer.scale_out.clone()
    tensors["last_fired"] = gather_features(trainer.last_fired.T.contiguous()).T.contiguous() if trainer.features_parallel \
        else trainer.last_fired.clone()
    tensors["rng_torch"] = torch.get_rng_state()
    meta = {"step": trainer.step, "config": dataclasses.asdict(trainer.cfg), "tc_config": trainer.tc_cfg.to_dict(),
            "world_size": trainer.world, "history": trainer.history, "config_changes": trainer.config_changes}
    return tensors, meta


def save(trainer: Trainer) -> Path | None:
    """Atomic: a checkpoint folder is complete (state.json written last) or absent."""
    from safetensors.torch import save_file

    tensors, meta = full_state(trainer)  # collective: every rank takes part
    root = trainer.checkpoint_root
    path = root / f"step_{trainer.step:08d}"
    if trainer.rank == 0:
        previous = latest_checkpoint(root)
        try:
            with atomic_directory(path) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
                (tmp / "state.json").write_text(json.dumps(meta))
        except OSError as exc:
            raise TrainingError(
                f"could not write checkpoint {path} ({exc.strerror or exc}); the previous checkpoint "
                f"{previous or '(none)'} is intact. Free disk space and resume with --resume") from None
        done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
        for old in done[:-trainer.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


@torch.no_grad()
def load(trainer: Trainer, path: Path) -> None:
    """Continue from `path`: every tensor's name and shape checked against this run's config before any is
    copied; this rank takes its feature slice."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    lo = trainer.rank * trainer.local_f if trainer.features_parallel else 0
    sl = slice(lo, lo + trainer.local_f)
    params = dict(trainer.tc.named_parameters())
    saved = {k.removeprefix("param."): tuple(v.shape) for k, v in tensors.items() if k.startswith("param.")}
    for name, p in params.items():  # check everything before changing anything
        shard = name.split(".")[0] in SHARDED
        want = ((trainer.tc_cfg.d_sae, *p.shape[1:]) if shard else tuple(p.shape))
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
            st = trainer.optimizer.state[p]
            st["step"] = tensors[f"adam.step.{name}"].reshape(())
            st["exp_avg"] = (tensors[f"adam.exp_avg.{name}"][sl] if shard else tensors[f"adam.exp_avg.{name}"]).to(p.device).clone()
            st["exp_avg_sq"] = (tensors[f"adam.exp_avg_sq.{name}"][sl] if shard
                                else tensors[f"adam.exp_avg_sq.{name}"]).to(p.device).clone()
    trainer.scale_in, trainer.scale_out = tensors["scale_in"], tensors["scale_out"]
    trainer.last_fired = tensors["last_fired"][:, sl].clone()
    torch.set_rng_state(tensors["rng_torch"])
    trainer.step = int(meta["step"])
    trainer.history = meta.get("history", [])
    trainer.config_changes = list(meta.get("config_changes", []))
