"""clt_hub: cross-layer transcoders on the Hugging Face Hub, attribution graphs and interventions.

Imports are lazy so `import clt_hub` (and the CLI's --help) stay fast. The names below are the everyday
API; everything else lives in the subpackages (transcoders, loading, models, attribution, training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Architecture": "clt_hub.config",
    "TranscoderConfig": "clt_hub.config",
    "Transcoder": "clt_hub.transcoders.transcoder",
    "CrossLayerTranscoder": "clt_hub.transcoders.transcoder",
    "PerLayerTranscoder": "clt_hub.transcoders.transcoder",
    "load": "clt_hub.models.loading",
    "load_model": "clt_hub.models.loading",
    "attribute": "clt_hub.attribution.attribute",
    "prune": "clt_hub.attribution.pruning",
    "scores": "clt_hub.attribution.pruning",
    "trace": "clt_hub.attribution.trace",
    "TraceOptions": "clt_hub.attribution.options",
    "Intervention": "clt_hub.attribution.interventions",
    "intervene": "clt_hub.attribution.interventions",
    "TrainConfig": "clt_hub.training.config",
    "train": "clt_hub.training.run",
    "CltHubError": "clt_hub.errors",
    "ArtifactError": "clt_hub.errors",
    "ConfigError": "clt_hub.errors",
    "HubError": "clt_hub.errors",
}

if TYPE_CHECKING:
    from clt_hub.attribution.attribute import attribute
    from clt_hub.attribution.interventions import Intervention, intervene
    from clt_hub.attribution.options import TraceOptions
    from clt_hub.attribution.pruning import prune, scores
    from clt_hub.attribution.trace import trace
    from clt_hub.config import Architecture, TranscoderConfig
    from clt_hub.errors import ArtifactError, CltHubError, ConfigError, HubError
    from clt_hub.models.loading import load, load_model
    from clt_hub.training.config import TrainConfig
    from clt_hub.training.run import train
    from clt_hub.transcoders.transcoder import CrossLayerTranscoder, PerLayerTranscoder, Transcoder


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clt_hub' has no attribute {name!r}")


__all__ = [
    "Architecture",
    "ArtifactError",
    "CltHubError",
    "ConfigError",
    "CrossLayerTranscoder",
    "HubError",
    "Intervention",
    "PerLayerTranscoder",
    "TraceOptions",
    "TrainConfig",
    "Transcoder",
    "TranscoderConfig",
    "attribute",
    "intervene",
    "load",
    "load_model",
    "prune",
    "scores",
    "trace",
    "train",
]
