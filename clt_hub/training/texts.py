"""Text sources for training, evaluation and feature contexts: local files or a `datasets` dataset.

Local sources are a .txt file (one document per non-empty line), a .jsonl file (one JSON object per
line with a text field), or a folder of those. Anything else is taken as a Hugging Face dataset
name and streamed, so a corpus never has to fit in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from clt_hub.errors import ConfigError

SUFFIXES = (".txt", ".jsonl")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"dataset folder {path} has no .txt or .jsonl files")
        return files
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"dataset file {path} is not .txt (one document per line) or .jsonl")
    return [path]


def _local(path: Path, text_field: str) -> Iterator[str]:
    for file in _files(path):
        with file.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if file.suffix == ".txt":
                    yield line
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{file}:{n} is not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ConfigError(f"{file}:{n} has no string field {text_field!r}; pass --text-field")
                yield record[text_field]


def iter_texts(source: str | Path, *, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents from `source`, in order, lazily."""
    path = Path(source)
    if path.exists():
        yield from _local(path, text_field)
        return
    if str(source).endswith(SUFFIXES) or str(source).startswith((".", "/", "~")):
        raise ConfigError(f"dataset {source} does not exist; give a .txt/.jsonl file, a folder, or a dataset name")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{source!r} is not a local file; reading Hub datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(str(source), split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot open it"
        raise ConfigError(f"cannot open dataset {source!r} (split {split!r}): {exc}. Is it a local path, "
                          "or is the Hub reachable (HF_HUB_OFFLINE unset)?") from None
    for record in ds:
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ConfigError(f"dataset {source!r} has no string column {text_field!r}; pass --text-field")
        yield text
