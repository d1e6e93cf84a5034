"""The offline English corpus (Python's own documentation): real text, a stable split, its licence."""

from __future__ import annotations

import json
from pathlib import Path

from clt_hub.texts import check_source, data_card, iter_texts
from clt_hub.training.corpus import LICENSE, build


def test_corpus_builds_offline_with_a_stable_held_out_split(tmp_path: Path) -> None:
    info = build(tmp_path / "a")
    build(tmp_path / "b")
    for name in ("train.jsonl", "heldout.jsonl", "corpus.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()  # deterministic
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert not {r["name"] for r in train} & {r["name"] for r in held}  # no document on both sides
    assert info["documents"] == {"train": len(train), "heldout": len(held)} and len(held) > 50
    assert info["characters"]["train"] > 500_000  # hundreds of thousands of tokens, not a toy
    # English prose: mostly letters and spaces, common English words present
    text = " ".join(r["text"] for r in train[:200])
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.85
    assert all(f" {w} " in text for w in ("the", "and", "is", "of", "which"))
    # every record reads as text with the strict bad-record check, and the card names source and licence
    assert check_source(tmp_path / "a" / "train.jsonl").records == len(train)
    assert next(iter_texts(tmp_path / "a" / "heldout.jsonl")) == held[0]["text"]
    assert data_card(tmp_path / "a" / "train.jsonl") == {"source": info["source"], "license": LICENSE}


def test_a_dataset_without_a_card_says_nothing(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("some text\n")
    assert data_card(tmp_path / "t.txt") == {}
    (tmp_path / "corpus.json").write_text("not json")
    assert data_card(tmp_path / "t.txt") == {}


ORGANISM = Path(__file__).parent.parent / "paper_cases" / "artifacts" / "model"


def test_sampled_corpus_is_the_models_own_text_and_resumes_to_the_same_samples(tmp_path: Path, one_thread: None
                                                                               ) -> None:
    from clt_hub.models.loading import load_model
    from clt_hub.training.sampled import SAMPLES
    from clt_hub.training.sampled import build as build_sampled

    a = build_sampled(tmp_path / "a", str(ORGANISM), n_tokens=300, rows=8, progress=False)
    assert a["tokens"] >= 300 and a["documents"]["train"] + a["documents"]["heldout"] >= 8
    assert "sampled from" in a["source"] and a["license"].startswith("outputs of")
    assert data_card(tmp_path / "a" / "train.jsonl") == {"source": a["source"], "license": a["license"]}
    records = [json.loads(line) for line in (tmp_path / "a" / SAMPLES).read_text().splitlines()]
    _, tok = load_model(str(ORGANISM))
    vocab = set(tok.get_vocab())
    for r in records:  # the organism's word tokenizer: every word of a sample is a word of its vocabulary
        assert set(r["text"].split()) <= vocab and 0 < r["tokens"] <= 127
    assert check_source(tmp_path / "a" / "train.jsonl").records == a["documents"]["train"]

    # interrupted after one batch and a half-written line: the rerun drops the half line and regenerates
    # the missing batches with their own seeds, so it ends with exactly the uninterrupted run's samples
    lines = (tmp_path / "a" / SAMPLES).read_text().splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / SAMPLES).write_text("".join(lines[:8]) + lines[8][:20])
    b = build_sampled(tmp_path / "b", str(ORGANISM), n_tokens=300, rows=8, progress=False)
    again = [json.loads(line) for line in (tmp_path / "b" / SAMPLES).read_text().splitlines()]
    strip = ("cpu_s", "wall_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in again] == \
        [{k: v for k, v in r.items() if k not in strip} for r in records]
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert b["documents"] == a["documents"]
