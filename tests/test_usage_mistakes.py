"""A new user's mistakes on the command line, each on the bundled organism: one clear line that names the
problem, exit status 1, no traceback, and (for an unreachable Hub) one attempt, not a half-minute of retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

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
