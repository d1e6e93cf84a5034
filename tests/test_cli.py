from __future__ import annotations

import json
from pathlib import Path

from helpers import random_transcoder
from hubserver import FakeHub
from test_artifacts import assert_identical
from typer.testing import CliRunner

from clt_hub import Transcoder
from clt_hub.cli import app

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def test_help_explains_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("download", "info", "convert", "push", "list"):
        assert cmd in result.output
    result = runner.invoke(app, ["convert", "--help"])
    assert "native, circuit-tracer or sae-lens" in result.output


def test_info_json_and_table(tmp_path: Path) -> None:
    random_transcoder("clt", skip=True, model_name="gpt2", metrics={"nmse": 0.25}).save_pretrained(tmp_path / "a")
    result = runner.invoke(app, ["info", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["layout"] == "circuit-tracer-clt" and facts["layers"] == 3 and facts["features_per_layer"] == 16
    assert facts["model"] == "gpt2" and facts["metrics"] == {"nmse": 0.25} and facts["skip"] is True
    assert facts["parameters"] == sum(p.numel() for p in Transcoder.from_pretrained(tmp_path / "a").parameters())
    assert facts["size_on_disk"] > 0
    table = runner.invoke(app, ["info", str(tmp_path / "a")])
    assert table.exit_code == 0 and "hook_resid_mid" in table.output and "nmse" in table.output


def test_convert_all_layouts(tmp_path: Path) -> None:
    model = random_transcoder("plt", skip=True)
    model.save_pretrained(tmp_path / "src")
    for i, layout in enumerate(["circuit-tracer", "sae-lens", "native"]):
        src = tmp_path / ("src" if i == 0 else f"out{i - 1}")
        result = runner.invoke(app, ["convert", str(src), str(tmp_path / f"out{i}"), "--to", layout])
        assert result.exit_code == 0, result.output
        assert_identical(model, Transcoder.from_pretrained(tmp_path / f"out{i}"))
    assert (tmp_path / "out0" / "layer_0.safetensors").exists()


def test_convert_dtype_and_overwrite(tmp_path: Path) -> None:
    random_transcoder("clt").save_pretrained(tmp_path / "src")
    assert runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "o"), "--dtype", "bfloat16"]).exit_code == 0
    assert Transcoder.from_pretrained(tmp_path / "o").cfg.dtype == "bfloat16"
    again = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "o")])
    assert again.exit_code == 1 and "--overwrite" in again.output.replace("\n", " ")
    assert runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "o"), "--overwrite"]).exit_code == 0


def test_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["info", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
    bad = runner.invoke(app, ["convert", str(tmp_path / "empty"), str(tmp_path / "x"), "--to", "onnx"])
    assert bad.exit_code == 2 and "onnx" in bad.output


def test_download_and_push(hub: FakeHub, tmp_path: Path) -> None:
    model = random_transcoder("clt", model_name="gpt2")
    model.save_pretrained(tmp_path / "a")
    result = runner.invoke(app, ["push", str(tmp_path / "a"), "cli/pushed", "--branch", "dev", "-m", "from cli"])
    assert result.exit_code == 0, result.output
    assert "dev" in hub.repos["cli/pushed"].refs
    result = runner.invoke(app, ["download", "cli/pushed", "--revision", "dev", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert_identical(model, Transcoder.from_pretrained(path))
    missing = runner.invoke(app, ["download", "cli/absent", "--cache-dir", str(tmp_path / "c")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_list_shows_registry() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "gemma-2-2b-clt-426k" in result.output
