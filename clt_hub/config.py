"""Typed transcoder configs, validated once at the boundary so the rest of the code can trust them.

`Architecture` is what a user chooses (width, kind, activation, hooks); `TranscoderConfig` adds what the
model fixes (layers, width of the residual stream) and what an artifact records about itself. A training
run nests an `Architecture`, so every field has one definition and one default.

The YAML and JSON files clt_hub reads go through the one loader here (`load_yaml`, `load_json`, and
`parse_json_text` for JSON lines): no YAML aliases, a size cap checked before reading, a nesting cap, and one
error line naming the file, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

from clt_hub.errors import CltHubError, ConfigError

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


def finite_number(value: Any) -> bool:
    """A number (not a bool) that is a finite float: math.isfinite(10**400) raises OverflowError, so a huge YAML
    integer is refused here rather than in the middle of a check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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


# One loader for every YAML and JSON file clt_hub reads: artifact configs (config.yaml, cfg.json, config.json),
# training configs, registries, task files, graph JSON, activation cache manifests, safetensors headers. A file
# is refused by name before it is read when it is bigger than its cap; YAML is read with safe types only and no
# aliases (a few hundred bytes of nested aliases expand to gigabytes: a "billion laughs"); lists and mappings may
# nest at most MAX_DEPTH deep (Python's parsers recurse: deeper input was a RecursionError). Every refusal is one
# line: the file, the problem, the fix. Values are checked by their readers, not here.
MAX_FILE_BYTES = 16 << 20    # a task file, cache manifest or other small JSON/YAML file
MAX_DEPTH = 64               # real files nest a handful of levels; Python's json gives up near 1,000

Source = str | bytes | os.PathLike[str]   # a path (os.PathLike) is read; str and bytes are the text itself


class ParseError(ValueError):
    """What is wrong with a JSON/YAML text, without saying where it came from: `load_json` and `load_yaml` put
    the file and the fix around it; readers that report bad records themselves (text datasets) use it as is."""


class _Refused(yaml.composer.ComposerError):
    """A YAML construct clt_hub never reads (an alias, nesting beyond the cap): refused while composing, before
    anything is built from it."""

    def __init__(self, problem: str, mark: Any, hint: str = "") -> None:
        super().__init__(None, None, problem, mark)
        self.hint = hint


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases and at most `max_depth` nested lists and mappings."""

    max_depth = MAX_DEPTH

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _Refused("YAML aliases (*name) are not allowed in clt_hub files", self.peek_event().start_mark,
                           "write each value out in full")
        return super().compose_node(parent, index)

    def compose_sequence_node(self, anchor: Any) -> Any:
        return self._nested(super().compose_sequence_node, anchor)

    def compose_mapping_node(self, anchor: Any) -> Any:
        return self._nested(super().compose_mapping_node, anchor)

    def _nested(self, compose: Any, anchor: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > self.max_depth:
                raise _Refused(f"lists and mappings nested more than {self.max_depth} levels deep",
                               self.peek_event().start_mark)
            return compose(anchor)
        finally:
            self.depth -= 1


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _decode(text: str | bytes) -> str:
    try:
        return text.decode("utf-8") if isinstance(text, bytes) else text
    except UnicodeDecodeError as exc:
        raise ParseError(f"not UTF-8 text (byte {exc.start})") from None


def parse_yaml_text(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The value of a YAML text (safe types only, no aliases, at most `max_depth` levels), or ParseError."""
    text, loader = _decode(text), None
    try:
        loader = _NoAliasLoader(text)  # its reader refuses control characters here
        loader.max_depth = max_depth
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = _one_line(str(exc.problem or exc.context or type(exc).__name__))
        if isinstance(exc, _Refused):
            raise ParseError(f"{problem} ({at})" + (f": {exc.hint}" if exc.hint else "")) from None
        raise ParseError(f"not valid YAML ({problem}{', ' + at if at else ''})") from None
    except yaml.reader.ReaderError as exc:
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise ParseError(f"not valid YAML (character {char} at position {exc.position}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ParseError(f"not valid YAML ({_one_line(str(exc))})") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # a safe constructor failing on a tagged or odd scalar: 2024-02-30, `!!int abc`, a 5,000-digit integer
        raise ParseError(f"not valid YAML (a value cannot be read: {_one_line(str(exc))})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _deeper_than(data: Any, max_depth: int) -> bool:
    """Whether lists and dicts (as json.loads makes them) nest more than `max_depth` levels in `data`: level by
    level, no recursion (a 57 MB graph file: 0.5 s on top of json.loads's 1.4 s)."""
    level, depth = [data], 1
    while level:
        if depth > max_depth:
            return True
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level, depth = below, depth + 1
    return False


def parse_json_text(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with a nesting cap (at most `max_depth` levels of arrays and objects), or ParseError."""
    text = _decode(text)
    deep = f"not valid JSON (arrays and objects nested more than {max_depth} levels deep)"
    try:
        data = json.loads(text)
    except RecursionError:  # deeper than Python's parser goes (about 1,000 levels): refused the same way
        raise ParseError(deep) from None
    except json.JSONDecodeError as exc:
        one_line = exc.lineno == 1 and "\n" not in text.rstrip()
        at = f"column {exc.colno}" if one_line else f"line {exc.lineno}, column {exc.colno}"
        raise ParseError(f"not valid JSON ({exc.msg}, {at})") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ParseError(f"not valid JSON ({_one_line(str(exc))})") from None
    # fewer brackets than the cap cannot nest deeper than it: most texts skip the walk
    if text.count("[") + text.count("{") > max_depth and isinstance(data, (dict, list)) and _deeper_than(data, max_depth):
        raise ParseError(deep)
    return data


def read_text(path: str | os.PathLike[str], *, what: str = "file", max_bytes: int = MAX_FILE_BYTES,
              error: type[CltHubError] = ConfigError, fix: str = "fix the file", source: str | None = None) -> str:
    """A file's UTF-8 text, refused (as `error`, naming the file) when it is missing, a folder, unreadable, bigger
    than `max_bytes` (checked before it is read, and again while reading) or not UTF-8."""
    where = source or str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(max_bytes + 1) if size <= max_bytes else b""
            if size > max_bytes or len(raw) > max_bytes:
                raise error(f"{where}: {max(size, len(raw)):,} bytes; a {what} is at most {max_bytes:,}; {fix}")
    except FileNotFoundError:
        raise error(f"{where}: file is missing; {fix}") from None
    except IsADirectoryError:
        raise error(f"{where} is a folder where a file belongs; {fix}") from None
    except OSError as exc:
        raise error(f"{where}: cannot be read ({exc.strerror or type(exc).__name__}); {fix}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start}); {fix}") from None


def _load(parse: Any, text_or_path: Source, source: str | None, what: str, max_bytes: int, max_depth: int,
          error: type[CltHubError], fix: str) -> Any:
    if isinstance(text_or_path, (str, bytes)):
        where = source or what
        if len(text_or_path) > max_bytes:
            unit = "characters" if isinstance(text_or_path, str) else "bytes"
            raise error(f"{where}: {len(text_or_path):,} {unit}; a {what} is at most {max_bytes:,}; {fix}")
        text: str | bytes = text_or_path
    else:
        where = source or str(text_or_path)
        text = read_text(text_or_path, what=what, max_bytes=max_bytes, error=error, fix=fix, source=where)
    try:
        return parse(text, max_depth)
    except ParseError as exc:
        raise error(f"{where}: {exc}; {fix}") from None


def load_yaml(text_or_path: Source, *, source: str | None = None, what: str = "config file",
              max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH, error: type[CltHubError] = ConfigError,
              fix: str = "fix the file") -> Any:
    """The value of a YAML file (a path) or text (a str), safe types only, no aliases, at most `max_bytes` and
    `max_depth` levels deep; anything else is one `error` naming `source` (default: the path), the problem and
    `fix`."""
    return _load(parse_yaml_text, text_or_path, source, what, max_bytes, max_depth, error, fix)


def load_json(text_or_path: Source, *, source: str | None = None, what: str = "JSON file",
              max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH, error: type[CltHubError] = ConfigError,
              fix: str = "fix the file") -> Any:
    """The value of a JSON file (a path) or text (str or bytes), at most `max_bytes` and `max_depth` levels deep;
    anything else is one `error` naming `source` (default: the path), the problem and `fix`."""
    return _load(parse_json_text, text_or_path, source, what, max_bytes, max_depth, error, fix)


def parse_yaml(text: str, source: str) -> Any:
    """The value of a short YAML text, such as a `--set` value (see `load_yaml`): ConfigError naming `source`
    otherwise."""
    return load_yaml(text, source=source, what="YAML value", fix=f"correct {source}")


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
        if not finite_number(bw) or bw <= 0:
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
    unknown = sorted(str(k) for k in data if k not in known)  # YAML keys may be ints or null: str, then sort
    # a key with a line break or other unprintable character is quoted, so the error stays one line
    unknown = [k if k.isprintable() and k.strip() == k and k else repr(k) for k in unknown]
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
        )
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
