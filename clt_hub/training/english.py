"""A general-English corpus from Debian's text packages, mixed with Python's documentation.

A transcoder learns the features of the text it is trained on. Python's documentation alone never names a
US state, a year range or a couplet, so the features the case prompts need had nothing to form on
(docs/research/real_model_clt.md). Debian ships English written by people, under licences that allow this
use, as packages that install offline from the distribution's mirror:

- `wordnet-base` (WordNet 3.0 licence, Princeton): a gloss for every sense of 117k English words, places
  and people included ("Dallas: a large commercial and industrial city in northeastern Texas").
- `fortunes` (fortune-mod's collections): quotations, literature, songs and poems (rhymed verse), jokes.
- `miscfiles` (public domain): the US Constitution and Declaration of Independence.

GCIDE (Webster's 1913, `dict-gcide`) was left out: its senses are a century old and carried in markup.

`build` writes one document list, the sources taken in turn (round robin, each source in its own stable
order), so the first N tokens of train.jsonl, which is what a run of N tokens reads, hold the sources in
equal shares until the smallest runs out. The held-out split is `clt_hub.training.corpus`'s (1 in 20 by
name hash). corpus.json records each package's version and each source's share.

    apt-get install wordnet-base fortunes miscfiles   # as root; the nox session train_real does this
    python -m clt_hub.training.english OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

from clt_hub.errors import ConfigError
from clt_hub.training import corpus as python_docs

PACKAGES = ("wordnet-base", "fortunes", "miscfiles")
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
US_DOCUMENTS = Path("/usr/share/state")
DOC_CHARS = 600          # documents are grouped to about this size: a few hundred characters is ~128 tokens
SKIP_FORTUNES = ("ascii-art", "translate-me")  # pictures drawn in characters; text in other languages
SOURCE = ("general English: WordNet 3.0 glosses, fortune-mod collections, US founding documents (Debian "
          "packages wordnet-base, fortunes, miscfiles) and Python's documentation, in equal shares")
LICENSE = "WordNet-3.0, fortune-mod collections (see /usr/share/doc/fortunes/copyright), public domain, PSF-2.0"


def _grouped(items: Iterator[tuple[str, str]], prefix: str) -> Iterator[tuple[str, str]]:
    """Consecutive (name, text) items joined into documents of about DOC_CHARS characters, named by the first."""
    name, size = "", 0
    parts: list[str] = []
    for item_name, text in items:
        if not parts:
            name = item_name
        parts.append(text)
        size += len(text)
        if size >= DOC_CHARS:
            yield f"{prefix}:{name}", "\n\n".join(parts)
            parts, size = [], 0
    if parts:
        yield f"{prefix}:{name}", "\n\n".join(parts)


def _wordnet_entries(root: Path) -> Iterator[tuple[str, str]]:
    """One line per synset: 'word, other word: gloss'. Entries stay in the files' order, which groups a
    lexicographer file's senses (places with places), so a document reads as related entries."""
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # the licence header, indented
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            count = int(fields[3], 16)
            words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
            yield f"{pos}:{fields[0]}", f"{', '.join(dict.fromkeys(words))}: {gloss.strip()}"


def _fortunes(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(root.iterdir()):
        if path.suffix or path.name in SKIP_FORTUNES or not path.with_suffix(".dat").exists():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, item in enumerate(re.split(r"^%\s*$", text, flags=re.M)):
            item = item.strip("\n")
            if len(item.strip()) >= 20:
                yield f"{path.name}:{i}", item


def _us_documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(root.glob("*.gz")):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        for i, para in enumerate(re.split(r"\n\s*\n", text)):
            para = " ".join(para.split())
            if len(para) >= 80:
                yield f"{path.name[:-3]}:{i}", para


def _stable(docs: Iterator[tuple[str, str]]) -> list[tuple[str, str]]:
    """A source's documents in an order that mixes its files and topics but is the same on every machine."""
    return sorted(docs, key=lambda d: (zlib.crc32(d[0].encode()), d[0]))


def sources() -> dict[str, list[tuple[str, str]]]:
    """{source: its documents}, each already grouped and in its stable order; a missing package is a clear
    error naming the apt-get command."""
    missing = [p for p, path in zip(PACKAGES, (WORDNET / "data.noun", FORTUNES, US_DOCUMENTS), strict=True) if not path.exists()]
    if missing:
        raise ConfigError(f"the English corpus needs Debian packages that are not installed: {', '.join(missing)}; "
                          f"install them as root with: apt-get install -y {' '.join(missing)}")
    return {
        "wordnet": _stable(_grouped(_wordnet_entries(WORDNET), "wordnet")),
        "fortunes": _stable(_grouped(_fortunes(FORTUNES), "fortune")),
        "python_docs": _stable(python_docs.documents()),
        "us_documents": _stable(_grouped(_us_documents(US_DOCUMENTS), "us")),
    }


def _versions() -> dict[str, str]:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\n", *PACKAGES], capture_output=True,
                             text=True, check=False).stdout
    except OSError:
        return {}
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def documents(by_source: dict[str, list[tuple[str, str]]]) -> Iterator[tuple[str, str]]:
    """The sources in turn, one document each, until all are used up."""
    for row in zip_longest(*by_source.values()):
        yield from (d for d in row if d is not None)


def build(out_dir: str | Path) -> dict:
    """Write train.jsonl, heldout.jsonl and corpus.json under out_dir; returns corpus.json's content."""
    by_source = sources()
    shares = {name: {"documents": len(docs), "characters": sum(len(t) for _, t in docs)}
              for name, docs in by_source.items()}
    info = {"source": SOURCE, "license": LICENSE, "packages": _versions(), "python": sys.version.split()[0],
            "sources": shares, "order": "round robin over the sources, each in its stable hash order"}
    return python_docs.write_split(out_dir, documents(by_source), info)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    try:
        print(json.dumps(build(sys.argv[1]), indent=1))
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
