"""An English training corpus that every machine already has: Python's own documentation.

Real-model transcoders need real English text, and this project must train offline. Every CPython
installation carries two bodies of English prose written by people: the language reference topics
behind `help()` (`pydoc_data.topics`) and the docstrings of the standard library. Both are under the
Python Software Foundation License (PSF-2.0), which allows this use. The text is technical English with
some code; a transcoder trained on it is a transcoder of that distribution, which the model card says.

`build` writes train.jsonl and heldout.jsonl (one document per line) plus corpus.json (source, licence,
Python version, counts). The split is by a stable hash of each document's name, so the same Python
version gives the same split on every machine; another Python version gives a slightly different corpus,
which corpus.json records.

    python -m clt_hub.training.corpus OUT_DIR
"""

from __future__ import annotations

import ast
import json
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from clt_hub.texts import DATA_CARD

SOURCE = "Python documentation: pydoc_data.topics and standard-library docstrings"
LICENSE = "PSF-2.0"
MIN_CHARS = 200          # shorter docstrings are mostly one-line summaries
HELDOUT_EVERY = 20       # 1 in 20 documents (by name hash) is held out
SKIP = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip")


def _topics() -> Iterator[tuple[str, str]]:
    import pydoc_data.topics as topics

    for name, text in sorted(topics.topics.items()):
        for i, para in enumerate(re.split(r"\n\s*\n", text)):
            para = " ".join(para.split())
            if len(para) >= MIN_CHARS:
                yield f"topic:{name}:{i}", para


def _docstrings() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are templates or in another encoding: not prose we need
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    yield f"doc:{rel.as_posix()}:{getattr(node, 'name', '')}:{getattr(node, 'lineno', 0)}", doc


def documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every document, in a fixed order."""
    yield from _topics()
    yield from _docstrings()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a file


def heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


def write_split(out_dir: str | Path, docs: Iterable[tuple[str, str]], info: dict) -> dict:
    """Write (name, text) documents as train.jsonl and heldout.jsonl (1 in HELDOUT_EVERY by name hash) and
    `info` plus the counts as corpus.json, the data card a transcoder's model card reads; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    chars = {"train": 0, "heldout": 0}
    for name, text in docs:
        part = "heldout" if heldout(name) else "train"
        parts[part].append(json.dumps({"text": text, "name": name}, ensure_ascii=False))
        chars[part] += len(text)
    for part, lines in parts.items():
        _write(out / f"{part}.jsonl", "".join(line + "\n" for line in lines))  # no blank line when empty
    info = {**info, "documents": {k: len(v) for k, v in parts.items()}, "characters": chars}
    _write(out / DATA_CARD, json.dumps(info, indent=1))
    return info


def build(out_dir: str | Path) -> dict:
    """Write train.jsonl, heldout.jsonl and corpus.json under out_dir; returns corpus.json's content."""
    return write_split(out_dir, documents(),
                       {"source": SOURCE, "license": LICENSE, "python": sys.version.split()[0]})


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    print(json.dumps(build(sys.argv[1]), indent=1))
