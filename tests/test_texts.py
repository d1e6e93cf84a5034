"""Text sources: local .txt/.jsonl files and folders, with clear errors for what cannot be read."""

from __future__ import annotations

from pathlib import Path

import pytest

from clt_hub.errors import ConfigError
from clt_hub.training.texts import iter_texts


def test_local_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n{"text": "fourth", "id": 2}\n')
    assert list(iter_texts(tmp_path / "a.txt")) == ["first doc", "second doc"]
    assert list(iter_texts(tmp_path / "b.jsonl")) == ["third", "fourth"]
    assert list(iter_texts(tmp_path)) == ["first doc", "second doc", "third", "fourth"]


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_texts(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2 is not valid JSON"):
        list(iter_texts(tmp_path / "bad.jsonl"))
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match="no string field 'text'; pass --text-field"):
        list(iter_texts(tmp_path / "field.jsonl"))
    assert list(iter_texts(tmp_path / "field.jsonl", text_field="body")) == ["x"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt or .jsonl files"):
        list(iter_texts(tmp_path / "empty"))
