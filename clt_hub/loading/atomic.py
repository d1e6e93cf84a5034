"""Atomic folder writes: an artifact folder appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clt_hub.errors import ArtifactError

# Files that mark a folder as a transcoder artifact we may replace on overwrite.
ARTIFACT_MARKERS = ("cfg.json", "config.yaml", "README.md")
# Present while a write is in progress; loaders refuse folders that still carry it.
INCOMPLETE_MARKER = ".clt_hub_incomplete"
PARTIAL = ".partial-"  # scratch folders are named .<name>.partial-<random>


def is_interrupted_write(path: Path) -> bool:
    """A scratch folder left by a killed save. Its name says so even in the instant between its creation
    and the marker file's."""
    return (path / INCOMPLETE_MARKER).exists() or (path.name.startswith(".") and PARTIAL in path.name)


def _looks_replaceable(path: Path) -> bool:
    entries = list(path.iterdir())
    return not entries or any((path / m).exists() for m in ARTIFACT_MARKERS)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish_tree(root: Path) -> None:
    """fsync every file, and give files and folders the modes the user's umask asks for: the scratch folder
    comes from mkdtemp (0700) and some writers (safetensors) create files 0600."""
    mask = _umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_directory(dst: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a scratch folder next to `dst`; on success it is renamed onto `dst` in one step.

    If the process dies mid-write, only a hidden `.<name>.partial-*` folder is left behind, which no
    loader looks at. An existing folder is replaced only if it is empty or is itself an artifact,
    so a typo in the output path cannot delete unrelated files."""
    dst = Path(dst)
    if dst.exists():
        if not dst.is_dir():
            raise ArtifactError(f"{dst} exists and is a file; choose a folder path")
        if not overwrite:
            raise ArtifactError(f"{dst} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        if not _looks_replaceable(dst):
            raise ArtifactError(
                f"{dst} exists and holds files that are not a transcoder artifact; refusing to replace it. "
                "Choose an empty or new folder"
            )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{PARTIAL}", dir=dst.parent))
    (tmp / INCOMPLETE_MARKER).write_text("this folder is an interrupted write; delete it\n")
    try:
        yield tmp
        _finish_tree(tmp)
        (tmp / INCOMPLETE_MARKER).unlink()
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
