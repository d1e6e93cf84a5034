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
        ["trace", PROMPT, "--model", str(CLT), "--transcoder", str(MODEL), "--offline"], "holds a transcoder"),
    "the model folder as --transcoder": (
        ["intervene", PROMPT, "--model", str(MODEL), "--transcoder", str(MODEL), "--offline", "--scale", "3:1@10=0"],
        "no transcoder found"),
    "a word outside the organism's vocabulary": (
        ["trace", "The capital of the state containing Dallas is", "--model", str(MODEL), "--transcoder", str(CLT),
         "--offline"], "'The'"),
    "a model folder given to info": (["info", str(MODEL)], "no transcoder found"),
    "a missing folder": (["info", str(ROOT / "no-such-folder")], "neither an existing folder"),
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
