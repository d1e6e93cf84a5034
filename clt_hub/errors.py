"""Error types: every failure a user can cause names the culprit and the fix."""

from __future__ import annotations


class CltHubError(Exception):
    """Base class for errors clt_hub raises on purpose."""


class ConfigError(CltHubError, ValueError):
    """A config field is missing, has the wrong type or an unsupported value."""


class ArtifactError(CltHubError):
    """A transcoder artifact on disk is missing files, malformed or inconsistent."""


class HubError(CltHubError):
    """The Hub (or the local cache standing in for it) could not provide an artifact."""


class TrainingError(CltHubError):
    """Training cannot go on (NaN loss, unwritable checkpoint); the message names the last good checkpoint."""
