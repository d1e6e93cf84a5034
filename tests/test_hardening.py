"""Hostile or broken artifacts and graph files, each probed as an attacker or a careless user would: one
clear error that names the problem, no memory exhaustion, no code in model cards, nothing unpickled."""

from __future__ import annotations

import json
import math
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import random_transcoder
from hubserver import FakeHub
from safetensors.torch import save_file

from clt_hub import ArtifactError, ConfigError, Transcoder
from clt_hub.attribution.graph_json import load as load_graph
from clt_hub.loading.hub import describe

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path: Path, name: str = "clt", **kwargs: object) -> Path:
    folder = tmp_path / name
    random_transcoder("clt", **kwargs).save_pretrained(folder)  # type: ignore[arg-type]
    return folder


def edit_config(folder: Path, **fields: object) -> None:
    """Change fields of the clt_hub section of a CLT's config.yaml (what a hostile repo would do)."""
    meta = yaml.safe_load((folder / "config.yaml").read_text())
    meta["clt_hub"].update(fields)
    (folder / "config.yaml").write_text(yaml.safe_dump(meta))


# 1. one config line must not allocate without bound ------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "message"), [
    ("n_layers", 10**9, "'n_layers' must be a positive integer of at most 4,096"),
    ("d_sae", 10**12, "'d_sae' must be a positive integer of at most"),
    ("d_model", 10**9, "'d_model' must be a positive integer of at most"),
])
def test_huge_sizes_in_a_config_are_refused_before_allocation(tmp_path: Path, field: str, value: int,
                                                              message: str) -> None:
    folder = saved(tmp_path)
    edit_config(folder, **{field: value})
    for read in (lambda: describe(folder), lambda: Transcoder.from_pretrained(folder),
                 lambda: Transcoder.from_pretrained(folder, lazy=True)):
        with pytest.raises(ArtifactError, match=message):
            read()


def test_sizes_that_disagree_with_the_files_are_refused_by_info(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    edit_config(folder, d_sae=1024)  # within bounds, but the files hold 16 features
    with pytest.raises(ArtifactError, match=r"shape \(16, 8\), expected \(1024, 8\)"):
        describe(folder)


# 2. YAML alias expansion ------------------------------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]  # 10^7 leaves
    meta = (folder / "config.yaml").read_text() + "bomb:\n" + "\n".join("  " + line for line in lines) + "\n"
    (folder / "config.yaml").write_text(meta)
    assert len(meta) < 4000
    with pytest.raises(ArtifactError, match="aliases .* are not allowed"):
        describe(folder)


def test_a_config_file_too_big_to_be_one_is_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    (folder / "config.yaml").write_text("model_kind: cross_layer_transcoder\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(ArtifactError, match="a config file is at most"):
        describe(folder)


# 3. model cards carry no code, HTML or links from config fields -------------------------------------------------
def test_model_card_fields_cannot_write_code_or_html(tmp_path: Path) -> None:
    evil = 'x", scan="y"); __import__("os").system("id"); ("'
    model = random_transcoder("clt", model_name=evil, dataset_path="<img src=x onerror=alert(1)> [a](http://e)",
                              metrics={"n|mse": 1.0, "note": "`rm -rf /`"})
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    code = "\n".join(block.split("```")[0] for block in card.split("```python")[1:])
    assert "system" not in code and "__import__" not in code
    assert 'scan="clt-hub"' in code  # the model name was not an identifier, so the snippet does not use it
    assert "<img" not in card and "&lt;img" in card and "[a](http" not in card  # escaped: \\[a\\](http
    assert "base_model" not in yaml.safe_load(card.split("---")[1])
    rows = [line for line in card.splitlines() if line.startswith("| ") and ("1 |" in line or "rm -rf" in line)]
    assert rows and all(line.replace("\\|", "").count("|") == 4 for line in rows)
    assert "`rm -rf /`" not in card


# 4. integer decoders and mixed dtypes -----------------------------------------------------------------------------
def test_integer_decoders_are_refused_eagerly_and_lazily(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    path = folder / "W_dec_0.safetensors"
    save_file({"W_dec_0": torch.ones(16, 3, 8, dtype=torch.int32)}, str(path))
    with pytest.raises(ArtifactError, match="int32 is not a float type"):
        Transcoder.from_pretrained(folder)
    with pytest.raises(ArtifactError, match="dtype I32; weights must be a float type"):
        Transcoder.from_pretrained(folder, lazy=True)


def test_mixed_dtypes_are_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    from safetensors.torch import load_file

    enc = load_file(str(folder / "W_enc_1.safetensors"))
    save_file({k: v.half() for k, v in enc.items()}, str(folder / "W_enc_1.safetensors"))
    for lazy in (False, True):
        with pytest.raises(ArtifactError, match="mixes dtypes: float16 .*float32"):
            Transcoder.from_pretrained(folder, lazy=lazy)


# 5. malformed safetensors headers and config files ---------------------------------------------------------------
def _raw_safetensors(path: Path, header: object, data: bytes = b"\0" * 64) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(("header", "message"), [
    (["not", "an", "object"], "header is a JSON list"),
    ({"W_dec_0": {"dtype": "F32", "shape": [16, 3, 8]}}, "data_offsets None, not two integers"),
    ({"W_dec_0": {"dtype": "F32", "shape": [16, 3, 8], "data_offsets": ["0", "64"]}}, "not two integers"),
    ({"W_dec_0": {"dtype": "F32", "shape": [-1, 3, 8], "data_offsets": [0, 64]}}, "not a list of non-negative"),
    ({"W_dec_0": {"dtype": "F32", "shape": [16, 3, 8], "data_offsets": [0, 10**12]}}, "the file is truncated"),
    ({"W_dec_0": {"dtype": "F32", "shape": [16, 3, 8], "data_offsets": [0, 64]}}, "holds 64 bytes but its shape"),
    ({"W_dec_0": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype 'Q9'"),
    ({"W_dec_0": "nonsense"}, "is not an object"),
])
def test_malformed_safetensors_headers(tmp_path: Path, header: object, message: str) -> None:
    folder = saved(tmp_path)
    _raw_safetensors(folder / "W_dec_0.safetensors", header)
    for lazy in (False, True):
        with pytest.raises(ArtifactError, match=message):
            Transcoder.from_pretrained(folder, lazy=lazy)
    with pytest.raises(ArtifactError, match=message):
        describe(folder)


def test_a_folder_where_a_file_belongs(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    (folder / "W_dec_1.safetensors").unlink()
    (folder / "W_dec_1.safetensors").mkdir()
    with pytest.raises(ArtifactError, match="is a folder where a safetensors file belongs"):
        Transcoder.from_pretrained(folder)
    other = saved(tmp_path, "other")
    (other / "config.yaml").unlink()
    (other / "config.yaml").mkdir()
    with pytest.raises(ArtifactError, match="is a folder where a file belongs"):
        describe(other)


def test_a_config_that_is_not_utf8(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    (folder / "config.yaml").write_bytes("model_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ArtifactError, match="not UTF-8 text"):
        describe(folder)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("prepend_bos", "false", "'prepend_bos' must be true or false"),
    ("model_name", 123, "'model_name' must be a string"),
    ("feature_input_hook", {"a": 1}, "'feature_input_hook' must be a hook name"),
    ("skip", "no", "'skip' must be true or false"),
    ("metrics", {"fvu": [1, 2]}, "'metrics' must map names to numbers"),
    ("context_size", -5, "'context_size' must be a positive integer"),
])
def test_config_values_of_the_wrong_type(tmp_path: Path, field: str, value: object, message: str) -> None:
    folder = saved(tmp_path)
    edit_config(folder, **{field: value})
    with pytest.raises(ArtifactError, match=message):
        Transcoder.from_pretrained(folder)


def _third_party(tmp_path: Path, layout: str) -> Path:
    """A PLT as another tool publishes it: SAE-Lens or circuit-tracer files, no clt_hub section."""
    folder = tmp_path / layout
    random_transcoder("plt").save_pretrained(folder, layout=layout)
    for cfg in folder.rglob("cfg.json"):
        data = json.loads(cfg.read_text())
        (data.get("metadata") or {}).pop("clt_hub", None)
        cfg.write_text(json.dumps(data))
    for cfg in folder.rglob("config.yaml"):
        data = yaml.safe_load(cfg.read_text())
        data.pop("clt_hub", None)
        cfg.write_text(yaml.safe_dump(data))
    return folder


@pytest.mark.parametrize(("layout", "field", "value", "message"), [
    ("sae-lens", "prepend_bos", "false", "field 'prepend_bos' must be a bool, got 'false'"),
    ("sae-lens", "model_name", 123, "field 'model_name' must be a str"),
    ("sae-lens", "hook_name", {"a": 1}, "field 'hook_name' must be a str"),
    ("sae-lens", "context_size", "128", "field 'context_size' must be a int"),
    ("circuit-tracer", "model_name", 123, "field 'model_name' must be a str"),
    ("circuit-tracer", "feature_input_hook", {"a": 1}, "field 'feature_input_hook' must be a str"),
])
def test_third_party_config_values_of_the_wrong_type(tmp_path: Path, layout: str, field: str, value: object,
                                                     message: str) -> None:
    """Without clt_hub's own section the layout's fields are read directly; a wrong type is an error, never
    a silent conversion (bool("false") is True)."""
    folder = _third_party(tmp_path, layout)
    Transcoder.from_pretrained(folder)  # the untouched folder loads
    for cfg in folder.rglob("cfg.json"):
        data = json.loads(cfg.read_text())
        data["metadata"][field] = value
        cfg.write_text(json.dumps(data))
    for cfg in folder.rglob("config.yaml"):
        data = yaml.safe_load(cfg.read_text())
        data[field] = value
        cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match=message):
        Transcoder.from_pretrained(folder)


# 9. graph files, and model weights that are pickles ---------------------------------------------------------------
GOOD_NODES = [{"node_id": "a"}, {"node_id": "b"}]


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2, 3], "the top level is a JSON list"),
    ({"metadata": {}, "nodes": {}, "links": []}, "'nodes' must be a JSON array"),
    ({"metadata": {}, "nodes": [{"id": "a"}], "links": []}, "node 0 has no string node_id"),
    ({"metadata": {}, "nodes": GOOD_NODES, "links": [{"source": "a"}]}, "link 0 needs source, target and weight"),
    ({"metadata": {}, "nodes": GOOD_NODES, "links": [{"source": "a", "target": "b", "weight": "x"}]},
     "not a finite number"),
    ({"metadata": {}, "nodes": GOOD_NODES, "links": [{"source": "a", "target": "b", "weight": math.nan}]},
     "not a finite number"),
    ({"metadata": {}, "nodes": GOOD_NODES, "links": [{"source": ["a"], "target": "b", "weight": 1}]},
     "names an unknown node"),
    ({"metadata": {}, "nodes": GOOD_NODES, "links": [], "qParams": {"supernodes": "x"}}, "qParams.supernodes"),
])
def test_malformed_graph_files(tmp_path: Path, data: object, message: str) -> None:
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        load_graph(path)


def test_a_deeply_nested_graph_file(tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ArtifactError, match="cannot read graph JSON"):
        load_graph(path)


def test_a_model_whose_weights_are_a_pickle_is_refused(tmp_path: Path) -> None:
    from tiny_models import tiny_model

    from clt_hub.models.loading import load_model

    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")  # a pickle, as old checkpoints are
    with pytest.raises(ConfigError, match="no .safetensors weights .*never pickles"):
        load_model(str(tmp_path / "m"), local_files_only=True)


# the hostile configs, served by a Hub, read under a memory limit ----------------------------------------------------
def _hostile_repos(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    repos = {}
    for name, field, value in (("layers", "n_layers", 10**9), ("features", "d_sae", 10**12)):
        folder = saved(tmp_path, name)
        edit_config(folder, **{field: value})
        hub.add_folder(f"evil/{name}", folder)
        repos[f"evil/{name}"] = "at most"
    bomb = saved(tmp_path, "bomb")
    chain = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    chain += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    (bomb / "config.yaml").write_text((bomb / "config.yaml").read_text() + "bomb:\n"
                                      + "\n".join("  " + c for c in chain) + "\n")
    hub.add_folder("evil/bomb", bomb)
    repos["evil/bomb"] = "aliases"
    return repos


def test_hostile_hub_repos_stay_under_a_memory_bound(hub: FakeHub, tmp_path: Path) -> None:
    """`clt-hub info` on each hostile repo, in a process that may not use more than 3 GiB."""
    limit = 3 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    for repo, expected in _hostile_repos(hub, tmp_path).items():
        done = subprocess.run([sys.executable, "-m", "clt_hub.cli", "info", repo, "--cache-dir", str(tmp_path / "c")],
                              capture_output=True, text=True, preexec_fn=cap, timeout=120, cwd=ROOT,
                              env={**os.environ, "COLUMNS": "300"})
        output = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 1, output
        assert expected in output and "Traceback" not in output and "MemoryError" not in output, output


@pytest.mark.parametrize("entry", ["/etc/passwd", "../secret.safetensors", "layer_0/../../secret.safetensors",
                                   "..\\secret.safetensors", "C:secret.safetensors", ""])
def test_a_transcoder_set_may_list_only_its_own_files(tmp_path: Path, entry: str) -> None:
    """circuit-tracer's transcoder_set config lists its layer files; an entry that leaves the folder (what a
    hostile Hub repo would write, to read the machine's files through the Space) is refused by name, before any
    file is opened, and the error shows nothing of any file's content."""
    folder = tmp_path / "set"
    random_transcoder("plt").save_pretrained(folder, layout="circuit-tracer")
    (tmp_path / "secret.safetensors").write_bytes(b"TOPSECRET" * 64)
    meta = yaml.safe_load((folder / "config.yaml").read_text())
    meta["transcoders"] = [entry, "layer_1.safetensors", "layer_2.safetensors"]
    (folder / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ArtifactError, match="is not a relative path inside .*an artifact may only list its own") as e:
        Transcoder.from_pretrained(folder)
    assert "TOPSECRET" not in str(e.value)
    meta["transcoders"] = ["layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]
    (folder / "config.yaml").write_text(yaml.safe_dump(meta))
    Transcoder.from_pretrained(folder)  # its own files, listed, load


def test_a_bad_header_error_shows_none_of_the_files_bytes(tmp_path: Path) -> None:
    """A safetensors header's length is the file's first 8 bytes: an error must not print it (on a text file
    that would be its first 8 characters, as a number)."""
    folder = saved(tmp_path)
    target = folder / "W_enc_0.safetensors"
    target.write_bytes(b"TOPSECRE" + b"rest of a text file")
    with pytest.raises(ArtifactError, match="header length does not fit") as e:
        Transcoder.from_pretrained(folder)
    assert str(struct.unpack("<Q", b"TOPSECRE")[0]) not in str(e.value) and "TOPSECRE" not in str(e.value)


@pytest.mark.parametrize("template", ["model.layers.{layer:>900000000}.mlp", "{layer!r}", "{0}", "{layer.__class__}",
                                      "model.layers.{layer}}", "model layers", "x" * 200 + "{"])
def test_hook_templates_follow_a_grammar_and_are_never_formatted(tmp_path: Path, template: str) -> None:
    """hf_hook_name* are module paths with {layer} placeholders; a format spec in one (issue 37: `{layer:>900000000}`
    made `clt-hub convert` write 3.4 GB) or any other brace is refused by name when the artifact is read."""
    folder = saved(tmp_path)
    edit_config(folder, hf_hook_name=template)
    with pytest.raises(ArtifactError, match="'hf_hook_name' must be a module path .* its only placeholder"):
        Transcoder.from_pretrained(folder)


def test_a_good_hook_template_is_written_per_layer(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    edit_config(folder, hf_hook_name="model.layers.{layer}.post_attention_layernorm:input",
                hf_hook_name_out="model.layers.{layer}.mlp")
    Transcoder.from_pretrained(folder).save_pretrained(tmp_path / "out", layout="sae-lens")
    cfg = json.loads((tmp_path / "out" / "layer_2" / "cfg.json").read_text())
    hooks = json.dumps(cfg)
    assert "model.layers.2.post_attention_layernorm:input" in hooks and "model.layers.2.mlp" in hooks


def test_lazy_decoders_refuse_nan_rows_as_eager_loading_does(tmp_path: Path) -> None:
    """Eager loading checks every tensor is finite; lazy loading reads rows on demand, so it checks each row it
    reads: a NaN decoder row is an ArtifactError naming the file, tensor and row, not a graph that later reports
    a misleading 'cycle'."""
    from safetensors.torch import load_file

    folder = saved(tmp_path)
    path = folder / "W_dec_1.safetensors"
    tensors = load_file(str(path))
    tensors["W_dec_1"][5, 0, 0] = math.nan
    save_file(tensors, str(path))
    with pytest.raises(ArtifactError, match="not finite|NaN"):
        Transcoder.from_pretrained(folder)
    lazy = Transcoder.from_pretrained(folder, lazy=True)
    assert lazy.decoder_rows(1, torch.tensor([2, 3])).isfinite().all()  # the other rows still read
    with pytest.raises(ArtifactError, match=r"W_dec_1.safetensors: tensor 'W_dec_1' has NaN or infinite values in "
                                            r"row\(s\) \[5\]"):
        lazy.decoder_rows(1, torch.tensor([3, 5]))
