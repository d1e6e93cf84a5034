"""Atomic writes: an artifact folder appears complete or not at all, and so does a file replaced in one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
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
OLD = ".old-"  # a replaced folder, renamed .<name>.old-<random> for the instant before it is deleted
# A save cleans up the scratch folders of earlier interrupted saves of the same destination: those untouched for
# STALE_AFTER_S whose writer (pid and host in the marker) is no longer running on this host, and those untouched
# for ORPHAN_AFTER_S whose writer cannot be checked (another host, no marker). A live save is never removed.
STALE_AFTER_S = 10 * 60
ORPHAN_AFTER_S = 60 * 60


def is_interrupted_write(path: Path) -> bool:
    """A scratch folder left by a killed save. Its name says so even in the instant between its creation
    and the marker file's."""
    return (path / INCOMPLETE_MARKER).exists() or (path.name.startswith(".") and PARTIAL in path.name)


def _marker_text() -> str:
    """What the marker says, and who writes: remove_stale_scratch tells a running save from a killed one by it."""
    return f"this folder is an interrupted write; delete it\npid={os.getpid()}\nhost={socket.gethostname()}\n"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        return True
    return True


def _writer_gone(scratch: Path) -> bool | None:
    """Whether the save that made `scratch` has ended (True), is running (False), or cannot be told (None)."""
    try:
        text = (scratch / INCOMPLETE_MARKER).read_text(errors="replace")[:1000]
    except OSError:
        return None
    pid, host = re.search(r"^pid=(\d{1,10})$", text, re.M), re.search(r"^host=(.*)$", text, re.M)
    if pid is None or host is None or host.group(1) != socket.gethostname():
        return None
    return not _pid_alive(int(pid.group(1)))


def _last_touched(folder: Path) -> float:
    """The newest modification time of `folder` and anything in it (a file being written keeps it current)."""
    newest = folder.lstat().st_mtime
    for dirpath, dirnames, files in os.walk(folder):
        for name in dirnames + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def remove_stale_scratch(dst: Path) -> list[Path]:
    """Delete what interrupted saves of `dst` left beside it (see STALE_AFTER_S); returns what was removed.
    Never raises: a save must not fail over another save's leftovers."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}({re.escape(PARTIAL)}|{re.escape(OLD)})[A-Za-z0-9_]+")
    removed: list[Path] = []
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        try:
            if not m or entry.is_symlink() or not entry.is_dir():
                continue
            age = now - _last_touched(entry)
            gone = _writer_gone(entry) if m.group(1) == PARTIAL else None
            if (gone is True and age > STALE_AFTER_S) or (gone is None and age > ORPHAN_AFTER_S):
                shutil.rmtree(entry)
                removed.append(entry)
        except OSError:
            continue
    return removed


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
    loader looks at and a later save of `dst` deletes once its writer is gone (remove_stale_scratch). An
    existing folder is replaced only if it is empty or is itself an artifact, so a typo in the output path
    cannot delete unrelated files."""
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
    remove_stale_scratch(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{PARTIAL}", dir=dst.parent))
    (tmp / INCOMPLETE_MARKER).write_text(_marker_text())
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace one file's contents in one step (a temporary file beside it, synced, then renamed over it):
    a reader sees the old file or the new one, never a part. The file keeps its permission bits."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
