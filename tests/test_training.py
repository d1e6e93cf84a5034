"""Training: loss goes down, normalisation folds exactly, kill-and-resume is exact, and one process
equals two (data- and feature-parallel, gloo on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import word_lines
from test_trace_cli import word_tokenizer
from tiny_models import tiny_model

from clt_hub import Transcoder
from clt_hub.config import Architecture
from clt_hub.errors import ConfigError, TrainingError
from clt_hub.training.config import TrainConfig
from clt_hub.training.run import train
from clt_hub.training.trainer import Trainer

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md

CLI = [sys.executable, "-m", "clt_hub.cli", "train"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    model = tiny_model("gpt2", n_layers=3, d_model=32)
    model.save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    lines = word_lines()
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "heldout.txt").write_text("\n".join(lines[:40]) + "\n")
    (root / "corpus.json").write_text('{"source": "random words (tests/helpers.py)", "license": "CC0-1.0"}')
    return root


def _args(root: Path, out: Path, *extra: str, n_tokens: int = 6144) -> list[str]:
    return ["--model", str(root / "model"), "--dataset", str(root / "train.txt"), "--out-dir", str(out),
            "--d-sae", "32", "--n-tokens", str(n_tokens), "--batch-size", "256", "--lr", "1e-3",
            "--set", "context_size=32", "--set", "warmup_steps=4", "--set", "log_every=4", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return Transcoder.from_pretrained(folder).tensors()


def test_training_learns_and_writes_an_artifact(corpus: Path, tmp_path: Path) -> None:
    from clt_hub.models.loading import load_model

    model, tok = load_model(str(corpus / "model"))
    cfg = TrainConfig(model=str(corpus / "model"), dataset=str(corpus / "train.txt"), out_dir=str(tmp_path / "run"),
                      transcoder=Architecture(d_sae=32), n_tokens=256 * 80, batch_size=256, lr=1e-3, context_size=32, warmup_steps=4,
                      log_every=4, checkpoint_every=10, eval_dataset=str(corpus / "heldout.txt"), eval_tokens=500)
    final = train(cfg, model=model, tokenizer=tok, progress=False)
    tc = Transcoder.from_pretrained(final)
    log = [__import__("json").loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["fvu"] < 0.7 * log[0]["fvu"]
    for key in ("fvu", "l0", "ce_recovered", "next_token_agreement", "train_tokens"):
        assert key in tc.cfg.metrics
    assert "ce_recovered" in (final / "README.md").read_text()
    # the data card beside the dataset (clt_hub.training.corpus writes one) names the text and its licence
    assert tc.cfg.metrics["data_license"] == "CC0-1.0" and tc.cfg.metrics["data_source"].startswith("random words")
    assert "Training text: licence" in (final / "README.md").read_text()
    for png in ("training_curves.png", "layers.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    # runs side by side (benchmarks/compare_transcoders.py --plot)
    from clt_hub.training.curves import plot_runs

    report = __import__("json").loads((tmp_path / "run" / "eval.json").read_text())
    drawn = plot_runs({"a": (log, report), "b": (log[:3], None)}, tmp_path / "runs.png")
    assert drawn is not None and drawn.stat().st_size > 1000
    # only the last two checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000070", "step_00000080"]


def test_normalisation_folds_into_the_exported_weights() -> None:
    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16, skip=True), n_tokens=64, batch_size=32)
    tr = Trainer(cfg, n_layers=3, d_model=8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, generator=g) * 7, torch.randn(32, 3, 8, generator=g) * 0.3
    tr.fit_scales(x, y)
    tr.train_step(x, y)
    with torch.no_grad():
        for p in tr.tc.b_enc:
            p.add_(0.05)  # make biases non-trivial so a missed fold would show
        xn = x * tr.scale_in[None, :, None]
        _, acts = tr._encode(xn)
        expected = tr.tc.decode(acts, xn) / tr.scale_out[None, :, None]
        got, _ = tr.export()(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_features_that_never_fire_count_as_dead_in_a_run_shorter_than_the_window() -> None:
    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16, activation="relu"), n_tokens=256,
                      batch_size=32, dead_after_tokens=10**9)
    tr = Trainer(cfg, n_layers=3, d_model=8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, generator=g), torch.randn(32, 3, 8, generator=g)
    tr.fit_scales(x, y)
    with torch.no_grad():
        for l in range(3):  # 4 of the 16 features of every layer can never fire
            tr.tc.W_enc[l][:4] = 0.0
            tr.tc.b_enc[l][:4] = -1e3
    stats = [tr.train_step(x, y) for _ in range(3)]
    assert all(s["dead"] >= 0.25 for s in stats)  # a window of 10^9 tokens alone would log 0 for ever


def test_kill_and_resume_ends_with_the_same_weights(corpus: Path, tmp_path: Path) -> None:
    n_tokens = 256 * 200
    common = ["--set", "checkpoint_every=10"]
    whole = subprocess.run([*CLI, *_args(corpus, tmp_path / "whole", *common, n_tokens=n_tokens)],
                           capture_output=True, text=True, env=_env())
    assert whole.returncode == 0, whole.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, *_args(corpus, run, *common, n_tokens=n_tokens)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step_*/state.json")):
        time.sleep(0.02)
    time.sleep(0.3)  # let it run on past the checkpoint, so the kill loses work
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "transcoder").exists(), "the run finished before it was killed; the test proves nothing"
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*") if (p / "state.json").exists())
    assert steps and steps[-1] != f"step_{200:08d}"

    again = subprocess.run([*CLI, *_args(corpus, run, *common, n_tokens=n_tokens)], capture_output=True, text=True,
                           env=_env())
    assert again.returncode == 1 and "--resume" in again.stdout + again.stderr  # refuses to silently restart
    resumed = subprocess.run([*CLI, *_args(corpus, run, *common, "--resume", n_tokens=n_tokens)],
                             capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _tensors(tmp_path / "whole" / "transcoder"), _tensors(run / "transcoder")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("parallel", ["data", "features"])
def test_one_process_equals_two(corpus: Path, tmp_path: Path, parallel: str) -> None:
    extra = ["--parallel", parallel, "--set", "checkpoint_every=100"]
    one = subprocess.run([*CLI, *_args(corpus, tmp_path / "one", *extra, n_tokens=256 * 12)],
                         capture_output=True, text=True, env=_env())
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29500 + (os.getpid() % 1000)), "-m", "clt_hub.cli", "train",
                          *_args(corpus, tmp_path / "two", *extra, n_tokens=256 * 12)],
                         capture_output=True, text=True, env=_env())
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    a, b = _tensors(tmp_path / "one" / "transcoder"), _tensors(tmp_path / "two" / "transcoder")
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-6)
        assert ((a[name] - b[name]).abs().max() / scale) < 1e-4, name
    # the two-process checkpoint loads in one process (checkpoints hold full tensors)
    import json

    last = sorted((tmp_path / "two" / "checkpoints").glob("step_*"))[-1]
    saved = json.loads((last / "state.json").read_text())
    assert saved["world_size"] == 2
    single = Trainer(TrainConfig(**saved["config"]), n_layers=3, d_model=32)
    single.load_checkpoint(last)
    exported = single.export().tensors()
    for name in b:
        assert torch.equal(exported[name], b[name]), name


def test_features_must_divide_across_ranks(corpus: Path, tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(30500 + (os.getpid() % 1000)), "-m", "clt_hub.cli", "train",
                          *_args(corpus, tmp_path / "odd", "--parallel", "features", "--d-sae", "33")],
                         capture_output=True, text=True, env=_env())
    assert bad.returncode != 0 and "do not divide across 2 ranks" in bad.stdout + bad.stderr


def test_bad_training_input(corpus: Path, tmp_path: Path) -> None:
    def cli(*extra: str, dataset: str | None = None) -> subprocess.CompletedProcess:
        args = _args(corpus, tmp_path / "bad", *extra)
        if dataset is not None:
            args[args.index("--dataset") + 1] = dataset
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=_env())
        done.stdout += done.stderr  # errors go to stderr
        return done

    missing = cli(dataset=str(tmp_path / "nope.txt"))
    assert missing.returncode == 1 and "does not exist" in missing.stdout
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = cli(dataset=str(tmp_path / "empty.txt"))
    assert empty.returncode == 1 and "gave no text" in empty.stdout
    hook = cli("--set", "transcoder.feature_input_hook=blocks.nope")
    assert hook.returncode == 1 and "hook 'blocks.nope' is not supported" in hook.stdout
    unknown = cli("--set", "learning_rate=1")
    assert unknown.returncode == 1 and "unknown field(s) learning_rate" in unknown.stdout
    long = cli("--set", "context_size=500")
    assert long.returncode == 1 and "exceeds the model's context of 64" in long.stdout


def _checkpointed_then_stepped(tmp_path: Path) -> tuple[TrainConfig, Trainer, Path, torch.Tensor, torch.Tensor]:
    """A small trainer that saved a checkpoint after step 1 and then took step 2."""
    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16), n_tokens=640, batch_size=32,
                      out_dir=str(tmp_path))
    tr = Trainer(cfg, n_layers=2, d_model=8)
    x, y = torch.randn(32, 2, 8), torch.randn(32, 2, 8)
    tr.fit_scales(x, y)
    tr.train_step(x, y)
    saved = tr.save_checkpoint()
    assert saved is not None
    tr.train_step(x, y)
    return cfg, tr, saved, x, y


def test_nan_loss_names_the_step_and_checkpoint(tmp_path: Path) -> None:
    _, tr, saved, x, y = _checkpointed_then_stepped(tmp_path)
    with pytest.raises(TrainingError, match=rf"at step 2; last good checkpoint: {saved}"):
        tr.train_step(x * float("nan"), y)


def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    cfg, tr, good, _, _ = _checkpointed_then_stepped(tmp_path)

    def full(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(TrainingError, match="No space left on device.*step_00000001 is intact"):
        tr.save_checkpoint()
    monkeypatch.undo()
    assert tr.latest_checkpoint() == good
    fresh = Trainer(cfg, n_layers=2, d_model=8)
    fresh.load_checkpoint(good)  # still loads
    assert fresh.step == 1
    assert not list(tmp_path.joinpath("checkpoints").glob(".*partial*"))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="'d_sae' must be a positive integer"):
        TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=0))
    with pytest.raises(ConfigError, match="batch_topk needs transcoder activation 'topk'"):
        TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16), batch_topk=True)
    with pytest.raises(ConfigError, match="smaller than one batch"):
        TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16), n_tokens=10, batch_size=100)
    with pytest.raises(ConfigError, match="'bad_records' is 'drop'; use 'raise' or 'skip'"):
        TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16), bad_records="drop")


@pytest.mark.parametrize("batch_topk", [False, True])
def test_topk_training_keeps_k_features(batch_topk: bool) -> None:
    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16, activation="topk", topk=3),
                      n_tokens=640, batch_size=32, batch_topk=batch_topk)
    tr = Trainer(cfg, n_layers=2, d_model=8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, 8, generator=g), torch.randn(32, 2, 8, generator=g)
    tr.fit_scales(x, y)
    first = tr.train_step(x, y)["loss"]
    for _ in range(20):
        stats = tr.train_step(x, y)
    assert stats["loss"] < first
    _, acts = tr._encode(x * tr.scale_in[None, :, None])
    per_token = (acts > 0).sum(-1).float()                 # [B, L]
    if batch_topk:  # k per token on average over the batch, not exactly per token
        assert per_token.mean().item() <= 3 and per_token.max().item() > 0
    else:
        assert (per_token <= 3).all()


def test_eval_cli(corpus: Path, tmp_path: Path) -> None:
    import json

    from helpers import random_transcoder
    from typer.testing import CliRunner

    from clt_hub.cli import app

    tc = random_transcoder("clt", n_layers=3, d_model=32, d_sae=16, seed=2)
    tc.save_pretrained(tmp_path / "clt")
    result = CliRunner().invoke(app, ["eval", str(corpus / "model"), str(tmp_path / "clt"), "--dataset",
                                      str(corpus / "heldout.txt"), "--n-tokens", "300", "--context-size", "32",
                                      "--out", str(tmp_path / "ev"), "--write-metrics", "--offline"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["n_tokens"] >= 300 and len(report["fvu"]) == 3
    assert report["ce_zero_ablated"] > 0 and 0 <= report["next_token_agreement"] <= 1
    assert (tmp_path / "ev" / "layers.png").stat().st_size > 1000
    assert Transcoder.from_pretrained(tmp_path / "clt").cfg.metrics["ce_recovered"] == pytest.approx(
        report["ce_recovered"], abs=1e-6)


def test_activation_cache_round_trip(corpus: Path, tmp_path: Path) -> None:
    from clt_hub.models.loading import load_model
    from clt_hub.texts import iter_texts
    from clt_hub.training.activation_store import ActivationCache, SourceConfig, model_activations

    model, tok = load_model(str(corpus / "model"))
    src = SourceConfig(context_size=32)
    cache = ActivationCache.build(model, tok, iter_texts(corpus / "heldout.txt"), tmp_path / "cache", n_tokens=500,
                                  cfg=src, shard_tokens=128, dtype="bfloat16")
    assert cache.n_tokens == 500 and len(cache.shards) == 4 and cache.manifest["dtype"] == "bfloat16"
    direct = torch.cat([x for x, _ in model_activations(model, tok, iter_texts(corpus / "heldout.txt"), src)])[:500]
    # every token shows up exactly once per epoch (shuffled), in bfloat16 precision
    xs = torch.cat([x for x, _ in cache.batches(50, seed=0)])
    assert xs.shape == (500, 3, 32)
    key = lambda t: sorted(map(tuple, t[:, 0, :4].to(torch.bfloat16).float().tolist()))  # noqa: E731
    assert key(xs) == key(direct)
    assert not torch.equal(xs, direct.to(torch.bfloat16).float())  # and not in the original order
    with pytest.raises(ConfigError, match="not an activation cache"):
        ActivationCache(tmp_path)


def test_yaml_config_is_read_and_checked(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clt_hub.cli import app
    from clt_hub.training.config import read_config_file

    (tmp_path / "run.yaml").write_text("model: m\ndataset: d\ntranscoder: {d_sae: 64}\n")
    assert TrainConfig.from_yaml(tmp_path / "run.yaml").transcoder.d_sae == 64
    (tmp_path / "list.yaml").write_text("- model\n")
    with pytest.raises(ConfigError, match="must be a mapping of TrainConfig fields"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("model: m\ndataset: d\ntranscoder: {d_sae: 64}\nlearning_rate: 1\n")
    bad = CliRunner().invoke(app, ["train", str(tmp_path / "typo.yaml")])
    assert bad.exit_code == 1 and "unknown field(s) learning_rate" in bad.output


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_are_valid_training_configs(recipe: Path) -> None:
    """Every committed recipe passes the config's own validation (a mistyped field would fail the run only once
    the model had loaded)."""
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.model and cfg.n_tokens >= cfg.batch_size
