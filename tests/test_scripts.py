"""Every script in benchmarks/ runs end to end on a tiny shape (`--smoke`), so a change that breaks one fails
here instead of on the next benchmark run. Each runs in a fresh process from a temporary folder, with its
temporary files, caches and home there too; the patterns are rows of what it prints, proof that the
measured path ran. (crosschecks/ scripts need their own venvs: `nox -s peer_smoke peer_circuits_smoke`.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PRINTS = {
    "bench_attribution": [r"len +8 +nodes +8 +active +\d+ +wall", r"len +16 +nodes +8 +active +\d+ +wall"],
    "bench_circuits": [r"\| eap-ig \| 0\.5\d* \| \d+ \|", r"\| edge-pruning \| 0\.9\d* \| \d+ \|",
                       r"\| 2 \| \d+ \| 16 \| 2 \| [\d.]+ \|", r"best [\d.]+ s/step"],
    "bench_distributed_attribution": [r"\| 1 x 2 \| [\d.]+ \| [\d.]+ \| [\d,]+ \| 1\.00 \| 1\.00 \| 0\.0e\+00 \|",
                                      r"\| 2 x 1 \| [\d.]+ \| [\d.]+ \| [\d,]+ \| [\d.]+ \| [\d.]+ \| \d\.\de-?[+\d]+ \|"],
    "bench_eval": [r"\| tiny random gemma3 [^|]* \| batch_size=1 \(one chunk per forward\) \| (\d+) \|",
                   r"\| tiny random gemma3 [^|]* \| batch_size=8 \| \d+ \| [\d.]+ \| [\d,.]+ \| [\d.]+ \| [\d.]+ \| "
                   r"[\d,.]+ \| [\d.]+ \| [\d.e+-]+, [\d.e+-]+ \|"],
    "bench_load": [r"from_pretrained time \(s\) +[\d.]+ +[\d.]+", r"decode 64 tok x 50/layer \(s\) +[\d.]+"],
    "bench_real_model": [r"\| 16 \| 16 \| \d+ \| [\d.]+ \|", r"mlp_io \(training activations\) +median +\d+ tok/s"],
    "bench_space_barrage": [r"\| alive at the end \| yes \|",
                            r"\| hostile requests refused, naming the problem \| (\d+) of \1 \|",
                            r"\| concurrent traces \(contexts off\) returning a graph \| 4 of 4 \|"],
    "bench_space_sessions": [r"\| cap 1 graphs .* \| told: this graph was dropped", r"\| no cap \| .* \| still there \|"],
    "bench_train": [r"training step: \d+ ms = [\d,]+ tokens/s", r"clt_hub PLT \(1 layer\) +[\d.]+ ms"],
    "bench_train_real": [r"\| training step \(clt, 16 features/layer\) \| [\d,]+ \| [\d.]+ \|"],
    "compare_transcoders": [r"\| all \(mean of 4\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|"],
}
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_has_a_smoke_check() -> None:
    assert sorted(PRINTS) == SCRIPTS, "a new benchmark needs a --smoke mode and its expected output in PRINTS"


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "TMPDIR": str(tmp_path), "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "HF_HOME": str(home / "hf"), "CLT_HUB_CACHE": str(home / "clt_hub"), "MPLCONFIGDIR": str(home / "mpl"),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for pattern in PRINTS[script]:
        assert re.search(pattern, done.stdout), f"{script} --smoke did not print {pattern!r}:\n{done.stdout[-3000:]}"
