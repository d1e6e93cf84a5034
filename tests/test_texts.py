"""Text sources: local .txt/.jsonl files and folders, with clear errors for what cannot be read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clt_hub.errors import ConfigError
from clt_hub.texts import iter_texts


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


# ----------------------------------------------------------------------------- bad records (issue 24)
BAD = {  # file content -> the line and the reason named
    "surrogate.jsonl": (b'{"text": "ok"}\n{"text": "a \\udc8b b"}\n', r":2 holds text that is not valid Unicode \(lone "
                                                                     r"surrogate \\udc8b at character 3\)"),
    "latin1.txt": ("ok\ncaf\xe9\n".encode("latin-1"), r":2 is not UTF-8 text \(byte 0xe9 at column 4; a binary or "
                                                      r"Latin-1 file\?\)"),
    "binary.txt": (b"ok\n\x89PNG\x00\x1a\n", r":2 is not UTF-8 text \(byte 0x89 at column 1"),
    "nul.txt": (b"ok\nab\x00cd\n", r":2 contains NUL bytes \(a binary file\?\)"),
    "json.jsonl": (b'{"text": "ok"}\n{"text": \n', r":2 is not valid JSON"),
    "deep.jsonl": (b'{"text": "ok"}\n' + b"[" * 100_000 + b"\n", r":2 is not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_records_raise_with_file_and_line_or_are_skipped_with_a_count(tmp_path: Path, name: str) -> None:
    from clt_hub.texts import BadRecordError, SkippedRecords

    content, reason = BAD[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadRecordError, match=re.escape(str(tmp_path / name)) + reason):
        list(iter_texts(tmp_path / name))
    skipped = SkippedRecords()
    assert list(iter_texts(tmp_path / name, bad_records="skip", skipped=skipped)) == ["ok"]
    assert skipped.count == 1 and re.match(re.escape(str(tmp_path / name)) + reason.replace(" ", ": ", 1), skipped.first[0])


def test_skip_without_a_counter_warns_once(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "\\udc8b"}\n{"text": "ok"}\n{"text": "\\ud800"}\n')
    with pytest.warns(UserWarning, match=r"a.jsonl:1 .*more are counted") as caught:
        assert list(iter_texts(tmp_path / "a.jsonl", bad_records="skip")) == ["ok"]
    assert len(caught) == 1
    with pytest.raises(ConfigError, match="bad_records is 'ignore'; use 'raise' or 'skip'"):
        list(iter_texts(tmp_path / "a.jsonl", bad_records="ignore"))


def test_a_line_longer_than_the_limit_is_a_bad_record_read_in_pieces(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from clt_hub import texts
    from clt_hub.texts import SkippedRecords

    monkeypatch.setattr(texts, "MAX_RECORD_CHARS", 100)
    (tmp_path / "a.txt").write_text("short\n" + "x" * 1000 + "\n" + "y" * 100 + "\nlast")
    with pytest.raises(ConfigError, match=r"a.txt:2 is longer than 100 characters"):
        list(iter_texts(tmp_path / "a.txt"))
    skipped = SkippedRecords()
    assert list(iter_texts(tmp_path / "a.txt", bad_records="skip", skipped=skipped)) == ["short", "y" * 100, "last"]
    assert skipped.count == 1


def test_line_breaks_and_a_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert list(iter_texts(tmp_path / "a.txt")) == ["one", "two", "three"]
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n')
    assert list(iter_texts(tmp_path / "b.jsonl")) == ["one"]


def test_streamed_records_are_checked_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from clt_hub import texts
    from clt_hub.texts import BadRecordError, SkippedRecords

    records = [{"text": "ok"}, {"text": "a\ud83db"}, {"text": None}, {"text": "fine"}]
    monkeypatch.setattr(texts, "_open_remote", lambda source, split: iter(records))
    with pytest.raises(BadRecordError, match=r"dataset 'me/corpus' \(train\) record 2 holds text that is not valid"):
        list(iter_texts("me/corpus"))
    skipped = SkippedRecords()
    assert list(iter_texts("me/corpus", bad_records="skip", skipped=skipped)) == ["ok", "fine"]
    assert skipped.count == 2 and "record 3: has no string column 'text'" in skipped.first[1]


def test_check_source_reads_a_local_source_whole(tmp_path: Path) -> None:
    from clt_hub.texts import check_source

    (tmp_path / "a.txt").write_bytes(b"one\ntwo\n" * 1000 + b"caf\xe9\n")
    with pytest.raises(ConfigError, match=r"a.txt:2001 is not UTF-8 text.*\(in eval_dataset "):
        check_source(tmp_path / "a.txt", what="eval_dataset")
    found = check_source(tmp_path / "a.txt", bad_records="skip")
    assert found.records == 2000 and found.skipped.count == 1 and found.scanned
    (tmp_path / "bad.txt").write_bytes(b"\xff\n\xfe\n")
    with pytest.raises(ConfigError, match=r"dataset .*bad.txt gave no text: all 2 record\(s\) are bad \(.*bad.txt:1: is not UTF-8"):
        check_source(tmp_path / "bad.txt", bad_records="skip")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match=r"gave no text: it has no non-empty lines"):
        check_source(tmp_path / "blank.txt")


def test_names_that_look_like_files_never_go_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def hub(*a: object, **k: object) -> None:
        raise AssertionError("asked the Hub")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("heldout.txtt", "train.json", "corpus.jsonl.gz", "data/missing", "./x"):
        with pytest.raises(ConfigError, match=f"dataset {re.escape(name)} does not exist"):
            list(iter_texts(name))
