"""Issue 24, training: no bad record, changed config on resume, unusable run folder or eval_dataset typo costs a
traceback or finished work; resumed logs hold each step once; written files follow the umask.

Every run here is tiny (a 3-layer, d_model 32 model, a few steps of 256 tokens) and in-process."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import word_lines
from test_trace_cli import word_tokenizer
from tiny_models import tiny_model

from clt_hub import Transcoder
from clt_hub import texts as texts_mod
from clt_hub.config import Architecture
from clt_hub.errors import ConfigError, TrainingError
from clt_hub.texts import BadRecordError
from clt_hub.training import checkpoints
from clt_hub.training import run as run_mod
from clt_hub.training.config import TrainConfig
from clt_hub.training.run import train


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, list[str]]:
    """A saved tiny model, the same model and tokenizer in memory, and a corpus of ~5000 tokens."""
    root = tmp_path_factory.mktemp("hardening")
    model = tiny_model("gpt2", n_layers=3, d_model=32)
    tok = word_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    lines = word_lines()
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "heldout.txt").write_text("\n".join(lines[:20]) + "\n")
    return root, model, tok, lines


def _cfg(root: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"model": str(root / "model"), "dataset": str(root / "train.txt"), "out_dir": str(out),
                            "transcoder": Architecture(d_sae=16), "n_tokens": 256 * 6, "batch_size": 256,
                            "lr": 1e-3, "context_size": 32, "warmup_steps": 2, "log_every": 1,
                            "checkpoint_every": 3, "buffer_tokens": 1024}
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks that must come before any heavy work: loading the model fails the test."""
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(run_mod, "load_model", refuse)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return Transcoder.from_pretrained(folder).tensors()


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. bad records
BAD_FILES = {  # name, bytes, the line named in the error
    "surrogate.jsonl": (b'{"text": "w1 w2 w3"}\n{"text": "\\udc8b w4"}\n{"text": "w5 w6"}\n', 2),
    "latin1.txt": ("w1 w2\nw3 caf\xe9 w4\n".encode("latin-1"), 2),
    "binary.txt": (b"w1 w2 w3\n" + bytes(range(256)) * 4, 2),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_record_fails_before_training_with_file_and_line(lm: tuple, tmp_path: Path, name: str,
                                                              no_model_load: None) -> None:
    root, *_ = lm
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(root / "train.txt", data / "a_train.txt")
    content, line = BAD_FILES[name]
    (data / name).write_bytes(content)
    with pytest.raises(BadRecordError, match=rf"{name}:{line} .*Nothing was trained.*bad_records=skip") as err:
        train(_cfg(root, tmp_path / "run", dataset=str(data)), progress=False)
    assert "Traceback" not in str(err.value)
    assert not (tmp_path / "run").exists()  # before step 1, before the model: nothing written, nothing lost


def test_bad_records_skip_mode_finishes_and_reports_the_count(lm: tuple, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root, model, tok, _ = lm
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(root / "train.txt", data / "a_train.txt")
    for name, (content, _) in BAD_FILES.items():
        (data / name).write_bytes(content)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"text": "w1 w2 w3 w4"}\n{"text": "\\ud800"}\n' * 30)
    cfg = _cfg(root, tmp_path / "run", dataset=str(data), bad_records="skip", eval_dataset=str(heldout),
               eval_tokens=40)
    final = train(cfg, model=model, tokenizer=tok, progress=False)
    metrics = Transcoder.from_pretrained(final).cfg.metrics
    # surrogate.jsonl:2, latin1.txt:2, and binary.txt's lines after the first that are not blank
    binary = [line for line in BAD_FILES["binary.txt"][0].replace(b"\r", b"\n").split(b"\n")[1:] if line.strip()]
    assert metrics["skipped_records"] == 2 + len(binary)
    assert metrics["eval_skipped_records"] == 30 and metrics["ce_recovered"] == metrics["ce_recovered"]
    err = capsys.readouterr().err  # said once, up front, with the first locations
    assert err.count(f"dataset {data}: {2 + len(binary)} bad record(s) skipped") == 1
    assert f"{data / 'binary.txt'}:2: contains NUL bytes" in err
    assert err.count(f"eval_dataset {heldout}: 30 bad record(s) skipped (first: {heldout}:2: holds text that is "
                     "not valid Unicode") == 1


def test_a_bad_record_in_a_streamed_dataset_keeps_the_work_done(lm: tuple, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed dataset cannot be scanned ahead: in "raise" mode the run stops on the record with a
    checkpoint of the steps done, and resuming in "skip" mode ends exactly where a "skip" run from the
    start does."""
    root, model, tok, lines = lm
    records = [{"text": t} for t in lines]
    records.insert(250, {"text": "w1 \udc8b w2"})  # late in the first pass: some steps are done by then

    def stream(source: str, split: str) -> Iterator[dict]:
        assert source == "someone/corpus"
        return iter(records)

    monkeypatch.setattr(texts_mod, "_open_remote", stream)
    kw: dict[str, Any] = {"dataset": "someone/corpus", "n_tokens": 256 * 24}
    with pytest.raises(TrainingError, match=r"record 251 holds text that is not valid Unicode.*checkpoint .*"
                                            r"step_000000(\d\d) holds step \d+.*bad_records=skip.*--resume") as err:
        train(_cfg(root, tmp_path / "run", **kw), model=model, tokenizer=tok, progress=False)
    assert "nothing was trained" not in str(err.value)
    stopped = checkpoints.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert stopped is not None and stopped.name not in ("step_00000003", "step_00000006")  # saved on the stop
    resumed = train(_cfg(root, tmp_path / "run", bad_records="skip", **kw), resume=True, model=model,
                    tokenizer=tok, progress=False)
    whole = train(_cfg(root, tmp_path / "whole", bad_records="skip", **kw), model=model, tokenizer=tok,
                  progress=False)
    a, b = _tensors(whole), _tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Transcoder.from_pretrained(resumed).cfg.metrics["skipped_records"] >= 1
    assert _steps(tmp_path / "run") == _steps(tmp_path / "whole") == list(range(1, 25))


def test_texts_handed_in_directly_are_a_clear_error_not_a_tokenizer_type_error(lm: tuple) -> None:
    """evaluate() and the activation store also take plain iterables, which iter_texts never checked."""
    from clt_hub.training.activation_store import token_chunks

    _, _, tok, _ = lm
    with pytest.raises(ConfigError, match=r"text 2 is not valid Unicode \(it holds a lone surrogate\)"):
        list(token_chunks(["w1 w2", "w3 \udc8b"], tok, 8))
    with pytest.raises(ConfigError, match=r"text 1 is a bytes, not a string"):
        list(token_chunks([b"w1"], tok, 8))  # type: ignore[list-item]


# ----------------------------------------------------------------------------- 2 and 5. resume
@pytest.fixture(scope="module")
def finished(lm: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6."""
    root, model, tok, _ = lm
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(root, out), model=model, tokenizer=tok, progress=False)
    return out


def _interrupted(finished: Path, dst: Path) -> Path:
    """The finished run as if killed after step 4: last checkpoint step 3, the log runs on to a cut line."""
    shutil.copytree(finished, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000006")
    shutil.rmtree(dst / "transcoder")
    log = [line for line in (dst / "train_log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
    (dst / "train_log.jsonl").write_text("\n".join(log) + '\n{"step": 5, "lo')
    return dst


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"seed": 1}, {"n_tokens": 256 * 8}, {"dataset": "heldout.txt"},
                                    {"transcoder": Architecture(d_sae=16, jumprelu_bandwidth=0.5)}])
def test_resume_refuses_a_changed_config_and_keeps_the_checkpoint(lm: tuple, finished: Path, tmp_path: Path,
                                                                  change: dict, no_model_load: None) -> None:
    root, *_ = lm
    run = _interrupted(finished, tmp_path / "run")
    if "dataset" in change:
        change = {"dataset": str(root / change["dataset"])}
    before = _snapshot(run)
    with pytest.raises(ConfigError) as err:
        train(_cfg(root, run, **change), resume=True, progress=False)
    message = str(err.value)
    key = next(iter(change)) if "transcoder" not in change else "transcoder.jumprelu_bandwidth"
    assert f"changed: {key} " in message and " -> " in message and "allow_config_change=True" in message
    assert "--allow-config-change" in message
    if "transcoder" in change:
        assert "transcoder.jumprelu_bandwidth 1.0 -> 0.5" in message
    assert _snapshot(run) == before  # nothing touched, not even the log


@pytest.mark.parametrize(("arch", "change"), [(Architecture(d_sae=16, kind="plt"), "transcoder.kind 'clt' -> 'plt'"),
                                              (Architecture(d_sae=16, activation="relu"),
                                               "transcoder.activation 'jumprelu' -> 'relu'"),
                                              (Architecture(d_sae=32), "transcoder.d_sae 16 -> 32")])
def test_resume_with_other_tensors_is_refused_even_with_the_override(lm: tuple, finished: Path, tmp_path: Path,
                                                                     arch: Architecture, change: str,
                                                                     no_model_load: None) -> None:
    """clt -> plt used to die in a raw RuntimeError while copying tensors of the wrong shape."""
    root, *_ = lm
    run = _interrupted(finished, tmp_path / "run")
    before = _snapshot(run)
    for allow in (False, True):
        with pytest.raises(ConfigError, match=rf"{change}: the trained weights have other shapes"):
            train(_cfg(root, run, transcoder=arch), resume=True, progress=False, allow_config_change=allow)
    assert _snapshot(run) == before


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path: Path) -> None:
    """The last line of defence, for what the config does not show (another model's width): no raw error."""
    from clt_hub.training.trainer import Trainer

    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16), n_tokens=64, batch_size=32,
                      out_dir=str(tmp_path))
    saved = Trainer(cfg, n_layers=2, d_model=8).save_checkpoint()
    assert saved is not None
    for other in (Trainer(cfg, n_layers=2, d_model=12),
                  Trainer(dataclasses.replace(cfg, transcoder=Architecture(d_sae=16, kind="plt")), 2, 8),
                  Trainer(dataclasses.replace(cfg, transcoder=Architecture(d_sae=16, activation="relu")), 2, 8)):
        with pytest.raises(ConfigError, match=rf"checkpoint {saved} (has|holds) .*resume with the config it was "
                                              "written with"):
            other.load_checkpoint(saved)


def test_resume_with_the_original_config_ends_bit_identical(lm: tuple, finished: Path, tmp_path: Path) -> None:
    """After the refusals the checkpoint still resumes; fields that do not change the weights may change (the
    run folder moved, so out_dir differs from the saved one; keep_checkpoints, eval settings)."""
    root, model, tok, _ = lm
    run = _interrupted(finished, tmp_path / "run")
    with pytest.raises(ConfigError):
        train(_cfg(root, run, lr=2e-3), resume=True, model=model, tokenizer=tok, progress=False)
    final = train(_cfg(root, run, keep_checkpoints=3, eval_dataset=str(root / "heldout.txt"), eval_tokens=40),
                  resume=True, model=model, tokenizer=tok, progress=False)
    a, b = _tensors(finished / "transcoder"), _tensors(final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_the_override_continues_and_records_the_change(lm: tuple, finished: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, model, tok, _ = lm
    run = _interrupted(finished, tmp_path / "run")
    train(_cfg(root, run, lr=2e-3), resume=True, allow_config_change=True, model=model, tokenizer=tok,
          progress=False)
    assert "changed training config: lr 0.001 -> 0.002" in capsys.readouterr().err
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["config"]["lr"] == 2e-3
    assert state["config_changes"] == [{"step": 3, "changes": {"lr": [1e-3, 2e-3]}}]


def test_resumed_log_holds_each_step_once(lm: tuple, finished: Path, tmp_path: Path) -> None:
    root, model, tok, _ = lm
    run = _interrupted(finished, tmp_path / "run")  # logged steps 1..4 and half of 5; checkpoint at 3
    train(_cfg(root, run), resume=True, model=model, tokenizer=tok, progress=False)
    assert _steps(run) == _steps(finished) == [1, 2, 3, 4, 5, 6]
    # the replayed steps are logged with the same figures as the first time
    first = [json.loads(x) for x in (finished / "train_log.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    for x, y in zip(first, again, strict=True):
        assert x["loss"] == y["loss"] and x["fvu"] == y["fvu"]
    assert not list(run.glob(".train_log*"))  # no scratch file left


def test_config_changes_reads_flat_and_older_checkpoint_configs() -> None:
    from clt_hub.training.config import config_changes

    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16))
    saved = cfg.to_dict()
    assert config_changes(saved, cfg) == {}
    older = {k: v for k, v in saved.items() if k != "bad_records"}  # written before the field existed
    assert config_changes(older, cfg) == {}
    flat = {**{k: v for k, v in saved.items() if k != "transcoder"}, **saved["transcoder"], "d_sae": 32}
    assert config_changes(flat, cfg) == {"transcoder.d_sae": (32, 16)}
    moved = {**saved, "out_dir": "elsewhere", "device": "cuda", "parallel": "features", "log_every": 1,
             "bad_records": "skip", "eval_dataset": "x.txt", "push_to_hub": "me/clt"}
    assert config_changes(moved, cfg) == {}


# ----------------------------------------------------------------------------- 3. the run folder
def test_an_unusable_out_dir_is_one_error_before_the_model_loads(lm: tuple, tmp_path: Path, no_model_load: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, *_ = lm
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"out_dir .*afile is a file; give a folder"):
        train(_cfg(root, tmp_path / "afile"), progress=False)
    with pytest.raises(ConfigError, match=r"cannot be created: .*afile is a file"):
        train(_cfg(root, tmp_path / "afile" / "run"), progress=False)
    (tmp_path / "clash").mkdir()
    (tmp_path / "clash" / "checkpoints").write_text("x")
    with pytest.raises(ConfigError, match=r"checkpoints is a file, where the run writes its checkpoints"):
        train(_cfg(root, tmp_path / "clash"), progress=False)
    (tmp_path / "foreign" / "transcoder").mkdir(parents=True)
    (tmp_path / "foreign" / "transcoder" / "notes.md").write_text("mine")
    with pytest.raises(ConfigError, match=r"transcoder holds files that are not a transcoder artifact"):
        train(_cfg(root, tmp_path / "foreign"), progress=False)

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: make the write itself fail, as it would
            import tempfile

            def denied(*a: object, **k: object) -> None:
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", denied)
        for out in (locked, locked / "run"):
            with pytest.raises(ConfigError, match=rf"out_dir {out} is not writable: .*Permission denied"):
                train(_cfg(root, out), progress=False)
    finally:
        locked.chmod(0o755)


def test_an_unusable_out_dir_is_one_line_on_the_cli(lm: tuple, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clt_hub.cli import app

    root, *_ = lm
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(app, ["train", "--model", str(root / "nonexistent-model"), "--dataset",
                                      str(root / "train.txt"), "--out-dir", str(tmp_path / "afile"), "--d-sae", "16"])
    assert result.exit_code == 1 and "is a file; give a folder" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- 4. eval_dataset
def test_eval_dataset_mistakes_are_reported_before_training(lm: tuple, tmp_path: Path, no_model_load: None) -> None:
    root, *_ = lm
    (tmp_path / "no_texts").mkdir()
    (tmp_path / "no_texts" / "notes.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\n{"body": "w2"}\n')
    cases = {str(root / "heldout.txtt"): r"eval_dataset .*heldout.txtt does not exist",
             "heldout.txtt": r"eval_dataset heldout.txtt does not exist",       # a typo never goes to the Hub
             str(tmp_path / "missing"): r"eval_dataset .*missing does not exist",
             str(tmp_path / "no_texts"): r"eval_dataset folder .*no_texts has no .txt or .jsonl files",
             str(tmp_path / "bad.jsonl"): r"bad.jsonl:2 has no string field 'text'.*in eval_dataset"}
    for source, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            train(_cfg(root, tmp_path / "run", eval_dataset=source), progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 5. memory (issue 37)
def test_python_train_refuses_a_transcoder_too_big_for_memory_before_allocating(
        lm: tuple, tmp_path: Path, no_model_load: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train()` and `Trainer` refuse, as `clt-hub train` does, a d_sae whose training cannot fit: with the
    estimate, before the model loads (its config gives the shape) and before the transcoder is allocated."""
    import clt_hub.training.config as config_mod
    from clt_hub.training.trainer import Trainer

    def allocated(*a: object, **k: object) -> None:
        raise AssertionError("the transcoder was allocated before the memory was checked")

    monkeypatch.setattr(config_mod, "available_memory", lambda: 2**30)  # 1 GiB, on any machine
    monkeypatch.setattr(Transcoder, "from_config", allocated)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    root, model, tok, _ = lm
    expected = (r"transcoder.d_sae 1,000,000 needs at least 4.4 GiB to train \(clt, 3 layers of width 32: .*\), "
                r"but this machine has 1.0 GiB available; lower transcoder.d_sae \(about 2\d\d,\d\d\d fits\)")
    big = Architecture(d_sae=1_000_000)
    with pytest.raises(ConfigError, match=expected):  # the shape from the saved model's config.json
        train(_cfg(root, tmp_path / "run", transcoder=big), progress=False)
    with pytest.raises(ConfigError, match=expected):  # the shape from the model handed in
        train(_cfg(root, tmp_path / "run", transcoder=big, model=str(tmp_path / "elsewhere")), progress=False,
              model=model, tokenizer=tok)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=expected):
        Trainer(_cfg(root, tmp_path / "run", transcoder=big), n_layers=3, d_model=32)
    with pytest.raises(ConfigError, match=r"d_sae 1,000,000 needs at least 9.0 GiB to train \(plt, 3 layers of width 100"):
        Trainer(_cfg(root, tmp_path / "run", transcoder=Architecture(d_sae=1_000_000, kind="plt")), 3, 100)
    with pytest.raises(AssertionError, match="allocated"):  # one that fits goes on to allocate
        Trainer(_cfg(root, tmp_path / "run"), n_layers=3, d_model=32)


# ----------------------------------------------------------------------------- 6. file modes
def test_written_run_follows_the_umask(lm: tuple, tmp_path: Path) -> None:
    root, model, tok, _ = lm
    old = os.umask(0o027)
    try:
        final = train(_cfg(root, tmp_path / "run"), model=model, tokenizer=tok, progress=False)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    folders = [final, *sorted((tmp_path / "run" / "checkpoints").glob("step_*"))]
    assert len(folders) == 3
    for folder in folders:
        assert mode(folder) == 0o750, folder
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files
        for f in files:
            assert mode(f) == 0o640, f
    for p in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "train_log.jsonl"):
        assert mode(p) == (0o750 if p.is_dir() else 0o640), p


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(lm: tuple, finished: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A newest checkpoint whose tensors were cut short (a full disk) is passed over, by name, for the intact one
    before it: the run resumes from there and still ends bit-identical; the damaged folder is kept, renamed."""
    root, model, tok, _ = lm
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "transcoder")
    newest = run / "checkpoints" / "step_00000006" / "state.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    final = train(_cfg(root, run), resume=True, model=model, tokenizer=tok, progress=False)
    said = " ".join(capsys.readouterr().err.split())
    assert "step_00000006 cannot be read" in said and "but the file has" in said and "an earlier one is used" in said
    assert (run / "checkpoints" / "damaged_step_00000006" / "state.safetensors").read_bytes() == data[: len(data) // 2]
    a, b = _tensors(finished / "transcoder"), _tensors(final)
    assert all(torch.equal(a[k], b[k]) for k in a)
