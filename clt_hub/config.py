"""Typed transcoder config, validated once at the boundary so the rest of the code can trust it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from clt_hub.errors import ConfigError

Kind = Literal["clt", "plt"]
ACTIVATIONS = ("jumprelu", "relu", "topk")
KINDS = ("clt", "plt")
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class TranscoderConfig:
    """Everything needed to rebuild a transcoder's shapes and to say where it attaches.

    `kind="clt"` gives every layer-l feature a decoder to each layer l' >= l; `kind="plt"` keeps only
    the l -> l decoder (a set of per-layer transcoders). Hook names follow two conventions because
    people use both: TransformerLens names (what circuit-tracer and SAE-Lens metadata carry) and
    Hugging Face module paths with `{layer}` placeholders (what clt_hub's adapters use).
    """

    n_layers: int
    d_model: int
    d_sae: int
    kind: Kind = "clt"
    activation: str = "jumprelu"
    topk: int | None = None
    skip: bool = False
    dtype: str = "float32"
    model_name: str = ""
    feature_input_hook: str = "hook_resid_mid"
    feature_output_hook: str = "hook_mlp_out"
    hf_hook_name: str = ""
    hf_hook_name_out: str = ""
    context_size: int | None = None
    prepend_bos: bool = True
    dataset_path: str = ""
    neuronpedia_id: str | None = None
    jumprelu_bandwidth: float = 2.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
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
        if self.activation == "topk" and (not isinstance(self.topk, int) or not 0 < self.topk <= self.d_sae):
            raise ConfigError(
                f"activation 'topk' needs config field 'topk' as an integer in 1..d_sae={self.d_sae}, "
                f"got {self.topk!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"config field 'dtype' is {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if not (isinstance(self.jumprelu_bandwidth, (int, float)) and math.isfinite(self.jumprelu_bandwidth)
                and self.jumprelu_bandwidth > 0):
            raise ConfigError(f"config field 'jumprelu_bandwidth' must be a positive number, got {self.jumprelu_bandwidth!r}")
        if not isinstance(self.metrics, dict):
            raise ConfigError("config field 'metrics' must be a mapping of metric name to value")

    def n_targets(self, layer: int) -> int:
        """Number of output layers a feature at `layer` decodes to."""
        return self.n_layers - layer if self.kind == "clt" else 1

    def target_layers(self, layer: int) -> range:
        return range(layer, self.n_layers) if self.kind == "clt" else range(layer, layer + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TranscoderConfig:
        """Build from a mapping, rejecting unknown keys instead of silently dropping them."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
        check_fields(cls, data, ("n_layers", "d_model", "d_sae"), source)
        try:
            return cls(**data)
        except ConfigError as exc:
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
