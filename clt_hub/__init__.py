"""clt_hub: cross-layer transcoders on the Hugging Face Hub, attribution graphs and interventions.

Imports are lazy so `import clt_hub` (and the CLI's --help) stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "TranscoderConfig": "clt_hub.config",
    "Transcoder": "clt_hub.transcoders.transcoder",
    "CrossLayerTranscoder": "clt_hub.transcoders.transcoder",
    "PerLayerTranscoder": "clt_hub.transcoders.transcoder",
    "CltHubError": "clt_hub.errors",
    "ArtifactError": "clt_hub.errors",
    "ConfigError": "clt_hub.errors",
    "HubError": "clt_hub.errors",
}

if TYPE_CHECKING:
    from clt_hub.config import TranscoderConfig
    from clt_hub.errors import ArtifactError, CltHubError, ConfigError, HubError
    from clt_hub.transcoders.transcoder import CrossLayerTranscoder, PerLayerTranscoder, Transcoder


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clt_hub' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "CltHubError",
    "ConfigError",
    "CrossLayerTranscoder",
    "HubError",
    "PerLayerTranscoder",
    "Transcoder",
    "TranscoderConfig",
]
