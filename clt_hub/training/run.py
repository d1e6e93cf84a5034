"""A training run, in phases: preflight (everything that can be refused before the model loads), setup (model,
trainer, data stream, checkpoint), replay (the stream back to the checkpoint's position), the loop (steps,
logged to train_log.jsonl, the progress bar and TensorBoard by one RunLog, checkpointed), and finish (metrics,
held-out evaluation, export, push). `train` runs them in order; each is short enough to read at once."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt_hub.artifacts.atomic import ARTIFACT_MARKERS
from clt_hub.distributed import barrier, rank_world, say
from clt_hub.errors import ConfigError, TrainingError
from clt_hub.models.adapters import adapter_for
from clt_hub.models.known import public_name
from clt_hub.models.loading import load_model
from clt_hub.texts import (
    BadRecordError,
    SkippedRecords,
    check_source,
    data_card,
    iter_texts,
)
from clt_hub.training.activation_store import (
    ActivationCache,
    SourceConfig,
    model_activations,
    shuffled_batches,
)
from clt_hub.training.checkpoints import latest_checkpoint, set_aside_unreadable
from clt_hub.training.config import (
    SHAPE_FIELDS,
    TrainConfig,
    config_changes,
    describe_changes,
    model_shape,
)
from clt_hub.training.curves import plot_layers, plot_training
from clt_hub.training.evaluate import evaluate
from clt_hub.training.trainer import Trainer
from clt_hub.transcoders.transcoder import Transcoder


# ----------------------------------------------------------------------------- the data and the run folder
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
    checkpoint = latest_checkpoint(out / "checkpoints", report=say if resume else None)
    if resume:
        set_aside_unreadable(out / "checkpoints", checkpoint)
    if checkpoint is None:
        if resume:
            say(f"no checkpoint in {out / 'checkpoints'}; starting from scratch")
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
    say(f"warning: continuing {checkpoint} with a changed training config: {describe_changes(changes)}")
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
            say(f"warning: {what} {source}: {found.skipped.summary()}; they are left out (bad_records=skip)")
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


# ----------------------------------------------------------------------------- the phases
@dataclass
class Preflight:
    """What the checks before the model loads found: the checkpoint to continue (None: a fresh start), the config
    fields changed since it was written, and the bad-record count of each text source read whole."""

    checkpoint: Path | None
    changes: dict[str, tuple[Any, Any]]
    bad_counts: dict[str, int]


def preflight(cfg: TrainConfig, resume: bool, allow_config_change: bool, progress: bool,
              model: nn.Module | None) -> Preflight:
    """Everything that can be refused before the model's weights load: the device, the memory the transcoder's
    training needs (on `model`'s shape, or its config's alone), the run folder, the checkpoint and its config,
    and the text sources."""
    cfg.check_device()
    if model is not None:  # the model this run trains on
        shape: tuple[int, int] | None = adapter_for(model).n_layers(model), int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    else:  # the model's config alone, read before its weights (None when it is not on this machine)
        shape = model_shape(cfg.model)
    if shape is not None:
        cfg.check_memory(*shape)
    check_out_dir(Path(cfg.out_dir))
    checkpoint, changes = _resume_point(cfg, resume, allow_config_change)
    return Preflight(checkpoint, changes, _check_data(cfg, progress))


@dataclass
class Run:
    """A run once set up: the model, the trainer (at the checkpoint's step when resuming) and its batch stream."""

    cfg: TrainConfig
    model: nn.Module
    tokenizer: Any
    trainer: Trainer
    batches: Iterator[Any]
    skipped: SkippedRecords  # bad records met in the text read while training (skip mode)
    cache_ready: bool        # the activation cache was there before this run (its text was read then)
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.cfg.out_dir)


def setup(cfg: TrainConfig, pre: Preflight, model: nn.Module | None, tokenizer: Any) -> Run:
    """Load the model (unless given), build the trainer and the batch stream, and load the checkpoint."""
    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model)
    SourceConfig(context_size=cfg.context_size, input_hook=cfg.transcoder.feature_input_hook,
                 output_hook=cfg.transcoder.feature_output_hook).validate(model)
    trainer = Trainer(cfg, adapter_for(model).n_layers(model), int(model.config.hidden_size),  # type: ignore[union-attr,arg-type]
                      model_name=public_name(model, cfg.model))
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create out_dir {out} ({exc.strerror or exc})") from None
    remote = not Path(cfg.dataset).exists()
    skipped = SkippedRecords(on_first=(lambda msg: say(f"warning: {msg}")) if remote else None)
    cache_ready = bool(cfg.cache_dir) and (Path(str(cfg.cache_dir)) / "manifest.json").is_file()
    batches = _batches(cfg, model, tokenizer, skipped)
    if pre.checkpoint is not None:
        trainer.load_checkpoint(pre.checkpoint)
        if pre.changes:
            trainer.config_changes.append({"step": trainer.step,
                                           "changes": {k: list(v) for k, v in pre.changes.items()}})
    if trainer.rank == 0:
        _trim_log(out / "train_log.jsonl", trainer.step)
    return Run(cfg, model, tokenizer, trainer, batches, skipped, cache_ready)


def replay(run: Run, progress: bool) -> None:
    """Replay the deterministic stream to the trainer's step (without an activation cache this reruns the model's
    forward pass over every token already trained on, minutes on a real model); on a fresh start with
    `skip_init_tokens`, fit the skip path on the first batches, which are then trained on as usual (a resumed run
    has the fit in its checkpoint and replays those batches)."""
    from tqdm.auto import tqdm

    cfg, trainer = run.cfg, run.trainer
    desc = "replaying data" if run.cache_ready else "replaying data (model forward; cache_dir makes this a read)"
    for _ in tqdm(range(trainer.step), desc=desc, unit="step", leave=False,
                  disable=not progress or trainer.rank != 0 or trainer.step == 0):
        next(run.batches)
    if trainer.step == 0 and cfg.skip_init_tokens:
        first = [next(run.batches) for _ in range(-(-cfg.skip_init_tokens // cfg.batch_size))]
        trainer.fit_scales(*first[0])
        trainer.fit_skip(first)
        run.batches = itertools.chain(first, run.batches)


class RunLog:
    """Where each logged step goes: train_log.jsonl, the progress bar and TensorBoard (rank 0 only), and the
    trainer's history (which the checkpoint keeps and the training curves are drawn from)."""

    def __init__(self, run: Run, progress: bool):
        from tqdm.auto import tqdm

        cfg, trainer = run.cfg, run.trainer
        main = trainer.rank == 0
        self.trainer, self.every, self.batch_size = trainer, cfg.log_every, cfg.batch_size
        self.file = (run.out / "train_log.jsonl").open("a") if main else None
        self.writer = _tensorboard(run.out) if cfg.tensorboard and main else None
        self.bar = tqdm(total=cfg.total_steps, initial=trainer.step, desc="training", unit="step",
                        disable=not progress or not main)
        self.t0 = time.perf_counter()

    def step(self, stats: dict[str, float], last: bool) -> None:
        """After each training step: advance the bar; every `log_every` steps (and the last) log the stats."""
        self.bar.update(1)
        if self.trainer.step % self.every and not last:
            return
        stats["tokens_per_s"] = self.every * self.batch_size / max(1e-9, time.perf_counter() - self.t0)
        self.t0 = time.perf_counter()
        self.trainer.history.append(stats)
        self.bar.set_postfix(loss=f"{stats['loss']:.3g}", l0=f"{stats['l0']:.1f}", fvu=f"{stats['fvu']:.3f}",
                             dead=f"{stats['dead']:.2f}")
        if self.file is not None:
            self.file.write(json.dumps(stats) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in stats.items():
                self.writer.add_scalar(f"train/{key}", value, self.trainer.step)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def loop(run: Run, progress: bool) -> None:
    """Train to `total_steps`, logging and checkpointing as configured. A bad record met mid-run (a streamed
    dataset cannot be checked ahead) stops the run with the steps done so far checkpointed."""
    cfg, trainer = run.cfg, run.trainer
    log = RunLog(run, progress)
    try:
        while trainer.step < cfg.total_steps:
            x, y = next(run.batches)
            if trainer.step == 0:
                trainer.fit_scales(x, y)
            stats = trainer.train_step(x, y)
            last = trainer.step == cfg.total_steps
            log.step(stats, last)
            if trainer.step % cfg.checkpoint_every == 0 or last:
                trainer.save_checkpoint()
    except BadRecordError as exc:
        raise _stopped(trainer, exc) from None
    finally:
        log.close()


def _training_metrics(run: Run, pre: Preflight) -> dict[str, Any]:
    """The artifact's metrics from training: the last logged batch's (held-out figures from eval_dataset replace
    fvu), the tokens trained on, the data card, and the bad records left out (of the whole local dataset,
    scanned up front, or of the streamed text read; a cache built earlier read its text then)."""
    cfg, trainer = run.cfg, run.trainer
    last = trainer.history[-1] if trainer.history else {}
    metrics: dict[str, Any] = {k: round(float(last[v]), 6) for k, v in
                               (("fvu", "fvu"), ("l0", "l0"), ("train_dead_fraction", "dead")) if v in last}
    metrics["train_tokens"] = trainer.step * cfg.batch_size
    metrics.update({f"data_{k}": v for k, v in data_card(cfg.dataset).items()})
    if cfg.bad_records == "skip" and "dataset" in pre.bad_counts:
        metrics["skipped_records"] = pre.bad_counts["dataset"]
    elif cfg.bad_records == "skip" and not run.cache_ready:
        metrics["skipped_records"] = run.skipped.count
        if run.skipped.count:
            say(f"warning: dataset {cfg.dataset}: {run.skipped.summary()} in the text this run read")
    return metrics


def _held_out(run: Run, tc: Transcoder, pre: Preflight, progress: bool) -> dict[str, Any]:
    """Evaluate on eval_dataset: its metrics for the artifact; eval.json and layers.png beside it."""
    cfg = run.cfg
    eval_skipped = SkippedRecords()
    texts = iter_texts(cfg.eval_dataset, text_field=cfg.text_field, bad_records=cfg.bad_records,  # type: ignore[arg-type]
                       skipped=eval_skipped)
    try:
        report = evaluate(run.model, run.tokenizer, tc, texts, n_tokens=cfg.eval_tokens,
                          context_size=cfg.context_size, progress=progress and run.trainer.rank == 0)
    except BadRecordError as exc:
        raise TrainingError(f"{exc}; the trained weights are in checkpoint {run.trainer.latest_checkpoint()}: "
                            "fix the data or set bad_records=skip, and evaluate and export them with "
                            "--resume") from None
    metrics = report.summary()
    if cfg.bad_records == "skip":
        metrics["eval_skipped_records"] = pre.bad_counts.get("eval_dataset", eval_skipped.count)
    plot_layers(report, run.out / "layers.png")
    (run.out / "eval.json").write_text(json.dumps(report.to_dict(), indent=1))
    return metrics


def finish(run: Run, pre: Preflight, progress: bool) -> Path:
    """Export the transcoder with its metrics (and held-out evaluation), draw the curves, push when asked."""
    tc = run.trainer.export()  # collective: every rank takes part
    final = run.out / "transcoder"
    if run.trainer.rank == 0:
        tc.cfg.metrics = _training_metrics(run, pre)
        if run.cfg.eval_dataset:
            tc.cfg.metrics.update(_held_out(run, tc, pre, progress))
        tc.save_pretrained(final)
        plot_training(run.trainer.history, run.out / "training_curves.png")
        if run.cfg.push_to_hub:
            tc.push_to_hub(run.cfg.push_to_hub)
    barrier()
    return final


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, model: nn.Module | None = None,
          tokenizer: Any = None, allow_config_change: bool = False) -> Path:
    """Train, checkpoint, export. Returns the artifact folder (out_dir/transcoder).

    Before the model is loaded (`preflight`): the device must be there, the transcoder's training must fit in its
    memory (`TrainConfig.check_memory`, on the shape of `model` or, when none is given, of the model's config
    alone; `Trainer` checks it again before it allocates), the run folder must be writable, a checkpoint there
    needs `resume=True`, and resuming refuses a changed training config (fields outside `FREE_ON_RESUME`) unless
    `allow_config_change`; the dataset and eval_dataset must open and give text, and local ones are scanned for
    bad records."""
    pre = preflight(cfg, resume, allow_config_change, progress, model if tokenizer is not None else None)
    run = setup(cfg, pre, model, tokenizer)
    replay(run, progress)
    loop(run, progress)
    return finish(run, pre, progress)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed; logging to train_log.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))
