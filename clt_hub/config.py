"""Typed transcoder configs, validated once at the boundary so the rest of the code can trust them.

`Architecture` is what a user chooses (width, kind, activation, hooks); `TranscoderConfig` adds what the
model fixes (layers, width of the residual stream) and what an artifact records about itself. A training
run nests an `Architecture`, so every field has one definition and one default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

from clt_hub.errors import ConfigError

if TYPE_CHECKING:
    import torch

Kind = Literal["clt", "plt"]
ACTIVATIONS = ("jumprelu", "relu", "topk")
KINDS = ("clt", "plt")
DTYPES = ("float32", "float16", "bfloat16", "float64")  # the float types weights and activations may use


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16 (a torch dtype passes through); unknown names are a ConfigError.
    (torch is imported here, not at module level, so configs and the CLI's --help stay fast.)"""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the name configs store)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype} is not a float type transcoders use; use one of {', '.join(DTYPES)}")
    return name


# Sanity bounds, checked before anything is allocated from a config: far above any real transcoder (the
# largest public CLTs have tens of layers and at most a few million features per layer) and far below what
# would exhaust a machine's memory from one hostile config line.
MAX_LAYERS = 4096
MAX_D_MODEL = 1 << 17
MAX_D_SAE = 1 << 26
MAX_CONFIG_BYTES = 1 << 20   # a config file bigger than this is not a config
MAX_METRICS = 1000


def _positive_int(value: Any, limit: int | None = None) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0 and (limit is None or value <= limit)


def _check_int(name: str, value: Any, limit: int) -> None:
    if not _positive_int(value, limit):
        raise ConfigError(f"config field '{name}' must be a positive integer of at most {limit:,}, got {value!r}")


def _check_str(name: str, value: Any, optional: bool = False) -> None:
    if (value is None and optional) or (isinstance(value, str) and len(value) <= 1000):
        return
    raise ConfigError(f"config field '{name}' must be a string{' or null' if optional else ''} of at most 1000 "
                      f"characters, got {type(value).__name__}")


_HOOK_TEMPLATE = re.compile(r"(?:[A-Za-z0-9_.:]|\{layer\})*")  # ":input": a module's input side


def _check_hook_template(name: str, value: str) -> None:
    """A Hugging Face module path whose only placeholder is `{layer}`: never handed to str.format, whose format
    specs (`{layer:>900000000}`) would let a config allocate gigabytes or raise raw errors."""
    if not _HOOK_TEMPLATE.fullmatch(value):
        raise ConfigError(f"config field '{name}' must be a module path of letters, digits, '_', '.' and ':' with "
                          f"{{layer}} as its only placeholder (e.g. model.layers.{{layer}}.mlp), got {value[:80]!r}")


def hook_for_layer(template: str, layer: int) -> str:
    """A checked hook template (`_check_hook_template`) for one layer."""
    return template.replace("{layer}", str(layer))


def check_repo_id(repo_id: Any, what: str = "repo id") -> None:
    """A Hub repo id the client will accept ("org/name"), checked before work that ends in a push."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or "/" not in repo_id:
            raise HFValidationError("it needs the form org/name")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"{what} {repo_id!r} is not a Hub repo id ({str(exc).splitlines()[0]}); write "
                          "org/name with letters, digits, '-', '_' or '.'") from None


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a few hundred bytes of nested aliases expand to millions of nodes (a
    "billion laughs"), which a config never needs."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in clt_hub configs",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    """The value of a YAML text (safe types only, no aliases, at most MAX_CONFIG_BYTES)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters; a config is at most {MAX_CONFIG_BYTES:,}")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None


@dataclass(kw_only=True)
class Architecture:
    """What a transcoder is, before a model sizes it: width, kind, activation and where it attaches.

    `kind="clt"` gives every layer-l feature a decoder to each layer l' >= l; `kind="plt"` keeps only the
    l -> l decoder (a set of per-layer transcoders). Hook names are TransformerLens names, which is what
    circuit-tracer and SAE-Lens metadata carry; the model adapters map them onto each family's modules.
    """

    d_sae: int = field(metadata={"help": "Features per layer."})
    kind: Kind = field(default="clt", metadata={"help": "clt (cross-layer) or plt (per-layer transcoders)."})
    activation: str = field(default="jumprelu", metadata={"help": "jumprelu, relu or topk."})
    topk: int | None = field(default=None, metadata={"help": "k of a topk activation."})
    skip: bool = field(default=False, metadata={"help": "Add a linear skip path (skip transcoder)."})
    jumprelu_bandwidth: float = field(default=1.0, metadata={
        "help": "Width of the rectangle kernel behind JumpReLU's threshold gradient (training only)."})
    feature_input_hook: str = field(default="hook_resid_mid", metadata={"help": "Where features read."})
    feature_output_hook: str = field(default="hook_mlp_out", metadata={"help": "What features reconstruct."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int("d_sae", self.d_sae, MAX_D_SAE)
        if self.kind not in KINDS:
            raise ConfigError(
                f"config field 'kind' is {self.kind!r}; supported kinds are {', '.join(KINDS)} "
                "(clt = cross-layer transcoder, plt = per-layer transcoders)"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"config field 'activation' is {self.activation!r}; supported activations are "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.activation == "topk" and not _positive_int(self.topk, self.d_sae):
            raise ConfigError(
                f"activation 'topk' needs config field 'topk' as an integer in 1..d_sae={self.d_sae}, "
                f"got {self.topk!r}"
            )
        if not isinstance(self.skip, bool):
            raise ConfigError(f"config field 'skip' must be true or false, got {self.skip!r}")
        bw = self.jumprelu_bandwidth
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not math.isfinite(bw) or bw <= 0:
            raise ConfigError(f"config field 'jumprelu_bandwidth' must be a positive number, got {bw!r}")
        for name in ("feature_input_hook", "feature_output_hook"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"config field '{name}' must be a hook name such as 'hook_resid_mid'")

    @classmethod
    def from_dict(cls, data: Any, source: str = "transcoder") -> Architecture:
        return from_mapping(cls, data, ("d_sae",), source)

    def sized(self, n_layers: int, d_model: int, **fields_: Any) -> TranscoderConfig:
        """The full config of this architecture on a model with `n_layers` blocks of width `d_model`."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(Architecture)}
        return TranscoderConfig(n_layers=n_layers, d_model=d_model, **own, **fields_)


@dataclass(kw_only=True)
class TranscoderConfig(Architecture):
    """Everything needed to rebuild a transcoder's shapes and to say where it attaches and what it is.

    Hugging Face module paths with `{layer}` placeholders (`hf_hook_name*`) are recorded beside the
    TransformerLens hook names for tools that hook modules directly."""

    n_layers: int
    d_model: int
    dtype: str = "float32"
    model_name: str = ""
    hf_hook_name: str = ""
    hf_hook_name_out: str = ""
    context_size: int | None = None
    prepend_bos: bool = True
    dataset_path: str = ""
    neuronpedia_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _check_int("n_layers", self.n_layers, MAX_LAYERS)
        _check_int("d_model", self.d_model, MAX_D_MODEL)
        super().validate()
        if self.dtype not in DTYPES:
            raise ConfigError(f"config field 'dtype' is {self.dtype!r}; use one of {', '.join(DTYPES)}")
        for name in ("model_name", "hf_hook_name", "hf_hook_name_out", "dataset_path"):
            _check_str(name, getattr(self, name))
        for name in ("hf_hook_name", "hf_hook_name_out"):
            _check_hook_template(name, getattr(self, name))
        _check_str("neuronpedia_id", self.neuronpedia_id, optional=True)
        if self.context_size is not None and not _positive_int(self.context_size, 1 << 24):
            raise ConfigError(f"config field 'context_size' must be a positive integer or null, got {self.context_size!r}")
        if not isinstance(self.prepend_bos, bool):
            raise ConfigError(f"config field 'prepend_bos' must be true or false, got {self.prepend_bos!r}")
        if not isinstance(self.metrics, dict) or len(self.metrics) > MAX_METRICS:
            raise ConfigError(f"config field 'metrics' must be a mapping of at most {MAX_METRICS} metric names to values")
        for key, value in self.metrics.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, (bool, int, float, str))):
                raise ConfigError(f"config field 'metrics' must map names to numbers or short texts; {key!r} holds "
                                  f"a {type(value).__name__}")

    @property
    def architecture(self) -> Architecture:
        return Architecture(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Architecture)})

    def n_targets(self, layer: int) -> int:
        """Number of output layers a feature at `layer` decodes to."""
        return self.n_layers - layer if self.kind == "clt" else 1

    def target_layers(self, layer: int) -> range:
        return range(layer, self.n_layers) if self.kind == "clt" else range(layer, layer + 1)

    def source_layers(self, layer: int) -> range:
        """Layers whose features write to output layer `layer`."""
        return range(layer + 1) if self.kind == "clt" else range(layer, layer + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> TranscoderConfig:
        """Build from a mapping, rejecting unknown keys instead of silently dropping them."""
        return from_mapping(cls, data, ("n_layers", "d_model", "d_sae"), source)


C = TypeVar("C")


def from_mapping(cls: type[C], data: Any, required: tuple[str, ...], source: str) -> C:
    """A config dataclass from a mapping (YAML, JSON, CLI options): unknown and missing fields are named,
    and every validation error says where the mapping came from."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    check_fields(cls, data, required, source)
    try:
        return cls(**data)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def check_fields(cls: Any, data: dict[str, Any], required: tuple[str, ...], source: str) -> None:
    """Reject unknown keys (instead of silently dropping them) and missing required ones, by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
        )
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
