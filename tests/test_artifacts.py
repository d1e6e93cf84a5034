from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import random_transcoder
from safetensors.torch import load_file, save_file

from clt_hub import ArtifactError, ConfigError, Transcoder
from clt_hub.artifacts.layouts import circuit_tracer, detect

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


def assert_identical(a: Transcoder, b: Transcoder) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k
    assert a.cfg == b.cfg


VARIANTS = [
    ("clt", "jumprelu", False, "float32"),
    ("clt", "relu", True, "float32"),
    ("clt", "jumprelu", True, "bfloat16"),
    ("plt", "jumprelu", False, "float32"),
    ("plt", "relu", True, "float16"),
    ("plt", "jumprelu", True, "bfloat16"),
]


@pytest.mark.parametrize(("kind", "activation", "skip", "dtype"), VARIANTS)
def test_round_trip_native_circuit_tracer_saelens_native_is_bit_identical(
    tmp_path: Path, kind: str, activation: str, skip: bool, dtype: str
) -> None:
    model = random_transcoder(kind, activation, skip, dtype=dtype, model_name="gpt2",
                              hf_hook_name="transformer.h.{layer}.ln_2", metrics={"nmse": 0.1})
    model.save_pretrained(tmp_path / "native")
    a = Transcoder.from_pretrained(tmp_path / "native")
    a.save_pretrained(tmp_path / "ct", layout="circuit-tracer")
    b = Transcoder.from_pretrained(tmp_path / "ct")
    b.save_pretrained(tmp_path / "sl", layout="sae-lens")
    c = Transcoder.from_pretrained(tmp_path / "sl")
    c.save_pretrained(tmp_path / "native2")
    d = Transcoder.from_pretrained(tmp_path / "native2")
    for m in (a, b, c, d):
        assert_identical(model, m)
        assert m.dtype == getattr(torch, dtype)
    # the files themselves are byte-identical too
    for f in (tmp_path / "native").rglob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "native2" / f.relative_to(tmp_path / "native")).read_bytes()


def test_native_clt_is_circuit_tracer_layout_and_stores_nothing_twice(tmp_path: Path) -> None:
    model = random_transcoder("clt", skip=True, n_layers=4)
    model.save_pretrained(tmp_path / "a")
    names = {p.name for p in (tmp_path / "a").iterdir()}
    for l in range(4):
        assert {f"W_enc_{l}.safetensors", f"W_dec_{l}.safetensors", f"W_skip_{l}.safetensors", f"layer_{l}"} <= names
        enc = load_file(tmp_path / "a" / f"W_enc_{l}.safetensors")
        assert set(enc) == {f"W_enc_{l}", f"b_enc_{l}", f"b_dec_{l}", f"threshold_{l}"}
        assert load_file(tmp_path / "a" / f"W_dec_{l}.safetensors")[f"W_dec_{l}"].shape == (16, 4 - l, 8)
    meta = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert meta["model_kind"] == "cross_layer_transcoder"
    assert {"feature_input_hook", "feature_output_hook", "model_name"} <= set(meta)
    stored = sum(t.numel() for f in (tmp_path / "a").rglob("*.safetensors") for t in load_file(f).values())
    assert stored == sum(p.numel() for p in model.parameters())


def test_saelens_cfg_fields(tmp_path: Path) -> None:
    model = random_transcoder("plt", skip=True, model_name="gpt2", context_size=128,
                              dataset_path="local/text", neuronpedia_id="gpt2/plt",
                              hf_hook_name="transformer.h.{layer}.ln_2", hf_hook_name_out="transformer.h.{layer}.mlp")
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "layer_2" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["dtype"]) == (8, 16, 8, "float32")
    assert cfg["apply_b_dec_to_input"] is False
    md = cfg["metadata"]
    assert md["hook_name"] == "blocks.2.hook_resid_mid" and md["hook_name_out"] == "blocks.2.hook_mlp_out"
    assert md["hf_hook_name"] == "transformer.h.2.ln_2" and md["hf_hook_name_out"] == "transformer.h.2.mlp"
    assert (md["model_name"], md["context_size"], md["dataset_path"]) == ("gpt2", 128, "local/text")
    assert md["neuronpedia_id"] == "gpt2/plt/2" and md["prepend_bos"] is True
    assert "hook_name" not in cfg  # v6: hooks live in metadata
    weights = load_file(tmp_path / "a" / "layer_2" / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (8, 16) and weights["W_dec"].shape == (16, 8)
    assert weights["W_skip"].shape == (8, 8)


def test_model_card(tmp_path: Path) -> None:
    model = random_transcoder("clt", model_name="openai-community/gpt2", metrics={"nmse": 0.123, "l0": 12.5, "kl": 0.01})
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "clt-hub" and front["base_model"] == "openai-community/gpt2"
    assert "cross-layer-transcoder" in front["tags"]
    assert "| `nmse` | Normalised MSE (mean over layers) | 0.123 |" in card  # the config's key and its meaning
    metric_rows = [line for line in card.splitlines() if line.startswith("| ") and "0.01" in line]
    assert metric_rows and all(line.replace("\\|", "").count("|") == 4 for line in metric_rows)  # 3 cells each
    assert "converter=clt_layer_loader" in card and "load_clt(" in card and "Transcoder.from_pretrained" in card


@pytest.mark.parametrize("kind", ["clt"])
def test_lazy_decoders_match_eager(tmp_path: Path, kind: str) -> None:
    model = random_transcoder(kind, skip=True, dtype="bfloat16")
    model.save_pretrained(tmp_path / "a")
    lazy = Transcoder.from_pretrained(tmp_path / "a", lazy=True)
    assert lazy.is_lazy and len(lazy.W_dec) == 0
    x = torch.randn(5, model.n_layers, model.d_model, dtype=torch.bfloat16)
    model.SPARSE_DECODE_DENSITY = 1.1  # same gather path as the lazy model: bit-identical
    torch.testing.assert_close(lazy(x)[0], model(x)[0], rtol=0, atol=0)
    idx = torch.tensor([3, 1, 3])
    assert torch.equal(lazy.decoder_rows(1, idx), model.decoder_rows(1, idx))
    lazy.save_pretrained(tmp_path / "b")
    assert_identical(model, Transcoder.from_pretrained(tmp_path / "b"))
    model.SPARSE_DECODE_DENSITY = 0.0  # dense matmul vs row gather: rounding only (checked in float32)
    torch.testing.assert_close(lazy.float()(x.float())[0], model.float()(x.float())[0])


def test_lazy_needs_clt_layout(tmp_path: Path) -> None:
    random_transcoder("plt").save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match="lazy decoder loading needs the CLT layout"):
        Transcoder.from_pretrained(tmp_path / "a", lazy=True)


def test_gemmascope_params_npz(tmp_path: Path) -> None:
    model = random_transcoder("plt")
    for l in range(model.n_layers):
        folder = tmp_path / "gs" / f"layer_{l}" / "width_16" / "average_l0_5"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", W_enc=model.W_enc[l].detach().T.numpy(), W_dec=model.W_dec[l][:, 0].detach().numpy(),
                 b_enc=model.b_enc[l].detach().numpy(), b_dec=model.b_dec[l].detach().numpy(),
                 threshold=model.threshold[l].detach().numpy())
    loaded = Transcoder.from_pretrained(tmp_path / "gs")
    x = torch.randn(4, model.n_layers, model.d_model)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


# ------------------------------------------------------------------- bad input


@pytest.fixture
def clt_dir(tmp_path: Path) -> Path:
    random_transcoder("clt").save_pretrained(tmp_path / "clt")
    return tmp_path / "clt"


def test_truncated_safetensors(clt_dir: Path) -> None:
    f = clt_dir / "W_dec_1.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(ArtifactError, match=r"W_dec_1\.safetensors.*truncated"):
        Transcoder.from_pretrained(clt_dir)


def test_corrupted_header(clt_dir: Path) -> None:
    f = clt_dir / "W_enc_0.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"W_enc_0\.safetensors.*corrupted"):
        Transcoder.from_pretrained(clt_dir)


def test_missing_file(clt_dir: Path) -> None:
    (clt_dir / "W_dec_2.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"W_dec_2\.safetensors.*missing"):
        Transcoder.from_pretrained(clt_dir)


def test_missing_layer_is_named(clt_dir: Path) -> None:
    (clt_dir / "W_enc_2.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"layers \[0, 1\].*n_layers=3"):
        Transcoder.from_pretrained(clt_dir)


def test_wrong_tensor_shape(clt_dir: Path) -> None:
    f = clt_dir / "W_dec_0.safetensors"
    save_file({"W_dec_0": torch.zeros(16, 2, 8)}, f)
    with pytest.raises(ArtifactError, match=r"W_dec_0.*shape \(16, 2, 8\), expected \(16, 3, 8\).*n_layers=3"):
        Transcoder.from_pretrained(clt_dir)


def test_config_for_other_d_model(clt_dir: Path) -> None:
    meta = yaml.safe_load((clt_dir / "config.yaml").read_text())
    meta["clt_hub"]["d_model"] = 12
    (clt_dir / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ArtifactError, match=r"W_enc_0.*expected \(16, 12\).*d_model=12"):
        Transcoder.from_pretrained(clt_dir)


def test_config_for_other_layer_count(clt_dir: Path) -> None:
    meta = yaml.safe_load((clt_dir / "config.yaml").read_text())
    meta["clt_hub"]["n_layers"] = 4
    (clt_dir / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ArtifactError, match=r"n_layers=4"):
        Transcoder.from_pretrained(clt_dir)


def test_nan_weights(clt_dir: Path) -> None:
    f = clt_dir / "W_enc_1.safetensors"
    t = load_file(f)
    t["b_enc_1"][3] = float("nan")
    save_file(t, f)
    with pytest.raises(ArtifactError, match=r"W_enc_1\.safetensors:b_enc_1: 1 NaN/inf"):
        Transcoder.from_pretrained(clt_dir)


def test_unknown_activation_in_config(clt_dir: Path) -> None:
    meta = yaml.safe_load((clt_dir / "config.yaml").read_text())
    meta["clt_hub"]["activation"] = "softplus"
    (clt_dir / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ArtifactError, match=r"config\.yaml.*'softplus'.*jumprelu, relu, topk"):
        Transcoder.from_pretrained(clt_dir)


def test_unknown_architecture(tmp_path: Path) -> None:
    random_transcoder("plt").save_pretrained(tmp_path / "p")
    cfg_path = tmp_path / "p" / "layer_1" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"] = "gated"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"layer_1/cfg\.json: architecture 'gated'"):
        Transcoder.from_pretrained(tmp_path / "p")


def test_unexpected_tensor_is_not_dropped(clt_dir: Path) -> None:
    f = clt_dir / "W_enc_1.safetensors"
    t = load_file(f)
    t["mystery"] = torch.zeros(2)
    save_file(t, f)
    with pytest.raises(ArtifactError, match="unexpected tensor.*mystery"):
        Transcoder.from_pretrained(clt_dir)


def test_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="no transcoder found"):
        detect(tmp_path)


def test_unknown_model_kind(clt_dir: Path) -> None:
    (clt_dir / "config.yaml").write_text("model_kind: mystery\n")
    with pytest.raises(ArtifactError, match="unknown model_kind 'mystery'"):
        Transcoder.from_pretrained(clt_dir)


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_topk_refused_for_circuit_tracer(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ConfigError, match="not TopK"):
        random_transcoder(kind, "topk").save_pretrained(tmp_path / "x", layout="circuit-tracer")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_topk_round_trips_in_the_native_layout(tmp_path: Path, kind: str) -> None:
    # the trainer's final save is native: a TopK run must not fail after training
    model = random_transcoder(kind, "topk")
    model.save_pretrained(tmp_path / "x")
    back = Transcoder.from_pretrained(tmp_path / "x")
    assert back.cfg.activation == "topk" and back.cfg.topk == model.cfg.topk
    assert_identical(model, back)


def test_no_pickle_anywhere() -> None:
    src = Path(__file__).parents[1] / "clt_hub"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "torch.load(" not in text and "import pickle" not in text and "allow_pickle=True" not in text, f


# ------------------------------------------------------------------- atomic writes


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_transcoder("clt")
    calls = {"n": 0}
    real = circuit_tracer.write_safetensors

    def flaky(tensors: dict, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        real(tensors, path)

    monkeypatch.setattr(circuit_tracer, "write_safetensors", flaky)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = random_transcoder("clt", seed=1)
    old.save_pretrained(tmp_path / "out")
    monkeypatch.setattr(circuit_tracer, "write_yaml", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        random_transcoder("clt", seed=2).save_pretrained(tmp_path / "out")
    assert_identical(old, Transcoder.from_pretrained(tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_refuses_unrelated_folder(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not a transcoder artifact"):
        random_transcoder("clt").save_pretrained(tmp_path / "docs")
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"
    random_transcoder("clt").save_pretrained(tmp_path / "a")
    with pytest.raises(ArtifactError, match="overwrite=True"):
        random_transcoder("clt").save_pretrained(tmp_path / "a", overwrite=False)


KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import random_transcoder
m = random_transcoder("clt", n_layers=6, d_model=64, d_sae=2048, seed=int(sys.argv[1]))
print("ready", flush=True)
while True:
    m.save_pretrained(sys.argv[2])
"""


def test_killed_save_never_leaves_a_loadable_partial(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of saving: the folder is either absent or fully valid."""
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    reference = random_transcoder("clt", n_layers=6, d_model=64, d_sae=2048, seed=5)
    outcomes = set()
    for i, delay in enumerate([0.05, 0.15, 0.3, 0.45, 0.6, 0.8]):
        dst = tmp_path / f"out{i}"
        proc = subprocess.Popen([sys.executable, str(script), "5", str(dst)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if dst.exists():
            assert_identical(reference, Transcoder.from_pretrained(dst))
            outcomes.add("complete")
        else:
            outcomes.add("absent")
        for partial in tmp_path.glob(f".out{i}.partial-*"):
            # a scratch folder is refused, unless the kill came after its last byte was synced
            try:
                assert_identical(reference, Transcoder.from_pretrained(partial))
                outcomes.add("partial-complete")
            except ArtifactError as exc:
                assert "interrupted write" in str(exc)
                outcomes.add("partial-rejected")
    assert outcomes <= {"complete", "absent", "partial-rejected", "partial-complete"}
    assert "partial-rejected" in outcomes  # the kills did land mid-write at least once


def test_scratch_folder_is_refused_before_its_marker_exists(tmp_path: Path) -> None:
    """A kill between creating the scratch folder and writing its marker leaves an empty .partial- folder:
    it is still named an interrupted write, not "no transcoder found"."""
    scratch = tmp_path / ".out.partial-abc123"
    scratch.mkdir()
    with pytest.raises(ArtifactError, match="interrupted write"):
        Transcoder.from_pretrained(scratch)


def test_reads_plain_circuit_tracer_repos(tmp_path: Path) -> None:
    """Public circuit-tracer repos (e.g. mntss/clt-gemma-2-2b-426k) have no clt_hub fields."""
    import shutil

    for kind in ("clt", "plt"):
        model = random_transcoder(kind, skip=(kind == "plt"))
        folder = tmp_path / kind
        model.save_pretrained(folder, layout="circuit-tracer")
        meta = yaml.safe_load((folder / "config.yaml").read_text())
        del meta["clt_hub"]
        meta["feature_input_hook"] = "ln2.hook_normalized"
        (folder / "config.yaml").write_text(yaml.safe_dump(meta))
        for extra in ("cfg.json", "README.md"):
            (folder / extra).unlink()
        for sub in folder.glob("layer_*"):
            if sub.is_dir():
                shutil.rmtree(sub)
        loaded = Transcoder.from_pretrained(folder)
        assert loaded.cfg.kind == kind and loaded.cfg.feature_input_hook == "ln2.hook_normalized"
        x = torch.randn(4, model.n_layers, model.d_model)
        assert torch.equal(loaded(x)[0], model(x)[0])
