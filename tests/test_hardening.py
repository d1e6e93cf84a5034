"""Hostile or broken artifacts and graph files, each probed as an attacker or a careless user would: one
clear error that names the problem, no memory exhaustion, no code in model cards, nothing unpickled."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import random_transcoder
from hubserver import FakeHub
from safetensors.torch import save_file

from clt_hub import ArtifactError, ConfigError, Transcoder
from clt_hub.artifacts.hub import describe
from clt_hub.attribution.graph_json import load as load_graph
from clt_hub.circuits import load_jsonl

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
    with pytest.raises(ArtifactError, match=r"graph.json: not valid JSON \(arrays and objects nested more than 64"):
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


# one YAML/JSON loader for every file (issue 37): no aliases, a size cap before reading, a nesting cap --------------
DEEP = 100_000
ALIAS_BOMB = "\n".join(['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
                       + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]) + "\n"


def _registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | bytes) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    monkeypatch.setenv("CLT_HUB_REGISTRY", str(path))
    return path


def _task_file(tmp_path: Path, bad_line: str) -> Path:
    good = json.dumps({"clean": "a b", "corrupted": "c b", "answer": "a", "wrong": "c"})
    path = tmp_path / "task.jsonl"
    path.write_text(f"{good}\n{bad_line}\n{good}\n")
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_a_yaml_alias_bomb_is_refused_at_once_in_every_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 698-byte bomb of issue 37 (here 10^9 leaves) in a registry, an artifact's config.yaml and a --set value:
    refused at its first alias, naming the file and line, in well under a second (expanded, it takes gigabytes)."""
    from clt_hub.artifacts.registry import entries
    from clt_hub.config import parse_yaml

    assert len(ALIAS_BOMB) < 1000
    folder = saved(tmp_path)
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + "bomb:\n"
                                        + "".join("  " + line + "\n" for line in ALIAS_BOMB.splitlines()))
    reg = _registry(tmp_path, monkeypatch, "bomb:\n  repo_id: org/x\n" + ALIAS_BOMB)
    for read, error, where in ((entries, ConfigError, reg), (lambda: describe(folder), ArtifactError, "config.yaml"),
                               (lambda: parse_yaml(ALIAS_BOMB, "--set seed"), ConfigError, "--set seed")):
        start = time.perf_counter()
        with pytest.raises(error, match=re.escape(str(where)) + r": YAML aliases \(\*name\) are not allowed .*\(line \d+, "
                                        r"column \d+\): write each value out in full; ") as e:
            read()
        assert time.perf_counter() - start < 5
        _one_line(e.value)


def test_a_yaml_alias_bomb_in_a_training_config_is_refused(tmp_path: Path) -> None:
    from clt_hub.training.config import read_config_file

    path = tmp_path / "run.yaml"
    path.write_text("model: gpt2\n" + ALIAS_BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="run.yaml: YAML aliases"):
        read_config_file(path)
    assert time.perf_counter() - start < 5


def test_deep_nesting_is_one_clear_line_in_every_file_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 nested brackets (Python's parsers recurse: RecursionError tracebacks before) in a task line, an
    artifact's config.yaml and cfg.json, a registry and a cache manifest: one error line each, by name."""
    from clt_hub.artifacts.registry import entries
    from clt_hub.training.activation_store import ActivationCache

    deep_json, deep_yaml = "[" * DEEP + "]" * DEEP, "x: " + "[" * DEEP + "]" * DEEP + "\n"
    clt = saved(tmp_path)
    (clt / "config.yaml").write_text((clt / "config.yaml").read_text() + deep_yaml)
    sae = tmp_path / "sae"
    random_transcoder("plt").save_pretrained(sae, layout="sae-lens")
    (sae / "layer_1" / "cfg.json").write_text(f'{{"d_in": {deep_json}}}')
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(f'{{"shards": {deep_json}}}')
    reg = _registry(tmp_path, monkeypatch, "deep:\n  repo_id: org/x\n  description: " + deep_yaml[3:])
    json_deep, yaml_deep = r"not valid JSON \(arrays and objects nested more than 64 levels deep\); ", \
        r"lists and mappings nested more than 64 levels deep \(line \d+, column \d+\); "
    cases = [
        (lambda: load_jsonl(_task_file(tmp_path, deep_json)), ConfigError, "task.jsonl:2: " + json_deep),
        (lambda: describe(clt), ArtifactError, "config.yaml: " + yaml_deep + "fix or re-download the file"),
        (lambda: Transcoder.from_pretrained(sae), ArtifactError, "cfg.json: " + json_deep + "fix or re-download"),
        (lambda: ActivationCache(tmp_path / "cache"), ConfigError, "manifest.json: " + json_deep + "delete "),
        (entries, ConfigError, re.escape(str(reg)) + ": " + yaml_deep + "fix the file or move it away"),
    ]
    for read, error, message in cases:
        with pytest.raises(error, match=message) as e:
            read()
        _one_line(e.value)
    # the same line through the CLI, exit 1, no traceback
    done = subprocess.run([sys.executable, "-m", "clt_hub.cli", "list"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "COLUMNS": "300", "CLT_HUB_REGISTRY": str(reg)})
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "Traceback" not in output and "nested more than 64 levels deep" in output, output


def test_nesting_beyond_the_cap_but_within_pythons_reach_is_refused_too(tmp_path: Path) -> None:
    """200 levels: Python's json parses it (no RecursionError), so only the loader's own cap refuses it; a
    record's nested metadata is a bad record of a text dataset, named by file and line, or skipped and counted."""
    from clt_hub.texts import BadRecordError, SkippedRecords, iter_texts

    nested = "[" * 200 + "]" * 200
    with pytest.raises(ConfigError, match=r"task.jsonl:2: not valid JSON \(arrays and objects nested more than 64"):
        load_jsonl(_task_file(tmp_path, f'{{"clean": "a b", "corrupted": "c b", "answer": "a", "wrong": {nested}}}'))
    data = tmp_path / "texts.jsonl"
    data.write_text(f'{{"text": "ok"}}\n{{"text": "deep", "meta": {nested}}}\n')
    with pytest.raises(BadRecordError, match=re.escape(f"{data}:2") + " is not valid JSON .*nested more than 64"):
        list(iter_texts(data))
    skipped = SkippedRecords()
    assert list(iter_texts(data, bad_records="skip", skipped=skipped)) == ["ok"] and skipped.count == 1
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps({"metadata": {"x": json.loads(nested)}, "nodes": [], "links": []}))
    with pytest.raises(ArtifactError, match="nested more than 64 levels deep"):
        load_graph(graph)
    graph.write_text(json.dumps({"metadata": {"x": json.loads("[" * 60 + "]" * 60)}, "nodes": [], "links": []}))
    load_graph(graph)  # within the cap: read


def test_an_oversized_file_is_refused_by_name_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse files of NUL bytes, four times each cap: refused by their size alone (were they read or parsed, the
    error would be about NUL characters, after reading it all), fast and in little memory."""
    from clt_hub.artifacts.registry import entries
    from clt_hub.models.loading import load_model
    from clt_hub.training.activation_store import ActivationCache

    def sparse(path: Path, size: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.truncate(size)
        return path

    config_cap, file_cap = 1 << 20, 16 << 20  # clt_hub.config's MAX_CONFIG_BYTES and MAX_FILE_BYTES
    sae = tmp_path / "sae"
    random_transcoder("plt").save_pretrained(sae, layout="sae-lens")
    reg = sparse(_registry(tmp_path, monkeypatch, ""), 4 * config_cap)
    cfg = sparse(sae / "layer_1" / "cfg.json", 4 * config_cap)
    manifest = sparse(tmp_path / "cache" / "manifest.json", 4 * file_cap)
    config_json = sparse(tmp_path / "model" / "config.json", 4 * file_cap)
    cases = [
        (entries, ConfigError, reg, f"a registry file is at most {config_cap:,}"),
        (lambda: Transcoder.from_pretrained(sae), ArtifactError, cfg, f"a config file is at most {config_cap:,}"),
        (lambda: ActivationCache(tmp_path / "cache"), ConfigError, manifest,
         f"a cache manifest is at most {file_cap:,}"),
        (lambda: load_model(str(tmp_path / "model"), local_files_only=True), ConfigError, config_json,
         f"a model config is at most {file_cap:,}"),
    ]
    for read, error, path, message in cases:
        start = time.perf_counter()
        with pytest.raises(error, match=re.escape(f"{path}: {path.stat().st_size:,} bytes; {message}; ")) as e:
            read()
        assert time.perf_counter() - start < 5
        _one_line(e.value)


@pytest.mark.parametrize(("where", "text", "message"), [
    ("config.yaml", "when: 2024-02-30\n", r"not valid YAML \(a value cannot be read: day is out of range"),
    ("config.yaml", "when: !!timestamp soon\n", r"not valid YAML \(a value cannot be read"),
    ("config.yaml", "n: " + "7" * 5000 + "\n", r"not valid YAML \(a value cannot be read: Exceeds the limit"),
    ("config.yaml", "n: !!int seven\n", r"not valid YAML \(a value cannot be read: invalid literal"),
    ("task.jsonl", '{"clean": ' + "7" * 5000 + "}", r"task.jsonl:2: not valid JSON \(Exceeds the limit"),
])
def test_values_python_cannot_build_are_one_clear_line(tmp_path: Path, where: str, text: str, message: str) -> None:
    """YAML's safe constructors and json raise bare ValueError/AttributeError on an impossible date, a bad tag or an
    integer of more than 4,300 digits: each is one error naming the file."""
    if where == "config.yaml":
        folder = saved(tmp_path)
        (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + text)
        with pytest.raises(ArtifactError, match="config.yaml: " + message) as e:
            describe(folder)
    else:
        with pytest.raises(ConfigError, match=message) as e:
            load_jsonl(_task_file(tmp_path, text))
    _one_line(e.value)


def _model_folder(tmp_path: Path) -> Path:
    from test_trace_cli import word_tokenizer
    from tiny_models import tiny_model

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_a_model_folder_missing_weights_is_refused_naming_them(tmp_path: Path) -> None:
    """transformers fills missing tensors with random values and goes on; clt_hub refuses, by name."""
    from safetensors.torch import load_file

    from clt_hub.models.loading import load_model

    folder = _model_folder(tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"1 weight\(s\) missing: model\.layers\.1\.mlp\.down_proj\.weight") as e:
        load_model(str(folder))
    _one_line(e.value)


def test_a_model_config_that_disagrees_with_its_weights_is_refused_naming_them(tmp_path: Path) -> None:
    from clt_hub.models.loading import load_model

    folder = _model_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48  # the weights hold 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"9 weight\(s\) in another shape than its config says: "
                                            r"model\.layers\.0\.mlp\.down_proj\.weight") as e:
        load_model(str(folder))
    _one_line(e.value)


# 10. writing metrics touches only clt_hub's own files, in the folder's own layout (issue 37) ----------------------
@pytest.fixture(scope="module")
def eval_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from helpers import word_lines
    from test_trace_cli import word_tokenizer
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("eval")
    tiny_model("gpt2", n_layers=3, d_model=32).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "heldout.txt").write_text("\n".join(word_lines(40)) + "\n")
    return root / "model", root / "heldout.txt"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _artifact_for_metrics(tmp_path: Path, case: str) -> Path:
    """`plain-<layout>`: a PLT as SAE-Lens or circuit-tracer publish it (no file of clt_hub's: no manifest, no
    model card, no clt_hub sections); the others saved by clt_hub. Each with files of the user's own."""
    folder = tmp_path / case
    if case.startswith("plain-"):
        random_transcoder("plt", n_layers=3, d_model=32, d_sae=16, seed=2).save_pretrained(
            folder, layout=case.removeprefix("plain-"))
        (folder / "cfg.json").unlink()
        (folder / "README.md").unlink()
        for cfg in folder.rglob("cfg.json"):
            data = json.loads(cfg.read_text())
            data["metadata"].pop("clt_hub")
            cfg.write_text(json.dumps(data, indent=1))
        for cfg in folder.rglob("config.yaml"):
            data = yaml.safe_load(cfg.read_text())
            data.pop("clt_hub")
            cfg.write_text(yaml.safe_dump(data))
    else:  # native-clt, native-plt, or sae-lens-clt: a CLT that clt_hub saved in SAE-Lens's layout
        kind, layout = ("clt", "sae-lens") if case == "sae-lens-clt" else (case.removeprefix("native-"), "native")
        random_transcoder(kind, n_layers=3, d_model=32, d_sae=16, seed=2,
                          metrics={"train_tokens": 6144}).save_pretrained(folder, layout=layout)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "labels.json").write_text('{"0": "a feature I labelled"}\n')
    return folder


@pytest.mark.parametrize("case", ["plain-sae-lens", "plain-circuit-tracer", "native-clt", "native-plt", "sae-lens-clt"])
def test_write_metrics_touches_only_clt_hubs_own_files_in_the_folders_layout(
        eval_model: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    """`clt-hub eval --write-metrics` used to re-save the whole folder (save_pretrained): a SAE-Lens folder lost
    the user's notes and labels and came back in clt_hub's native layout. Now the user's files and the weights
    stay byte for byte; only clt_hub's own files change (its sections of cfg.json / config.yaml and its model
    card) or, where clt_hub owns no file, one sidecar is added; the metrics load back either way."""
    from typer.testing import CliRunner

    from clt_hub.artifacts.layouts import detect
    from clt_hub.cli import app

    model, heldout = eval_model
    folder = _artifact_for_metrics(tmp_path, case)
    layout, before = detect(folder), _files(folder)
    result = CliRunner().invoke(app, ["eval", str(model), str(folder), "--dataset", str(heldout), "--n-tokens", "300",
                                      "--context-size", "32", "--write-metrics", "--offline"])
    assert result.exit_code == 0, result.output
    after = _files(folder)
    assert detect(folder) == layout
    assert set(before) <= set(after), f"deleted: {sorted(set(before) - set(after))}"
    assert after["notes.txt"] == before["notes.txt"] and after["labels.json"] == before["labels.json"]
    assert all(after[k] == v for k, v in before.items() if k.endswith(".safetensors"))
    changed = sorted(k for k in after if before.get(k) != after[k])
    if case.startswith("plain-"):
        assert changed == ["clt_hub_metrics.json"]
    else:
        assert set(after) == set(before)  # no sidecar, no temporary file left
        assert "README.md" in changed and {Path(k).name for k in changed} <= {"cfg.json", "config.yaml", "README.md"}
        assert "## Metrics" in after["README.md"].decode() and "ce_recovered" in after["README.md"].decode()
    metrics = Transcoder.from_pretrained(folder).cfg.metrics
    assert metrics["eval_tokens"] >= 300 and 0 <= metrics["next_token_agreement"] <= 1
    assert metrics.get("train_tokens") == (None if case.startswith("plain-") else 6144)  # earlier metrics kept
    assert describe(folder)["metrics"] == metrics


# 11. a manifest (cfg.json) that disagrees with config.yaml ---------------------------------------------------------
def _edit_manifest(folder: Path, edit: object) -> None:
    manifest = json.loads((folder / "cfg.json").read_text())
    edit(manifest)  # type: ignore[operator]
    (folder / "cfg.json").write_text(json.dumps(manifest, indent=2))


def test_a_manifest_that_disagrees_with_config_yaml_is_named(tmp_path: Path) -> None:
    """clt_hub reads config.yaml and used to ignore the SAE-Lens-style cfg.json beside it, whatever it said. Now a
    field that differs is a warning naming both files and the field; a different transcoder (shapes, kind,
    activation) is refused, saying which file the weights match."""
    import warnings

    folder = saved(tmp_path, model_name="org/model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Transcoder.from_pretrained(folder)  # a folder as clt_hub saved it: no warning
    _edit_manifest(folder, lambda m: m["metadata"].update(model_name="org/other"))
    with pytest.warns(UserWarning, match=r"cfg\.json and .*config\.yaml disagree \(model_name: 'org/other' in "
                                         r"cfg\.json, 'org/model' in config\.yaml\); clt_hub uses config\.yaml"):
        assert Transcoder.from_pretrained(folder).cfg.model_name == "org/model"
    for edit, message in [
        (lambda m: m.update(d_sae=32), r"d_sae: 32 in cfg\.json, 16 in config\.yaml"),
        (lambda m: m["metadata"]["clt_hub"]["config"].update(n_layers=4), r"n_layers: 4 in cfg\.json, 3 in config"),
        (lambda m: m["clt_hub"].update(kind="plt"), r"kind: 'plt' in cfg\.json, 'clt' in config\.yaml"),
    ]:
        random_transcoder("clt", model_name="org/model").save_pretrained(folder)
        _edit_manifest(folder, edit)
        for read in (lambda: Transcoder.from_pretrained(folder), lambda: describe(folder)):
            with pytest.raises(ArtifactError, match=r"cfg\.json and .*config\.yaml describe different transcoders \("
                               + message + r".*the weights match config\.yaml") as e:
                read()
            _one_line(e.value)
    # circuit-tracer's own config.yaml (no clt_hub section: shapes come from the weights) is compared too
    folder = tmp_path / "ct"
    random_transcoder("plt").save_pretrained(folder, layout="circuit-tracer")
    meta = yaml.safe_load((folder / "config.yaml").read_text())
    del meta["clt_hub"]
    (folder / "config.yaml").write_text(yaml.safe_dump(meta))
    Transcoder.from_pretrained(folder)
    _edit_manifest(folder, lambda m: m.update(d_in=12))
    with pytest.raises(ArtifactError, match=r"d_model: 12 in cfg\.json, 8 in config\.yaml"):
        Transcoder.from_pretrained(folder)


def test_a_saelens_layer_whose_cfg_json_disagrees_is_named(tmp_path: Path) -> None:
    """A SAE-Lens set's config came from layer 0's cfg.json alone: a layer whose cfg.json said another d_sae,
    d_in, hook or architecture (and the top-level manifest clt_hub writes beside them) loaded silently with layer
    0's. Now every layer's cfg.json is compared with layer 0's: a different transcoder is refused naming both
    files and the field, any other difference is a warning; weights that disagree were already refused by name."""
    import shutil
    import warnings

    def plt_set(name: str, plain: bool, d_sae: int = 16) -> Path:
        folder = tmp_path / name
        random_transcoder("plt", n_layers=3, d_model=8, d_sae=d_sae, activation="jumprelu",
                          model_name="org/model").save_pretrained(folder)
        if plain:  # as SAE-Lens or another tool writes a set: no clt_hub metadata, no files at the top
            for path in [*folder.iterdir()]:
                if path.is_file():
                    path.unlink()
            for layer in range(3):
                edit_layer(folder, layer, lambda c: c["metadata"].pop("clt_hub"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Transcoder.from_pretrained(folder)  # a set as written: no warning
        return folder

    def edit_layer(folder: Path, layer: int, edit: object) -> None:
        path = folder / f"layer_{layer}" / "cfg.json"
        c = json.loads(path.read_text())
        edit(c)  # type: ignore[operator]
        path.write_text(json.dumps(c))

    refused = {
        "d_sae": (1, lambda c: c.update(d_sae=32), r"d_sae: 32 in layer_1/cfg\.json, 16 in layer_0/cfg\.json"),
        "d_in": (1, lambda c: c.update(d_in=12, d_out=12), r"d_in: 12 in layer_1/cfg\.json, 8 in layer_0/cfg\.json"),
        "hook": (2, lambda c: c["metadata"].update(hook_name="blocks.2.hook_resid_pre"),
                 r"metadata\.hook_name: 'blocks\.2\.hook_resid_pre' in layer_2/cfg\.json, "
                 r"'blocks\.0\.hook_resid_mid' in layer_0/cfg\.json"),
        "another layer's hook": (2, lambda c: c["metadata"].update(hook_name_out="blocks.1.hook_mlp_out"),
                                 r"metadata\.hook_name_out: 'blocks\.1\.hook_mlp_out' in layer_2/cfg\.json, "
                                 r"'blocks\.0\.hook_mlp_out' in layer_0"),
        "architecture": (1, lambda c: c.update(architecture="transcoder"),
                         r"architecture: 'transcoder' in layer_1/cfg\.json, 'jumprelu_transcoder' in layer_0"),
    }
    for plain in (False, True):
        for name, (layer, edit, message) in refused.items():
            folder = plt_set(f"{name}-{plain}", plain)
            edit_layer(folder, layer, edit)
            for read in (Transcoder.from_pretrained, describe):
                with pytest.raises(ArtifactError, match=rf"layer_{layer}/cfg\.json and layer_0/cfg\.json describe "
                                   rf"different transcoders \({message}.*\); the weights in layer_{layer} have d_in 8, "
                                   r"d_sae 16; every layer of a set") as e:
                    read(folder)
                _one_line(e.value)
        folder = plt_set(f"name-{plain}", plain)
        edit_layer(folder, 1, lambda c: c["metadata"].update(model_name="org/other"))
        with pytest.warns(UserWarning, match=r"layer_1/cfg\.json and layer_0/cfg\.json disagree \(metadata\.model_name: "
                                             r"'org/other' in layer_1/cfg\.json, 'org/model' in layer_0/cfg\.json\)"):
            assert Transcoder.from_pretrained(folder).cfg.model_name == "org/model"

    # a layer taken whole (weights and cfg.json) from a set of another width: its cfg.json is named, not a shape
    wide = plt_set("wide", plain=False, d_sae=32)
    folder = plt_set("mixed", plain=False)
    shutil.rmtree(folder / "layer_1")
    shutil.copytree(wide / "layer_1", folder / "layer_1")
    with pytest.raises(ArtifactError, match=r"d_sae: 32 in layer_1/cfg\.json, 16 in layer_0/cfg\.json.*the weights "
                                            r"in layer_1 have d_in 8, d_sae 32"):
        Transcoder.from_pretrained(folder)
    # weights alone from that set (every cfg.json agrees): refused naming the weights file and the tensor
    folder = plt_set("mixed-weights", plain=False)
    shutil.copy(wide / "layer_1" / "sae_weights.safetensors", folder / "layer_1" / "sae_weights.safetensors")
    with pytest.raises(ArtifactError, match=r"layer_1/sae_weights\.safetensors:W_enc: shape \(32, 8\), expected "
                                            r"\(16, 8\)"):
        Transcoder.from_pretrained(folder)

    # the manifest clt_hub writes beside a SAE-Lens set is compared with layer 0's cfg.json, as with config.yaml
    for kind in ("plt", "clt"):
        folder = tmp_path / f"manifest-{kind}"
        random_transcoder(kind, model_name="org/model").save_pretrained(folder, layout="sae-lens")
        _edit_manifest(folder, lambda m: m.update(d_sae=32))
        with pytest.raises(ArtifactError, match=r"cfg\.json and .*layer_0/cfg\.json describe different transcoders "
                                                r"\(d_sae: 32 in cfg\.json, 16 in layer_0/cfg\.json\); the weights "
                                                r"match layer_0/cfg\.json"):
            Transcoder.from_pretrained(folder)
        random_transcoder(kind, model_name="org/model").save_pretrained(folder, layout="sae-lens")
        _edit_manifest(folder, lambda m: m["metadata"].update(model_name="org/other"))
        with pytest.warns(UserWarning, match=r"\(model_name: 'org/other' in cfg\.json, 'org/model' in "
                                             r"layer_0/cfg\.json\); clt_hub uses layer_0/cfg\.json's values"):
            Transcoder.from_pretrained(folder)


# 12. scratch folders of interrupted saves -----------------------------------------------------------------------
def test_a_save_removes_scratch_folders_of_interrupted_saves_but_never_a_live_one(tmp_path: Path) -> None:
    """A killed save left `.<name>.partial-*` folders (full-size weights) forever. The next save of the same
    folder removes those whose writer (pid and host in the marker) has ended and that are 10 minutes old, and
    those whose writer cannot be checked after an hour untouched; a running save's folder stays, however old."""
    import socket

    from clt_hub.artifacts.atomic import INCOMPLETE_MARKER, atomic_directory

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    here = socket.gethostname()

    def scratch(name: str, pid: int | None, age_s: float, host: str = here) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "W_dec_0.safetensors").write_bytes(b"x" * 100)
        if pid is not None:
            (folder / INCOMPLETE_MARKER).write_text(f"this folder is an interrupted write\npid={pid}\nhost={host}\n")
        when = time.time() - age_s
        for p in [*folder.iterdir(), folder]:
            os.utime(p, (when, when))
        return folder

    gone = [scratch(".clt.partial-dead1", dead, 20 * 60), scratch(".clt.partial-nomark", None, 2 * 3600),
            scratch(".clt.partial-away1", 1, 2 * 3600, host="another-host"), scratch(".clt.old-1a2b3c4d", None, 2 * 3600)]
    kept = [scratch(".clt.partial-live1", os.getpid(), 5 * 3600),  # its writer runs: never removed
            scratch(".clt.partial-fresh1", dead, 60),  # killed a minute ago: left a while for a look
            scratch(".clt.partial-away2", 1, 20 * 60, host="another-host"),
            scratch(".clt.partial-nomark2", None, 20 * 60),
            scratch(".other.partial-dead2", dead, 2 * 3600),  # another destination's
            scratch(".clt.partial-dead3.extra", dead, 2 * 3600)]  # not a name a save makes
    random_transcoder("clt").save_pretrained(tmp_path / "clt")
    assert [p.name for p in gone if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    Transcoder.from_pretrained(tmp_path / "clt")

    # two saves of one folder at once: neither removes the other's scratch folder, however old it looks
    with pytest.raises(InterruptedError), atomic_directory(tmp_path / "clt") as mine:
        assert f"pid={os.getpid()}\nhost={here}\n" in (mine / INCOMPLETE_MARKER).read_text()
        (mine / "W_dec_0.safetensors").write_bytes(b"x" * 100)  # a slow writer, untouched for hours
        old = time.time() - 5 * 3600
        for p in [*mine.iterdir(), mine]:
            os.utime(p, (old, old))
        random_transcoder("clt", seed=2).save_pretrained(tmp_path / "clt")
        assert (mine / "W_dec_0.safetensors").is_file()
        raise InterruptedError  # the first save fails: its own scratch folder goes with it
    assert not mine.exists()
    assert torch.equal(Transcoder.from_pretrained(tmp_path / "clt").tensors()["W_enc.0"],
                       random_transcoder("clt", seed=2).tensors()["W_enc.0"])
