"""docs/architecture.md names every module: the tree in its "## Modules" section has one line per `.py` file
under clt_hub/, space/ and paper_cases/ (its file name, indented two spaces per folder), and names nothing
that does not exist. Pure text and file listing: no import of the project, no model."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "docs" / "architecture.md"
MAPPED = ("clt_hub", "space", "paper_cases")  # every .py file under these must have a line
# a tree entry: indented two spaces per level, a file (name.py) or folder (name/), then the description
ENTRY = re.compile(r"^(?P<indent>(?:  )*)(?P<name>[A-Za-z_][\w.]*?(?:\.py|/))(?: +\S.*)?$")


def modules_tree(text: str) -> list[str]:
    """The code block under "## Modules": its lines, the fences excluded."""
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1, f"docs/architecture.md's Modules section has {len(blocks)} code blocks, not one"
    return blocks[0].splitlines()


def mapped_paths(text: str) -> list[str]:
    """Repository-relative paths the tree names ("clt_hub/circuits/eap.py", "clt_hub/circuits/")."""
    paths: list[str] = []
    parents: list[str] = []  # the folder at each depth above the current line
    for n, line in enumerate(modules_tree(text), 1):
        m = ENTRY.match(line)
        assert m, f"line {n} of the Modules tree is not `<indent><name.py or name/> <what it holds>`: {line!r}"
        depth = len(m["indent"]) // 2
        assert depth <= len(parents), f"line {n} is indented deeper than the folder above it: {line!r}"
        del parents[depth:]
        path = "".join(parents) + m["name"]
        paths.append(path)
        if m["name"].endswith("/"):
            parents.append(m["name"])
    return paths


def test_parser_reads_a_tree() -> None:
    text = "x\n## Modules\n\n```\npkg/   a package\n  a.py   one\n  sub/\n    b.py  two\n  c.py  three\nd/  d\n```\n## Next\n"
    assert mapped_paths(text) == ["pkg/", "pkg/a.py", "pkg/sub/", "pkg/sub/b.py", "pkg/c.py", "d/"]


def test_architecture_map_names_every_module_and_nothing_else() -> None:
    paths = mapped_paths(MAP.read_text(encoding="utf-8"))
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    assert not repeated, f"docs/architecture.md names these more than once: {repeated}"
    modules = sorted(p.relative_to(ROOT).as_posix() for top in MAPPED for p in (ROOT / top).rglob("*.py"))
    missing = [m for m in modules if m not in paths]
    assert not missing, ("modules with no line in docs/architecture.md's Modules tree (add one each: what it "
                         f"holds and why it sits there): {missing}")
    gone = [p for p in paths if not ((ROOT / p).is_dir() if p.endswith("/") else (ROOT / p).is_file())]
    assert not gone, f"docs/architecture.md names files or folders that do not exist: {gone}"
