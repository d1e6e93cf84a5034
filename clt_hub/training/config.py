"""One training run's settings, validated when the run is defined (from Python, YAML or the CLI).

The transcoder itself is a nested `clt_hub.config.Architecture` (YAML: a `transcoder:` mapping), so its
fields have one definition and one default, shared with the artifacts the run writes.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clt_hub.config import (
    DTYPES,
    Architecture,
    check_repo_id,
    finite_number,
    from_mapping,
    parse_yaml,
)
from clt_hub.errors import ConfigError

MAX_SEED = 2**32 - 1     # the activation cache's shuffle is seeded with seed * 1,000,003 + epoch (torch: < 2**63)
DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?|mps")
_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """One training run. Every field can come from YAML or the command line (`--set FIELD=VALUE`)."""

    model: str = field(metadata=_help("transformers model id, local folder or known model name."))
    dataset: str = field(metadata=_help(".txt/.jsonl file, folder, or Hugging Face dataset name."))
    transcoder: Architecture = field(metadata=_help("What to train: width, kind, activation, hooks."))
    out_dir: str = field(default="clt_out", metadata=_help(
        "Run folder: checkpoints/, train_log.jsonl, transcoder/."))
    text_field: str = field(default="text", metadata=_help("Text field/column of the dataset."))
    split: str = field(default="train", metadata=_help("Split of a Hugging Face dataset."))
    batch_topk: bool = field(default=False, metadata=_help("Rank the whole batch (needs activation topk)."))
    n_tokens: int = field(default=1_000_000, metadata=_help("Training tokens."))
    batch_size: int = field(default=1024, metadata=_help("Tokens per step (global, over all ranks)."))
    lr: float = field(default=2e-4, metadata=_help("Peak learning rate."))
    warmup_steps: int = 100
    decay_fraction: float = 0.2          # linear decay to 0 over this last fraction of steps
    sparsity_coeff: float = field(default=1e-3, metadata=_help("Weight of the tanh sparsity penalty."))
    sparsity_per_d_model: bool = field(default=False, metadata=_help(
        "Weigh the tanh sparsity penalty by d_model: a layer's target has mean squared norm d_model in training "
        "units (predicting 0 costs n_layers x d_model of MSE), so the loss over n_layers x d_model is mse / "
        "(n_layers d_model) + sparsity_coeff x (penalty / n_layers): sparsity_coeff is what one active feature "
        "per token and layer (tanh saturated) costs, in fractions of a layer's target energy, whatever the "
        "width and depth. false (default): the raw penalty of earlier runs, whose weight against the MSE "
        "falls as 1/d_model (1e-3 was about 1e-3 of the MSE on Gemma-3-270M, d_model 640)."))
    skip_lr_scale: float = field(default=1.0, metadata=_help(
        "Skip transcoders: the skip path's learning rate as a multiple of lr (0 keeps it where it starts, e.g. at "
        "its least-squares fit from skip_init_tokens). Adam moves every weight by about lr a step whatever its "
        "gradient, so a fitted skip path can be pushed off its optimum by the features' noisy gradients."))
    auxk_coeff: float = field(default=0.0, metadata=_help(
        "TopK: weight of the AuxK loss (Gao et al. 2024; they use 1/32): the top auxk_k dead features (silent for "
        "dead_after_tokens tokens) of each token and layer reconstruct the main reconstruction's error, so dead "
        "features get gradient and revive. 0 (default): off, as in earlier runs."))
    auxk_k: int = field(default=512, metadata=_help(
        "AuxK: dead features used per token and layer (at most d_sae; the paper's usual 512)."))
    sparse_decode: bool | None = field(default=None, metadata=_help(
        "Decode from the active features only, at a cost proportional to k rather than d_sae (forward and "
        "backward; the same function as the dense decode). null (default): on for TopK/BatchTopK, the only "
        "activations it supports; false: the dense decode (benchmarks compare the two)."))
    sparsity_c: float = 1.0              # tanh(c * ||W_dec|| * a)
    sparsity_warmup_fraction: float = 0.5
    preact_coeff: float = 3e-6
    threshold_init: float = 0.1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    context_size: int = 128
    model_batch: int = 8
    buffer_tokens: int = 16384
    cache_dir: str | None = field(default=None, metadata=_help("Build/reuse an activation cache here."))
    cache_dtype: str = "float32"
    cache_tokens: int | None = field(default=None, metadata=_help(
        "Tokens the activation cache holds (needs cache_dir). null (default): n_tokens, one pass over the text. "
        "Fewer: the run trains several epochs over the cache, each reshuffled, so the model's forward (most of a "
        "step's time on a CPU) is paid once per cached token instead of once per step."))
    skip_init_tokens: int = field(default=0, metadata=_help(
        "Skip transcoders: before step 1, set each layer's skip path and output bias to their least-squares fit "
        "(MLP output from MLP input) on this many tokens of the first batches, which then train as usual. "
        "0 (default): zeros, learned by the optimizer from scratch."))
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    dead_after_tokens: int = 1_000_000   # a feature silent for this many tokens (or all run, if shorter) is dead
    parallel: str = field(default="data", metadata=_help(
        "With torchrun: data (split batches) or features (feature-sharded transcoder)."))
    amp: bool = False                    # bfloat16 autocast on CUDA
    device: str = "cpu"
    push_to_hub: str | None = field(default=None, metadata=_help("Publish the result to this repo id."))
    eval_dataset: str | None = field(default=None, metadata=_help(
        "Held-out text, evaluated after training; metrics go into the artifact."))
    eval_tokens: int = 20000
    tensorboard: bool = False
    bad_records: str = field(default="raise", metadata=_help(
        "Records that are not text (undecodable bytes, invalid JSON, no text field, lone surrogates): raise "
        "(stop before training, naming file and line) or skip (count them; the count goes into the artifact)."))

    def __post_init__(self) -> None:
        if isinstance(self.transcoder, dict):
            self.transcoder = Architecture.from_dict(self.transcoder, source="training field 'transcoder'")
        self.validate()

    def validate(self) -> None:
        """The transcoder, each field's declared type, then CHECKS in order (each field's range or choices, and
        the rules that join fields); the first problem found is one ConfigError line."""
        if not isinstance(self.transcoder, Architecture):
            raise ConfigError("training field 'transcoder' must be a mapping of Architecture fields "
                              "(d_sae, kind, activation, ...)")
        self.transcoder.validate()
        self._check_types()
        for check in CHECKS:
            problem = _problem(self, check)
            if problem:
                raise ConfigError(problem)

    def _check_types(self) -> None:
        """Each field holds a value of its declared type (ints are not floats or bools, floats are finite), so a
        YAML or `--set` value of another type is one line here, not a traceback after the model loads."""
        for name, hint in _field_types().items():
            value = getattr(self, name)
            allowed = typing.get_args(hint) or (hint,)
            if value is None and type(None) in allowed:
                continue
            kind = next(t for t in allowed if t is not type(None))
            if kind not in _KINDS:
                continue
            ok = (type(value) is bool if kind is bool else
                  isinstance(value, str) if kind is str else
                  not isinstance(value, bool) and isinstance(value, int) if kind is int else
                  finite_number(value))
            if ok:
                continue
            what = _KINDS[kind] + (" or null" if type(None) in allowed else "")
            hint_text = ""
            if kind in (int, float) and isinstance(value, str) and _is_number(value):
                hint_text = "; write it as a YAML number (1.0e-3, not 1e-3, which YAML reads as text)"
            raise ConfigError(f"training field '{name}' must be {what} ({kind.__name__}), got {value!r} "
                              f"({type(value).__name__}){hint_text}")

    def check_device(self) -> None:
        """The device is there (torch is imported only for a device other than the CPU)."""
        if self.device == "cpu":
            return
        import torch

        if self.device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(self.device.partition(":")[2] or 0)
            if index >= count:
                found = f"{count} CUDA GPU(s)" if count else "no CUDA GPU (or a torch built without CUDA)"
                raise ConfigError(f"training field 'device' is {self.device!r} but this machine has {found}; "
                                  "use device=cpu" + (f" or cuda:0..cuda:{count - 1}" if count else ""))
        elif self.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("training field 'device' is 'mps' but Apple's MPS is not available here; use cpu")

    def memory_bytes(self, n_layers: int, d_model: int) -> int:
        """Bytes one process needs at least for the transcoder it trains on a model of `n_layers` blocks of width
        `d_model`: weights, gradients and Adam's two moments, each float32 (activations, the model and the
        buffers come on top). parallel=features splits the features over the processes."""
        from clt_hub.artifacts.hub import parameter_count

        _, world = _ranks()
        d_sae = -(-self.transcoder.d_sae // world) if self.parallel == "features" else self.transcoder.d_sae
        return 16 * parameter_count(dataclasses.replace(self.transcoder, d_sae=d_sae).sized(n_layers, d_model))

    def check_memory(self, n_layers: int, d_model: int, available: int | None = None) -> None:
        """Refuse, before the model loads, a transcoder whose training cannot fit in this machine's memory (the
        CPU's, or the GPU's for device cuda); `available` defaults to what the system reports (no check if it
        reports nothing)."""
        local, _ = _ranks()
        per_machine = self.device == "cpu"
        if available is None:
            available = available_memory() if per_machine else _gpu_memory(self.device)
        if available is None:
            return
        share = local if per_machine else 1       # processes sharing this memory
        need = share * self.memory_bytes(n_layers, d_model)
        if need <= available:
            return
        one = dataclasses.replace(self, transcoder=dataclasses.replace(self.transcoder, d_sae=1))
        two = dataclasses.replace(self, transcoder=dataclasses.replace(self.transcoder, d_sae=2))
        per_feature = share * (two.memory_bytes(n_layers, d_model) - one.memory_bytes(n_layers, d_model))
        fits = max(0, (available - share * one.memory_bytes(n_layers, d_model)) // per_feature + 1)
        where = "this machine has" if per_machine else f"{self.device} has"
        arch = self.transcoder
        raise ConfigError(
            f"transcoder.d_sae {arch.d_sae:,} needs at least {_gib(need)} to train ({arch.kind}, {n_layers} layers "
            f"of width {d_model}: float32 weights, gradients and Adam's two moments"
            f"{f', {share} processes' if share > 1 else ''}), but {where} {_gib(available)} available; lower "
            f"transcoder.d_sae (about {fits:,} fits)" + (", or use kind plt (one decoder per layer)"
                                                         if arch.kind == "clt" else "")
            + (", or parallel=features over several processes" if self.parallel != "features" else ""))

    @property
    def total_steps(self) -> int:
        return self.n_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "training config") -> TrainConfig:
        return from_mapping(cls, data, ("model", "dataset", "transcoder"), source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_config_file(path), source=str(path))

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None, flags: dict[str, Any],
                     sets: list[str] | None = None) -> TrainConfig:
        """A run from a YAML config (or none), command-line flags and `--set FIELD=VALUE` overrides, later ones
        winning: YAML < flags < --set. A flag whose value is None was not given; a flag or --set key
        'transcoder.FIELD' sets a field of the nested transcoder. --set values are YAML (`--set lr=1.0e-3`)."""
        data: dict[str, Any] = read_config_file(yaml_path) if yaml_path is not None else {}
        own, nested = _given_flags(flags)
        data.update(own)
        arch = data.setdefault("transcoder", {})
        if not isinstance(arch, dict):
            raise ConfigError("'transcoder' in the training config must be a mapping (d_sae, kind, activation, ...)")
        arch.update(nested)
        for item in sets or []:
            _apply_set(data, arch, item)
        return cls.from_dict(data, source="training options")


# ----------------------------------------------------------------------------- validation, declared
# `validate` checks the declared types first (`_check_types`), then CHECKS in order, the first problem found being
# the error: a row (field, (test, problem)) fails as the line "training field 'NAME' " + problem (with {value}
# formatted in); a rule that joins fields is a function of the config returning its problem line, or None.
Rule = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def _one_of(choices: tuple[str, ...], use: str) -> Rule:
    return (lambda v: v in choices), "is {value!r}; use " + use


NON_EMPTY: Rule = (lambda v: bool(v.strip()), "is empty; give a value (see clt-hub train --help)")
AT_LEAST_0: Rule = (lambda v: v >= 0, "must be >= 0, got {value!r}")
POSITIVE_INT: Rule = (lambda v: _is_int(v) and v > 0, "must be a positive integer, got {value!r}")
POSITIVE_NUMBER: Rule = (lambda v: finite_number(v) and v > 0, "must be a positive number, got {value!r}")
NUMBER_AT_LEAST_0: Rule = (lambda v: finite_number(v) and v >= 0, "must be a number >= 0, got {value!r}")
FRACTION: Rule = (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "must be in [0, 1], got {value!r}")
TOPK_NEEDED = "needs transcoder activation 'topk'"
SKIP_NEEDED = "needs a skip transcoder (transcoder.skip: true)"


def _batch_topk_needs_topk(cfg: TrainConfig) -> str | None:
    return f"batch_topk {TOPK_NEEDED}" if cfg.batch_topk and cfg.transcoder.activation != "topk" else None


def _sparse_decode_needs_topk(cfg: TrainConfig) -> str | None:
    if cfg.sparse_decode and cfg.transcoder.activation != "topk":
        return (f"sparse_decode {TOPK_NEEDED} (the other activations have no fixed number of active features); "
                "leave it null")
    return None


def _auxk_needs_topk(cfg: TrainConfig) -> str | None:
    if cfg.auxk_coeff > 0 and cfg.transcoder.activation != "topk":
        return f"auxk_coeff {TOPK_NEEDED}; JumpReLU's dead features have the pre-activation loss (preact_coeff)"
    return None


def _cache_tokens_fit(cfg: TrainConfig) -> str | None:
    v = cfg.cache_tokens
    if v is None:
        return None
    if not _is_int(v) or v < cfg.batch_size:
        return (f"training field 'cache_tokens' must be an integer of at least one batch ({cfg.batch_size}), "
                f"or null, got {v!r}")
    return None if cfg.cache_dir else "cache_tokens needs cache_dir (the folder the cache is built in)"


def _skip_lr_needs_skip(cfg: TrainConfig) -> str | None:
    return f"skip_lr_scale {SKIP_NEEDED}" if cfg.skip_lr_scale != 1 and not cfg.transcoder.skip else None


def _skip_init_needs_skip(cfg: TrainConfig) -> str | None:
    return f"skip_init_tokens {SKIP_NEEDED}" if cfg.skip_init_tokens and not cfg.transcoder.skip else None


def _skip_init_whole_batches(cfg: TrainConfig) -> str | None:
    v = cfg.skip_init_tokens
    if v and v < cfg.batch_size:
        return (f"skip_init_tokens ({v}) is less than one batch ({cfg.batch_size}): the fit uses whole batches; "
                "use 0 or at least one batch (several: the fit has d_model + 1 unknowns per output)")
    return None


def _hub_repo(cfg: TrainConfig) -> str | None:
    if cfg.push_to_hub is not None:
        check_repo_id(cfg.push_to_hub, "training field 'push_to_hub'")  # raises with its own line
    return None


def _one_batch_at_least(cfg: TrainConfig) -> str | None:
    if cfg.n_tokens < cfg.batch_size:
        return f"n_tokens ({cfg.n_tokens}) is smaller than one batch ({cfg.batch_size})"
    return None


Check = tuple[str, Rule] | Callable[["TrainConfig"], str | None]
CHECKS: tuple[Check, ...] = (
    *((name, NON_EMPTY) for name in ("model", "dataset", "out_dir", "text_field", "split")),
    *((name, AT_LEAST_0) for name in ("warmup_steps", "sparsity_coeff", "preact_coeff", "threshold_init",
                                      "weight_decay")),
    ("seed", ((lambda v: 0 <= v <= MAX_SEED), f"must be an integer from 0 to {MAX_SEED:,}, got {{value!r}}")),
    ("device", ((lambda v: DEVICE.fullmatch(v) is not None),
                "is {value!r}; use cpu, cuda, cuda:N (the Nth GPU) or mps")),
    ("transcoder.topk", ((lambda v: v is None or (_is_int(v) and v >= 1)),
                         "must be a positive integer or null, got {value!r}")),
    *((name, POSITIVE_INT) for name in ("n_tokens", "batch_size", "context_size", "model_batch",
                                        "checkpoint_every", "log_every", "buffer_tokens", "keep_checkpoints",
                                        "eval_tokens", "dead_after_tokens", "auxk_k")),
    _batch_topk_needs_topk,
    ("parallel", _one_of(("data", "features"), "'data' or 'features'")),
    ("sparse_decode", ((lambda v: v in (None, True, False)), "must be true, false or null, got {value!r}")),
    _sparse_decode_needs_topk,
    ("auxk_coeff", NUMBER_AT_LEAST_0),
    _auxk_needs_topk,
    ("sparsity_per_d_model", ((lambda v: isinstance(v, bool)), "must be true or false, got {value!r}")),
    *((name, POSITIVE_NUMBER) for name in ("lr", "sparsity_c", "max_grad_norm")),
    *((name, FRACTION) for name in ("decay_fraction", "sparsity_warmup_fraction")),
    _cache_tokens_fit,
    ("skip_lr_scale", NUMBER_AT_LEAST_0),
    _skip_lr_needs_skip,
    ("skip_init_tokens", ((lambda v: _is_int(v) and v >= 0), "must be an integer >= 0, got {value!r}")),
    _skip_init_needs_skip,
    _skip_init_whole_batches,
    ("cache_dtype", _one_of(DTYPES, "one of " + ", ".join(DTYPES))),
    ("bad_records", _one_of(("raise", "skip"), "'raise' or 'skip'")),
    _hub_repo,
    _one_batch_at_least,
)


def _problem(cfg: TrainConfig, check: Check) -> str | None:
    """What is wrong with `cfg` by one of CHECKS, or None."""
    if callable(check):
        return check(cfg)
    name, (ok, problem) = check
    value = operator.attrgetter(name)(cfg)
    return None if ok(value) else f"training field '{name}' " + problem.format(value=value)

def _given_flags(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flags given (not None): the run's own fields, and the transcoder's ('transcoder.FIELD' -> FIELD)."""
    given = {key: value for key, value in flags.items() if value is not None}
    nested = {key.removeprefix("transcoder."): value for key, value in given.items() if key.startswith("transcoder.")}
    return {key: value for key, value in given.items() if not key.startswith("transcoder.")}, nested

def _apply_set(data: dict[str, Any], arch: dict[str, Any], item: str) -> None:
    """One `--set FIELD=VALUE` (or transcoder.FIELD=VALUE) into the merged mappings; the value is YAML."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--set {item!r}: write FIELD=VALUE, e.g. --set warmup_steps=50")
    key = key.strip()
    if key.startswith("transcoder."):
        arch[key.removeprefix("transcoder.")] = parse_yaml(value, f"--set {key}")
    else:
        data[key] = parse_yaml(value, f"--set {key}")

@functools.cache
def _field_types() -> dict[str, Any]:
    return {name: hint for name, hint in typing.get_type_hints(TrainConfig).items() if name != "transcoder"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _ranks() -> tuple[int, int]:
    """(processes on this machine, processes in all), from torchrun's environment (1, 1 without it)."""
    def number(name: str) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() and int(value) > 0 else 1
    world = number("WORLD_SIZE")
    return min(number("LOCAL_WORLD_SIZE"), world), world


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (psutil, else /proc/meminfo's MemAvailable, also capped by a
    cgroup v2 limit); None when neither says."""
    found: int | None = None
    try:
        import psutil

        found = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:  # a container's own limit, where it is lower than the machine's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit.isdigit():
            found = min(found, int(limit) - used) if found is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return found


def _gpu_memory(device: str) -> int | None:
    """Free bytes of a CUDA device; None for any other device or when it cannot be asked."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        return int(torch.cuda.mem_get_info(int(device.partition(":")[2] or 0))[0])
    except (RuntimeError, AssertionError, ValueError):
        return None


def local_model(model: str) -> str | None:
    """What transformers can read a model's config and tokenizer from without the network, the weights or a GGUF
    conversion: a folder or Hub id as given (transformers then looks only on this machine), a known model's
    converted folder once it exists; None for a GGUF file or a known model not yet converted."""
    from clt_hub.artifacts.hub import cache_root
    from clt_hub.models.known import KNOWN

    if model in KNOWN:
        folder = cache_root() / "models" / model
        return str(folder) if (folder / "config.json").is_file() else None
    return None if model.lower().endswith(".gguf") else model


def local_model_config(model: str) -> Any | None:
    """A model's transformers config, read from this machine alone (see `local_model`); None when it is not
    there or cannot be read (the full load then reports the problem in its own words)."""
    source = local_model(model)
    if source is None:
        return None
    try:
        import transformers

        return transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception:  # any failure: left to the full load, which says what is wrong
        return None


def model_shape(model: str) -> tuple[int, int] | None:
    """(blocks, width) of a model from its config alone (`local_model_config`), or None."""
    config = local_model_config(model)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n, d = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if isinstance(n, int) and isinstance(d, int) and not isinstance(n, bool) and not isinstance(d, bool) \
            and n > 0 and d > 0:
        return n, d
    return None


# Fields a resumed run may change: none of them changes the trained weights or the batch stream.
#   out_dir: the run folder may be moved; log_every, checkpoint_every, keep_checkpoints, tensorboard: bookkeeping;
#   eval_dataset, eval_tokens, push_to_hub: what happens after the last step; dead_after_tokens: only the
#   reported dead fraction (unless auxk_coeff > 0: then it picks AuxK's features, and config_changes counts it); device, parallel: where the same arithmetic runs (checkpoints hold full tensors and
#   load on any world size; another device can differ in the last bits, as any hardware change does);
#   sparse_decode: the same function summed in another order (last bits, like device);
#   bad_records: a run that got past a "raise" pre-flight has no bad record to skip, and one in "skip" mode that
#   met none reads the same stream in "raise" mode (one that met some is refused by the pre-flight, by name).
# Everything else (model, dataset, text_field, split, n_tokens, lr, seed, schedule, batch sizes, the buffer, the
# cache, amp, the transcoder) changes what is trained, so resume refuses it unless allow_config_change is given.
FREE_ON_RESUME = frozenset({"out_dir", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard",
                            "eval_dataset", "eval_tokens", "push_to_hub", "dead_after_tokens", "device",
                            "parallel", "bad_records", "sparse_decode"})
# Fields that change the shapes (or the set) of the trained tensors: no override can continue those.
SHAPE_FIELDS = frozenset({"transcoder.d_sae", "transcoder.kind", "transcoder.activation", "transcoder.skip"})

_MISSING = object()


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """A saved or current config as {field: value}, transcoder fields as 'transcoder.FIELD'. A flat (pre-nesting)
    config's Architecture fields are moved under 'transcoder.'."""
    arch_names = {f.name for f in dataclasses.fields(Architecture)}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "transcoder" and isinstance(value, dict):
            out.update({f"transcoder.{k}": v for k, v in value.items()})
        elif key in arch_names:
            out[f"transcoder.{key}"] = value
        else:
            out[key] = value
    return out


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls, prefix in ((TrainConfig, ""), (Architecture, "transcoder.")):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[prefix + f.name] = f.default
    return out


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, new value)} for every field, other than FREE_ON_RESUME, in which `cfg` differs from
    a checkpoint's saved config. A field the checkpoint does not record counts as its default."""
    old, new, defaults = _flat(saved), _flat(cfg.to_dict()), _defaults()
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(new.keys() | old.keys()):
        if key in FREE_ON_RESUME or key not in new:  # a field this version no longer has cannot be compared
            continue
        before = old.get(key, defaults.get(key, _MISSING))
        if before is _MISSING or before != new[key]:
            changes[key] = (None if before is _MISSING else before, new[key])
    auxk = any(float(c.get("auxk_coeff", defaults["auxk_coeff"]) or 0) > 0 for c in (old, new))
    before = old.get("dead_after_tokens", defaults["dead_after_tokens"])
    if auxk and before != new["dead_after_tokens"]:   # it chooses AuxK's dead features: it changes training
        changes["dead_after_tokens"] = (before, new["dead_after_tokens"])
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changes.items())


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML training config (the CLI merges flags into it before validating)."""
    from clt_hub.config import load_yaml

    data = load_yaml(Path(path), what="training config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of TrainConfig fields")
    return data
