"""`from_pretrained` / `save_pretrained` / `push_to_hub` for transcoders, as a mixin.

As with `transformers`' `PushToHubMixin`, the Hub and layout code (`clt_hub.artifacts`) never imports a
model class: layout readers return a config and tensors, and the mixin builds the module through `cls`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clt_hub.artifacts.hub import push_folder, resolve
from clt_hub.artifacts.layouts import read, write

if TYPE_CHECKING:
    from typing_extensions import Self

    from clt_hub.artifacts.lazy import RowSource
    from clt_hub.config import TranscoderConfig


class HubMixin:
    """Needs `cfg`, `tensors()` and a `from_tensors(cfg, tensors, lazy_decoders, device, dtype)` classmethod."""

    cfg: TranscoderConfig

    if TYPE_CHECKING:  # provided by the model class

        def tensors(self) -> dict[str, torch.Tensor]: ...

        @property
        def dtype(self) -> torch.dtype: ...

        @classmethod
        def from_tensors(cls, cfg: TranscoderConfig, tensors: Mapping[str, torch.Tensor],
                         lazy_decoders: Mapping[int, RowSource] | None = None,
                         device: torch.device | str | None = None,
                         dtype: torch.dtype | str | None = None) -> Self: ...

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        token: str | bool | None = None,
        lazy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> Self:
        """Load from a local folder, a Hub repo id or a registry name, in any supported layout.

        `lazy=True` leaves decoders on disk and reads only the rows that are asked for (CLT layout)."""
        root = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                       force_download=force_download, token=token)
        artifact = read(root, lazy=lazy)
        return cls.from_tensors(artifact.cfg, artifact.tensors, artifact.lazy or None, device=device, dtype=dtype)

    def save_pretrained(self, save_directory: str | os.PathLike[str], layout: str = "native",
                        overwrite: bool = True) -> Path:
        """Write the artifact atomically (the folder appears complete or not at all)."""
        return write(self.tensors(), self.cfg, self.dtype, save_directory, layout=layout, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                    commit_message: str | None = None, token: str | bool | None = None, create_pr: bool = False,
                    layout: str = "native") -> str:
        """Save to a scratch folder, create the repo (and branch) if needed, upload in one commit; returns
        the commit URL."""
        with tempfile.TemporaryDirectory(prefix="clt-hub-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "artifact", layout=layout)
            return push_folder(folder, repo_id, revision=revision, private=private, commit_message=commit_message,
                               token=token, create_pr=create_pr)
