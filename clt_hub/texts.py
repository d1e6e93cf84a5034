"""Text sources for training, evaluation and feature contexts: local files or a `datasets` dataset.

Local sources are a .txt file (one document per non-empty line), a .jsonl file (one JSON object per
line with a text field), or a folder of those. Anything else is taken as a Hugging Face dataset
name and streamed, so a corpus never has to fit in memory.

Bad records. A record is bad when it cannot give a text: bytes that are not UTF-8 (a binary or a
Latin-1 file), NUL bytes in a .txt line (binary data), a line longer than `MAX_RECORD_CHARS` (read in
pieces and dropped, so no file can make one record exhaust memory), invalid JSON or JSON nested more
than `clt_hub.config.MAX_DEPTH` levels deep, a record without a string text field, or a string that is
not valid Unicode (a lone surrogate such as the JSON escape "\\udc8b": valid JSON, but no tokenizer can
encode it). Every caller chooses what happens to them through `bad_records`:

- "raise" (the default): a `BadRecordError` (a ConfigError) naming the file and line, or the dataset and
  record number. Silently dropping data changes what a transcoder is trained or evaluated on, so the
  user decides; `check_source` finds the first bad record of a local source before any work starts
  (training runs it up front), so raising costs no finished work.
- "skip": the record is left out and counted in a `SkippedRecords` (count + the first few locations);
  without one a single warning names the first. For data known to be messy (web scrapes, Hub dumps).

A streamed `datasets` dataset is checked record by record in the same way (its strings can hold lone
surrogates too); it cannot be scanned ahead, so the trainer checkpoints before it stops on one.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clt_hub.config import ParseError, load_json, parse_json_text
from clt_hub.errors import ConfigError

SUFFIXES = (".txt", ".jsonl")
BAD_RECORDS = ("raise", "skip")
MAX_RECORD_CHARS = 32 * 1024 * 1024  # longer lines are bad records (a binary file has "lines" of any length)
SHOWN = 5  # locations kept for the report
PROGRESS_BYTES = 64 * 1024 * 1024  # check_source shows a progress bar for local sources larger than this

_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRecordError(ConfigError):
    """A record that cannot give a text; `where` is 'file:line' or 'dataset NAME (split) record N'."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where} {reason}")
        self.where, self.reason = where, reason


@dataclass
class SkippedRecords:
    """Bad records left out in "skip" mode: how many, and where the first few were."""

    count: int = 0
    first: list[str] = field(default_factory=list)     # 'where: reason' of the first SHOWN
    on_first: Callable[[str], None] | None = None      # told about the first skip (a warning, once)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.first) < SHOWN:
            self.first.append(f"{where}: {reason}")
        if self.count == 1 and self.on_first is not None:
            self.on_first(f"skipping bad record {where} ({reason}); more are counted, not shown")

    def summary(self) -> str:
        more = ", ..." if self.count > len(self.first) else ""
        return f"{self.count} bad record(s) skipped (first: {'; '.join(self.first)}{more})"


def _check_mode(bad_records: str) -> None:
    if bad_records not in BAD_RECORDS:
        raise ConfigError(f"bad_records is {bad_records!r}; use 'raise' or 'skip'")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"dataset folder {path} has no .txt or .jsonl files")
        return files
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"dataset file {path} is not .txt (one document per line) or .jsonl")
    return [path]


def _undecodable(line: str) -> str | None:
    """Why a line read with errors='surrogateescape' is not UTF-8 text, or None."""
    if line.isascii():
        return None
    m = _SURROGATE.search(line)
    if m is None:
        return None
    code = ord(m.group())
    byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "an encoded surrogate"
    return f"is not UTF-8 text ({byte} at column {m.start() + 1}; a binary or Latin-1 file?)"


def _not_unicode(text: str) -> str | None:
    """Why a decoded string cannot be encoded (tokenized), or None."""
    if text.isascii():
        return None
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"holds text that is not valid Unicode (lone surrogate \\u{ord(m.group()):04x} at character {m.start() + 1})"


def _lines(file: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, line without its newline) of a text file; None for a line over MAX_RECORD_CHARS.

    Undecodable bytes come through as lone surrogates (surrogateescape), so the caller decides per line;
    line breaks are Python's universal newlines, as before; a UTF-8 byte-order mark is dropped."""
    limit = MAX_RECORD_CHARS
    try:
        with file.open(encoding="utf-8-sig", errors="surrogateescape") as fh:
            n = 0
            while True:
                line = fh.readline(limit + 1)
                if not line:
                    return
                n += 1
                if len(line) > limit and not line.endswith("\n"):
                    while line and not line.endswith("\n"):  # drain the rest of the line, piece by piece
                        line = fh.readline(limit)
                    yield n, None
                    continue
                yield n, line.rstrip("\n")
    except OSError as exc:
        raise ConfigError(f"cannot read dataset file {file}: {exc.strerror or exc}") from None


def _bad(where: str, reason: str, bad_records: str, skipped: SkippedRecords) -> None:
    if bad_records == "raise":
        raise BadRecordError(where, reason)
    skipped.add(where, reason)


def _record_text(record: Any, text_field: str, kind: str, where: str, bad_records: str,
                 skipped: SkippedRecords) -> str | None:
    """A JSON record's or dataset row's text, or None after reporting it as bad (no string `text_field`,
    not valid Unicode)."""
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        _bad(where, f"has no string {kind} {text_field!r}; pass --text-field", bad_records, skipped)
        return None
    reason = _not_unicode(text)
    if reason is not None:
        _bad(where, reason, bad_records, skipped)
        return None
    return text


def _local(path: Path, text_field: str, bad_records: str, skipped: SkippedRecords) -> Iterator[str]:
    for file in _files(path):
        jsonl = file.suffix == ".jsonl"
        for n, line in _lines(file):
            if line is not None and not line.strip():
                continue
            where = f"{file}:{n}"
            if line is None:
                _bad(where, f"is longer than {MAX_RECORD_CHARS} characters (a binary file?)", bad_records, skipped)
                continue
            reason = _undecodable(line)
            if reason is None and not jsonl and "\x00" in line:
                reason = "contains NUL bytes (a binary file?)"
            if reason is not None:
                _bad(where, reason, bad_records, skipped)
                continue
            if not jsonl:
                yield line
                continue
            try:
                record = parse_json_text(line)  # nesting capped: "[[[[..." is a bad record, not a RecursionError
            except ParseError as exc:
                _bad(where, f"is {exc}", bad_records, skipped)
                continue
            text = _record_text(record, text_field, "field", where, bad_records, skipped)
            if text is not None:
                yield text


# names that are meant as files (a typo of a path, not a Hub dataset): never sent to the Hub
_FILE_LIKE = (*SUFFIXES, ".json", ".csv", ".tsv", ".parquet", ".gz", ".bz2", ".xz", ".zst", ".zip")


def _looks_local(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    parent = Path(source).parent
    return (source.startswith((".", "/", "~")) or suffix.startswith((".txt", ".jsonl")) or suffix in _FILE_LIKE
            or (parent != Path(".") and parent.is_dir()))


def _open_remote(source: str, split: str) -> Iterator[dict]:
    if _looks_local(source):
        raise ConfigError(f"dataset {source} does not exist; give a .txt/.jsonl file, a folder, or a dataset name")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{source!r} is not a local file or folder; reading Hub datasets needs "
                          "`pip install datasets`") from None
    try:
        ds = datasets.load_dataset(str(source), split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot open it"
        raise ConfigError(f"cannot open dataset {source!r} (split {split!r}): {exc}. It is not a local file or "
                          "folder; is it a dataset name, and is the Hub reachable (HF_HUB_OFFLINE unset)?") from None
    return iter(ds)


def _remote(source: str, split: str, text_field: str, bad_records: str, skipped: SkippedRecords) -> Iterator[str]:
    for i, record in enumerate(_open_remote(source, split), 1):
        text = _record_text(record, text_field, "column", f"dataset {source!r} ({split}) record {i}", bad_records,
                            skipped)
        if text is not None:
            yield text


def iter_texts(source: str | Path, *, split: str = "train", text_field: str = "text", bad_records: str = "raise",
               skipped: SkippedRecords | None = None) -> Generator[str, None, None]:
    """Documents from `source`, in order, lazily; bad records raise (naming file and line) or are skipped
    and counted in `skipped` (see the module docstring)."""
    _check_mode(bad_records)
    if skipped is None:
        skipped = SkippedRecords(on_first=lambda msg: warnings.warn(msg, stacklevel=4))
    path = Path(source)
    if path.exists():
        yield from _local(path, text_field, bad_records, skipped)
        return
    yield from _remote(str(source), split, text_field, bad_records, skipped)


DATA_CARD = "corpus.json"  # beside a local dataset file or in its folder: {"source": ..., "license": ...}


def data_card(source: str | Path) -> dict[str, str]:
    """Where a local dataset's text comes from and under which licence, when it says so (`DATA_CARD`, as
    `clt_hub.training.corpus` writes): what a transcoder's model card should name. {} when it says nothing."""
    path = Path(source)
    card = (path if path.is_dir() else path.parent) / DATA_CARD
    try:
        info = load_json(card, what="data card")
    except ConfigError:  # missing or unreadable: the card says nothing
        return {}
    if not isinstance(info, dict):
        return {}
    return {k: str(info[k])[:200] for k in ("source", "license") if isinstance(info.get(k), str)}


@dataclass
class SourceCheck:
    """What `check_source` found: good records and the bad ones skipped (a local source is read whole; a
    streamed one only up to its first good record, so `records` is then 1 and `scanned` False)."""

    records: int
    skipped: SkippedRecords
    scanned: bool


def check_source(source: str | Path, *, split: str = "train", text_field: str = "text", bad_records: str = "raise",
                 what: str = "dataset", progress: bool = False) -> SourceCheck:
    """Check a text source before any heavy work: that it exists and gives text, and (local sources, read
    whole) that it has no bad record in "raise" mode. Raises ConfigError naming `what`, file and line."""
    from tqdm.auto import tqdm

    _check_mode(bad_records)
    skipped = SkippedRecords()
    path = Path(source)
    scanned = path.exists()
    records = 0
    texts = iter_texts(source, split=split, text_field=text_field, bad_records=bad_records, skipped=skipped)
    big = scanned and progress and sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*.*"))
                                       if f.suffix in SUFFIXES and f.is_file()) > PROGRESS_BYTES
    with tqdm(desc=f"checking {what}", unit="rec", disable=not big, mininterval=1) as bar:
        try:
            for _ in texts:
                records += 1
                if records % 4096 == 0:
                    bar.update(4096)
                if not scanned:
                    break  # a streamed dataset: it opens and gives text; the rest is checked as it streams
        except BadRecordError as exc:
            if what == "dataset":
                raise
            raise BadRecordError(exc.where, f"{exc.reason} (in {what} {source})") from None
        except ConfigError as exc:
            if what == "dataset":
                raise
            message = str(exc)
            raise ConfigError(f"{what} {message.removeprefix('dataset ')}" if message.startswith("dataset ")
                              else f"{what}: {message}") from None
        finally:
            texts.close()
    if records == 0:
        why = f"all {skipped.count} record(s) are bad ({'; '.join(skipped.first)})" if skipped.count else \
            ("it has no non-empty lines" if scanned else "it has no records")
        raise ConfigError(f"{what} {source} gave no text: {why}")
    return SourceCheck(records=records, skipped=skipped, scanned=scanned)
