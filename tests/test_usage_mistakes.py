"""A new user's mistakes on the command line, each on the bundled organism: one clear line that names the
problem, exit status 1, no traceback, and (for an unreachable Hub) one attempt, not a half-minute of retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL, CLT = ROOT / "paper_cases/artifacts/model", ROOT / "paper_cases/artifacts/clt"
PROMPT = "fact : the capital of the state containing Dallas is"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clt_hub.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300", **(env or {})}, cwd=ROOT, timeout=300)


MISTAKES = {
    "a transcoder folder as --model": (
        ["trace", PROMPT, "--model", str(CLT), "--transcoder", str(CLT), "--offline"], "holds a transcoder, not a language model"),
    "the artifacts folder as --model": (
        ["trace", PROMPT, "--model", str(ROOT / "paper_cases/artifacts"), "--transcoder", str(CLT), "--offline"],
        "is not a transformers model folder"),
    "model and transcoder swapped": (
        ["trace", PROMPT, "--model", str(CLT), "--transcoder", str(MODEL), "--offline"],
        "it looks like a language model folder"),
    "the model folder as --transcoder": (
        ["intervene", PROMPT, "--model", str(MODEL), "--transcoder", str(MODEL), "--offline", "--scale", "3:1@10=0"],
        "no transcoder found"),
    "a word outside the organism's vocabulary": (
        ["trace", "The capital of the state containing Dallas is", "--model", str(MODEL), "--transcoder", str(CLT),
         "--offline"], "'The'"),
    "a model folder given to info": (["info", str(MODEL)], "no transcoder found"),
    "a missing folder": (["info", str(ROOT / "no-such-folder")], "neither an existing folder"),
    "an intervention number that is not a number": (
        ["intervene", PROMPT, "--model", str(MODEL), "--transcoder", str(CLT), "--offline", "--scale", "3:1@10=1.2.3"],
        "'1.2.3' is not a number"),
    "an intervention without a position separator": (
        ["intervene", PROMPT, "--model", str(MODEL), "--transcoder", str(CLT), "--offline", "--scale", "3-1=0"],
        "LAYER:FEATURE"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_usage_mistake_is_one_clear_line(mistake: str) -> None:
    args, expected = MISTAKES[mistake]
    done = cli(*args)
    output = done.stdout + done.stderr
    assert done.returncode in (1, 2), output
    assert "Traceback" not in output, output
    assert expected in " ".join(output.split()), output


class SilentHub:
    """A server that accepts connections and never answers: an unreachable Hub that counts the attempts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.attempts = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.attempts += 1
            self.held.append(conn)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"


def test_unreachable_hub_fails_at_once_and_suggests_offline(tmp_path: Path) -> None:
    """One probe, then the error (huggingface_hub's own retries would take about half a minute)."""
    hub = SilentHub()
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf")}
    done = cli("trace", PROMPT, "--model", "org/some-model", "--transcoder", str(CLT), env=env)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "Traceback" not in output, output
    assert "cannot reach the Hub" in output and "--offline" in output, output
    assert hub.attempts == 1
    done = cli("info", "org/some-clt", env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "--offline" in output and "Traceback" not in output, output


# each bad `clt-hub trace` option is refused before the model loads: the model named here does not exist, so
# a check made after loading would report the model instead; and nothing is written
TRACE_OPTIONS = {
    "node threshold above 1": (["--node-threshold", "5"], "node_threshold is a fraction of influence"),
    "node threshold nan": (["--node-threshold", "nan"], "node_threshold is a fraction of influence"),
    "negative edge threshold": (["--edge-threshold", "-1"], "edge_threshold is a fraction of influence"),
    "no logits": (["--max-logits", "0"], "--max-logits"),
    "batch of zero": (["--batch-size", "0"], "--batch-size"),
    "no feature nodes": (["--max-feature-nodes", "0"], "--max-feature-nodes"),
    "a logit difference without a bar": (["--logit-diff", " Austin"], "write 'A|B'"),
    "a typo in --contexts": (["--contexts", "no_such_texts.txtt"], "--contexts no_such_texts.txtt does not exist"),
}


@pytest.mark.parametrize("mistake", list(TRACE_OPTIONS))
def test_trace_options_are_refused_before_any_work(mistake: str, tmp_path: Path) -> None:
    extra, expected = TRACE_OPTIONS[mistake]
    out = tmp_path / "out"
    done = cli("trace", PROMPT, "--model", str(tmp_path / "not-loaded"), "--transcoder", str(CLT), "--offline",
               "--out", str(out), *extra)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode in (1, 2) and "Traceback" not in output, output
    assert expected in output, output
    assert not out.exists()


def test_an_unreachable_transcoder_is_refused_before_a_known_model_is_converted(tmp_path: Path) -> None:
    """A known model is converted from GGUF on first use (about a minute for Gemma-3-270M); a transcoder that
    cannot be had must be reported before that, so the cache stays empty."""
    cache = tmp_path / "cache"
    done = cli("trace", "Dallas is a city in the state of", "--model", "gemma-3-270m", "--transcoder",
               str(tmp_path / "no-such-transcoder"), "--offline", "--out", str(tmp_path / "out"),
               env={"CLT_HUB_CACHE": str(cache)})
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "Traceback" not in output, output
    assert "no-such-transcoder" in output, output
    assert not (cache / "models").exists()


def test_trace_refuses_an_empty_prompt_and_an_out_that_is_a_file(tmp_path: Path) -> None:
    done = cli("trace", "   ", "--model", str(tmp_path / "not-loaded"), "--transcoder", str(CLT), "--offline",
               "--out", str(tmp_path / "out"))
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "the prompt is empty" in output and not (tmp_path / "out").exists(), output
    (tmp_path / "file").write_text("x")
    done = cli("trace", PROMPT, "--model", str(tmp_path / "not-loaded"), "--transcoder", str(CLT), "--offline",
               "--out", str(tmp_path / "file"))
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "is a file; give a folder" in output, output
    assert (tmp_path / "file").read_text() == "x"


def test_rich_markup_in_a_prompt_is_printed_as_typed() -> None:
    """rich would parse "[/bold]" (and crash) or swallow "[link=...]" if the words were printed as markup."""
    done = cli("trace", f"{PROMPT} [/bold] [link=http://x]here[/link]", "--model", str(MODEL), "--transcoder",
               str(CLT), "--offline", "--out", "/nonexistent-parent/never-written")
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    assert "[/bold]" in output and "[link=http://x]here[/link]" in output, output


def test_a_bad_repo_id_is_refused_before_push_or_training(tmp_path: Path) -> None:
    done = cli("push", str(CLT), "bad id!!")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "Traceback" not in output, output
    assert "'bad id!!' is not a Hub repo id" in output, output
    done = cli("train", "--model", str(MODEL), "--dataset", str(tmp_path / "none.txt"), "--out-dir",
               str(tmp_path / "run"), "--d-sae", "64", "--push-to-hub", "bad id!!")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "push_to_hub" in output and "is not a Hub repo id" in output, output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------------
# Every option value is checked before the model loads (issue 37): numbers finite and in range, words the tokenizer
# knows, targets distinct, training fields of their own type, a transcoder that fits in memory. On a tiny model
# (tests/test_trace_cli.py's word tokenizer: w0..w59) whose weights must never be read here.

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers import word_lines
    from test_trace_cli import save_tiny_model_and_clt

    root = tmp_path_factory.mktemp("options")
    save_tiny_model_and_clt(root)
    (root / "texts.txt").write_text("\n".join(word_lines(50)))
    (root / "task.jsonl").write_text('{"clean": "w1 w2", "corrupted": "w3 w2", "answer": "w4", "wrong": "w5"}\n' * 4)
    (root / "afile").write_text("x")
    return {"model": root / "model", "clt": root / "clt", "texts": root / "texts.txt", "task": root / "task.jsonl",
            "afile": root / "afile", "root": root}


def _trace(*extra: str, prompt: str = "w1 w2 w3") -> list[str]:
    return ["trace", prompt, "--model", "{model}", "--transcoder", "{clt}", "--offline", "--out", "{root}/out", *extra]


def _intervene(*extra: str, prompt: str = "w1 w2 w3") -> list[str]:
    return ["intervene", prompt, "--model", "{model}", "--transcoder", "{clt}", "--offline", *extra]


def _eval(*extra: str, transcoder: str = "{clt}") -> list[str]:
    return ["eval", "{model}", transcoder, "--dataset", "{texts}", "--offline", *extra]


def _train(*extra: str) -> list[str]:
    return ["train", "--model", "{model}", "--dataset", "{texts}", "--out-dir", "{root}/run", "--d-sae", "16",
            "--n-tokens", "256", "--batch-size", "64", "--set", "context_size=16", *extra]


def _circuit(*extra: str, task: str = "{task}") -> list[str]:
    return ["circuit", task, "--model", "{model}", "--offline", "--out", "{root}/circuits", *extra]


# name: (arguments, exit status, the message (whitespace collapsed)). Each was, before, exit 0 with garbage, a raw
# traceback, or a refusal made only after the model had loaded.
OPTION_MISTAKES = {
    "trace: a --target the vocabulary lacks": (_trace("--target", "zzz"), 1, "target 'zzz' is not in this tokenizer's vocabulary"),
    "trace: the same --target twice": (_trace("--target", "w4", "--target", "w4"), 1, "target 'w4' is given twice"),
    "trace: two --targets that are one token": (_trace("--target", "w4", "--target", " w4"), 1, "are the same token"),
    "trace: a logit difference of a token with itself": (_trace("--logit-diff", "w4|w4"), 1, "compares a token with itself"),
    "trace: a logit difference with an unknown word": (_trace("--logit-diff", "w4|zz"), 1, "target 'zz' is not in this tokenizer's vocabulary"),
    "trace: a prompt word the vocabulary lacks": (_trace(prompt="w1 zz"), 1, "does not know: 'zz'"),
    "trace: a prompt longer than the model's context": (_trace(prompt=" ".join(["w1"] * 70)), 1, "the prompt has 71 tokens but the model's context is 64; shorten the prompt"),
    "trace: a prompt far longer than the context, in characters": (_trace(prompt="w1 " * 1000), 1, "the prompt is 3,000 characters long; clt_hub takes at most 1,024 (16 per token of the model's 64-token context), so it was not tokenised"),
    "trace: a prompt of megabytes": (_trace(prompt="w1 " * 400_000), 1, "the prompt is 1,200,000 characters long; clt_hub takes at most 1,000,000, so it was not tokenised"),
    "intervene: a prompt longer than the model's context": (_intervene("--scale", "0:3@2=2", prompt=" ".join(["w1"] * 70)), 1, "the prompt has 71 tokens but the model's context is 64"),
    "intervene: a prompt far longer than the context, in characters": (_intervene("--scale", "0:3@2=2", prompt="w1 " * 1000), 1, "clt_hub takes at most 1,024 (16 per token of the model's 64-token context)"),
    "intervene: a layer beyond the transcoder": (_intervene("--scale", "7:3@2=2"), 1, "intervention layer 7 out of range 0..2"),
    "intervene: a feature beyond the transcoder": (_intervene("--set", "0:999=1"), 1, "feature index 999 out of range 0..23"),
    "intervene: a position beyond the prompt": (_intervene("--scale", "0:3@20=2"), 1, "position 20 out of range 0..3 for a 4-token prompt"),
    "intervene: the same feature twice": (_intervene("--scale", "0:3@2=2", "--set", "0:3@2=1"), 1, "layer 0 feature 3 at position 2 is set or scaled twice"),
    "intervene: an infinite supernode factor": (_intervene("--scale-supernode", "x=inf", "--graph", "{afile}"), 1, "with a finite number"),
    "intervene: an unknown --mode": (_intervene("--scale", "0:3@2=2", "--mode", "opn"), 2, "'opn' is not one of 'constrained', 'open'"),
    "intervene: more --top tokens than the vocabulary": (_intervene("--scale", "0:3@2=2", "--top", "1000"), 2, "--top 1000 is more tokens than the model's vocabulary has (64)"),
    "intervene: a prompt word the vocabulary lacks": (_intervene("--scale", "0:3@2=2", prompt="w1 zz"), 1, "does not know: 'zz'"),
    "eval: no tokens": (_eval("--n-tokens", "0"), 2, "Invalid value for '--n-tokens'"),
    "eval: a context of 0": (_eval("--context-size", "0"), 2, "Invalid value for '--context-size'"),
    "eval: a batch of 0": (_eval("--batch-size", "0"), 2, "Invalid value for '--batch-size'"),
    "eval: a context longer than the model's": (_eval("--context-size", "100000"), 2, "--context-size 100,000 is longer than the model's context (64 tokens)"),
    "eval: a --dataset typo": (_eval("--dataset", "{texts}t"), 1, "--dataset {texts}t does not exist"),
    "eval: --write-metrics into a Hub repo": (_eval("--write-metrics", transcoder="org/some-clt"), 2, "--write-metrics needs a local transcoder folder"),
    "eval: --out is a file": (_eval("--out", "{afile}"), 1, "is a file; give a folder"),
    "train: a word for a float": (_train("--set", "weight_decay=x"), 1, "training field 'weight_decay' must be a finite number (float), got 'x' (str)"),
    "train: a negative weight decay": (_train("--set", "weight_decay=-1"), 1, "training field 'weight_decay' must be >= 0, got -1"),
    "train: a float for an int": (_train("--set", "seed=1.5"), 1, "training field 'seed' must be an integer (int), got 1.5 (float)"),
    "train: a negative seed": (_train("--set", "seed=-1"), 1, "training field 'seed' must be an integer from 0 to 4,294,967,295, got -1"),
    "train: a list for an int": (_train("--set", "warmup_steps=[1, 2]"), 1, "training field 'warmup_steps' must be an integer (int), got [1, 2] (list)"),
    "train: a negative warmup": (_train("--set", "warmup_steps=-5"), 1, "training field 'warmup_steps' must be >= 0, got -5"),
    "train: an infinite coefficient": (_train("--set", "sparsity_coeff=.inf"), 1, "training field 'sparsity_coeff' must be a finite number (float), got inf (float)"),
    "train: 1e-3, which YAML reads as text": (_train("--set", "preact_coeff=1e-3"), 1, "write it as a YAML number (1.0e-3"),
    "train: a word for a bool": (_train("--set", "amp=maybe"), 1, "training field 'amp' must be true or false (bool), got 'maybe' (str)"),
    "train: an unknown device": (_train("--set", "device=gpu"), 1, "training field 'device' is 'gpu'; use cpu, cuda, cuda:N"),
    "train: a GPU this machine lacks": (_train("--set", "device=cuda:999"), 1, "training field 'device' is 'cuda:999' but this machine has"),
    "train: a word for topk": (_train("--set", "transcoder.topk=x"), 1, "training field 'transcoder.topk' must be a positive integer or null, got 'x'"),
    "train: a d_sae that cannot fit in memory": (_train("--d-sae", "1000000"), 1, "transcoder.d_sae 1,000,000 needs at least 4.4 GiB to train (clt, 3 layers of width 32"),
    "circuit: no threads": (_circuit("--threads", "0"), 2, "Invalid value for '--threads'"),
    "circuit: no examples": (_circuit("--examples", "0"), 2, "Invalid value for '--examples'"),
    "circuit: the same sparsity twice": (_circuit("--sparsity", "0.5", "--sparsity", "0.5"), 1, "--sparsity 0.5 is given twice"),
    "circuit: an unknown task": (_circuit(task="ioi2"), 1, "unknown task 'ioi2'"),
    "convert: an unknown --dtype": (["convert", "{clt}", "{root}/converted", "--dtype", "float8"], 2, "--dtype 'float8': use one of float32"),
}


@pytest.mark.parametrize("mistake", list(OPTION_MISTAKES))
def test_every_option_is_checked_before_the_model_loads(mistake: str, tiny: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers
    from typer.testing import CliRunner

    import clt_hub.models.loading
    import clt_hub.training.config
    import clt_hub.training.run
    from clt_hub.cli import app

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    for owner, name in ((clt_hub.models.loading, "load"), (clt_hub.models.loading, "load_model"),
                        (clt_hub.training.run, "load_model"), (transformers.AutoModelForCausalLM, "from_pretrained")):
        monkeypatch.setattr(owner, name, loaded)
    monkeypatch.setattr(clt_hub.training.config, "available_memory", lambda: 2**30, raising=False)  # 1 GiB, any machine
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args, status, expected = OPTION_MISTAKES[mistake]
    paths = {k: str(v) for k, v in tiny.items()}
    result = CliRunner(env={"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}).invoke(
        app, [a.format(**paths) for a in args])
    output = result.output
    assert "the model was loaded" not in repr(result.exception), output
    assert result.exit_code == status and "Traceback" not in output, (result.exit_code, output)
    assert expected.format(**paths) in " ".join(output.split()), output
    if status == 1:  # our own refusal: one line
        assert len(output.strip().splitlines()) == 1 and output.startswith("error: "), output
    for written in ("out", "run", "circuits", "converted"):
        assert not (tiny["root"] / written).exists(), written


def test_a_prompt_longer_than_the_context_is_never_tokenised(tiny: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 37: a 10 MB prompt was tokenised in full (1.45 GB) before its length was checked. The CLI, `trace()`
    and `encode_prompt` refuse it by its characters first: no tokenizer call sees more than the cap."""
    import transformers
    from typer.testing import CliRunner

    from clt_hub.attribution.trace import trace
    from clt_hub.cli import app
    from clt_hub.errors import ConfigError
    from clt_hub.models.loading import encode_prompt, load_transcoder

    seen: list[int] = []
    call = transformers.PreTrainedTokenizerBase.__call__

    def counted(self: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(text) if isinstance(text, str) else 0)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", counted)
    for prompt, limit in (("w1 " * 1000, "1,024 (16 per token"), ("w1 " * 400_000, "1,000,000,")):
        result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["trace", prompt, "--model", str(tiny["model"]),
                                                                "--transcoder", str(tiny["clt"]), "--offline",
                                                                "--out", str(tiny["root"] / "out")])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and f"clt_hub takes at most {limit}" in output, output
    assert max(seen, default=0) <= 1024, seen
    assert not (tiny["root"] / "out").exists()

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    tok = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    tc = load_transcoder(str(tiny["clt"]))
    with pytest.raises(ConfigError, match=r"the prompt is 3,000 characters long; clt_hub takes at most 1,024"):
        trace("w1 " * 1000, model, tok, tc)
    with pytest.raises(ConfigError, match=r"the prompt has 71 tokens but the model's context is 64"):
        trace(" ".join(["w1"] * 70), model, tok, tc)
    with pytest.raises(ConfigError, match=r"the prompt is 10,000,000 characters long; clt_hub takes at most 1,000,000"):
        encode_prompt(tok, "w" * 10_000_000)  # no context given: the absolute cap
    assert max(seen, default=0) <= 1024, seen
