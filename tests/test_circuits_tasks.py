"""Circuit tasks and the `clt-hub circuit` command: task files (every mistake one error naming file:line and the
fix), built-in tasks on real tokenizers, the CLI end to end on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_trace_cli import word_tokenizer
from tiny_models import tiny_model
from typer.testing import CliRunner

from clt_hub.circuits import CircuitConfig, find_circuits, load_jsonl
from clt_hub.circuits.tasks import Example, Task, batches, check_example
from clt_hub.cli import app as cli_app
from clt_hub.errors import ConfigError

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


pytestmark = pytest.mark.usefixtures("one_thread")


def line(clean: str = "w1 w2 w3", corrupted: str = "w4 w5 w3", answer: object = "w1", wrong: object = ("w4",),
         **extra: object) -> str:
    return json.dumps({"clean": clean, "corrupted": corrupted, "answer": answer,
                       "wrong": list(wrong) if isinstance(wrong, tuple) else wrong, **extra})


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("bad", "message"), [
    ('{"clean": "w1 w2", ', r"task.jsonl:2: not valid JSON"),
    ('["w1"]', r"task.jsonl:2: each line must be a JSON object"),
    ('{"clean": "w1", "corrupted": "w2", "answer": "w3"}', r"task.jsonl:2: missing wrong"),
    (line(answer=[]), r"task.jsonl:2: 'answer' must be a non-empty string or a list"),
    (line(colour="red"), r"task.jsonl:2: unknown field\(s\) colour"),
    (line(split="dev"), r"task.jsonl:2: split must be 'train' or 'test'"),
    (line(answer="w4"), r"task.jsonl:2: \['w4'\] is both an answer and a wrong answer"),
    (line(clean=" "), r"task.jsonl:2: 'clean' must be a non-empty string"),
])
def test_task_file_mistakes_name_the_line(tmp_path: Path, bad: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_jsonl(write(tmp_path, line(), bad, line()))


def test_task_file_whole_file_mistakes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="no examples"):
        load_jsonl(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="both need at least one"):
        load_jsonl(write(tmp_path, line(split="train")))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"clean": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_jsonl(tmp_path / "latin1.jsonl")


def test_task_file_splits_and_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, *(line(clean=f"w{i} w2 w3", answer=f"w{i}") for i in range(10, 20)),
                 line(split="test"), line(split="train", answer=["w1", "w2"]))
    task = load_jsonl(path, test_fraction=0.5, seed=1)
    assert len(task.train) == 6 and len(task.test) == 6
    assert task.train[0].answers == ("w1", "w2") and task.test[0].clean == "w1 w2 w3"
    task.save_jsonl(tmp_path / "again.jsonl")
    again = load_jsonl(tmp_path / "again.jsonl")
    assert [e.clean for e in again.train] == [e.clean for e in task.train]
    assert [e.answers for e in again.test] == [e.answers for e in task.test]


def test_examples_are_checked_against_the_tokenizer() -> None:
    tok = word_tokenizer()
    with pytest.raises(ConfigError, match=r"f.jsonl:3: answer 'w1 w2' is 2 tokens .* single tokens"):
        check_example(tok, Example("w1 w2", "w3 w4", ("w1 w2",), ("w3",), "f.jsonl:3"))
    with pytest.raises(ConfigError, match="clean prompt is 3 tokens and the corrupted one 4"):
        check_example(tok, Example("w1 w2", "w3 w4 w5", ("w1",), ("w3",)))
    with pytest.raises(ConfigError, match="model's context is 4"):
        check_example(tok, Example("w1 w2 w3 w4 w5", "w1 w2 w3 w4 w6", ("w1",), ("w3",)), context=4)
    with pytest.raises(ConfigError, match="does not know"):
        check_example(tok, Example("w1 zebra", "w1 w2", ("w1",), ("w3",)))
    # batches are right-padded; `last` points at each prompt's own last token
    b = batches(tok, [Example("w1 w2", "w3 w4", ("w1",), ("w3",)),
                      Example("w1 w2 w5 w6", "w3 w4 w7 w8", ("w1", "w2"), ("w3",))], batch_size=2, pad_id=2)[0]
    assert b.clean.shape == (2, 5) and b.last.tolist() == [2, 4] and b.clean[0, 3:].tolist() == [2, 2]
    assert b.answer_mask.tolist() == [[True, False], [True, True]]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("circuit-model")
    tiny_model("llama", n_layers=2).save_pretrained(root)
    word_tokenizer().save_pretrained(root)
    return root


def word_task(n: int = 8) -> Task:
    ex = [Example(f"w{10 + i} w2 w{20 + i} w3", f"w{30 + i} w2 w{40 + i} w3", (f"w{10 + i}",), (f"w{30 + i}",))
          for i in range(n)]
    return Task("words", tuple(ex[: n // 2]), tuple(ex[n // 2:]))


def test_find_circuits_api_and_exports(tiny_folder: Path, tmp_path: Path) -> None:
    from clt_hub.models.loading import load_model

    model, tok = load_model(str(tiny_folder))
    for method in ("eap", "eap-ig", "edge-pruning"):
        cfg = CircuitConfig(method=method, sparsities=(0.5, 0.9), batch_size=4, ig_steps=2,
                            pruning=__import__("clt_hub.circuits", fromlist=["x"]).EdgePruningConfig(steps=3))
        result = find_circuits(model, tok, word_task(), cfg, model_name="tiny", progress=False)
        assert [r["edges_kept"] for r in result.rows] == [round(0.5 * result.graph.n_edges),
                                                         round(0.1 * result.graph.n_edges)]
        for r in result.rows:
            assert r["kl"] >= 0 and 0 <= r["accuracy"] <= 1 and r["seconds"] >= 0
        out = result.save(tmp_path / method)
        circuit = json.loads((out / "circuit_0.9.json").read_text())
        assert circuit["edges_kept"] == len(circuit["edges"]) == round(0.1 * result.graph.n_edges)
        assert {"writer", "reader", "score"} <= set(circuit["edges"][0])
        assert (out / "curves.png").stat().st_size > 0 and (out / "circuit.png").stat().st_size > 0
        if method == "edge-pruning":  # its training curve, which says whether the gates reached the target
            assert [len(r["train_history"]) for r in result.rows] == [3, 3] and (out / "training.png").is_file()
            assert all(r["train_expected_sparsity_last"] == r["train_history"][-1][2] for r in result.rows)
        else:
            assert not (out / "training.png").exists()


def test_circuit_cli_end_to_end_and_errors(tiny_folder: Path, tmp_path: Path) -> None:
    task = tmp_path / "words.jsonl"
    word_task().save_jsonl(task)
    result = runner.invoke(cli_app, ["circuit", str(task), "--model", str(tiny_folder), "--method", "eap", "--method",
                                         "edge-pruning", "--sparsity", "0.5", "--sparsity", "0.8", "--steps", "2",
                                         "--batch-size", "4", "--out", str(tmp_path / "out"), "--offline",
                                         "--no-progress"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("| eap |") == 2 and table.count("| edge-pruning |") == 2
    assert (tmp_path / "out" / "curves.png").is_file()
    assert (tmp_path / "out" / "edge-pruning" / "checkpoints" / "edge-pruning-0.8" / "state.json").is_file()

    def error(*args: str) -> str:
        r = runner.invoke(cli_app, ["circuit", *args, "--model", str(tiny_folder), "--offline", "--no-progress",
                                        "--out", str(tmp_path / "err")])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        return r.output

    assert "unknown method 'acdc'" in error(str(task), "--method", "acdc")
    assert "sparsity 1.5 must be a number in [0, 1)" in error(str(task), "--sparsity", "1.5")
    assert "unknown task 'nope'" in error("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "w1 w2", "corrupted": "w3 w4", "answer": "w1 w5", "wrong": "w3"}\n' * 2)
    assert re.search(r"bad.jsonl:[12]: answer 'w1 w5' is 2 tokens", error(str(bad)).replace("\n", ""))


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_built_in_tasks_on_real_tokenizers(name: str) -> None:
    """IOI names and greater-than years are single tokens and clean/corrupted lengths agree for both tokenizers
    (both split years into digits: the answer is the tens digit); the model prefers the answer on every example."""
    from test_real_models import _skip_unless_installed

    from clt_hub.circuits import greater_than, ioi
    from clt_hub.circuits.api import task_batches
    from clt_hub.circuits.tasks import correct
    from clt_hub.models.loading import load_model

    _skip_unless_installed(name)
    model, tok = load_model(name)
    for task in (ioi(tok, n=16), greater_than(tok, n=16)):
        train, test = task_batches(tok, task, 8, None)
        assert sum(len(b) for b in train + test) == 16
        with torch.no_grad():
            for b in test:
                logits = model(b.clean).logits[torch.arange(len(b)), b.last]
                assert correct(logits, b).float().mean() >= 0.75, task.name


def test_a_built_in_task_the_tokenizer_cannot_run_is_an_error_not_a_loop() -> None:
    """Issue 37: a vocabulary without the task's words (every IOI name and template word reads as <unk>) made
    `clt-hub circuit ioi` draw examples forever; a bounded number of draws ends in an error naming why."""
    from clt_hub.circuits.tasks import ioi

    with pytest.raises(ConfigError, match=r"only 0 of 4 ioi examples could be built for this tokenizer in 200 tries "
                                          r"\(last refusal: .*does not know.*\); write the task as a JSON lines file"):
        ioi(word_tokenizer(), n=4)
