from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_transcoder
from tiny_models import tiny_model
from typer.testing import CliRunner

from clt_hub.attribution.graph_json import load
from clt_hub.cli import app

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
WORDS = ["<bos>", "<eos>", "<pad>", "<unk>"] + [f"w{i}" for i in range(60)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_model_and_clt(root: Path) -> tuple[Path, Path]:
    """A 3-layer GPT-2 with the word tokenizer in root/model and a CLT for it (threshold 0.5) in root/clt."""
    tiny_model("gpt2", n_layers=3, d_model=32).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder("clt", n_layers=3, d_model=32, d_sae=24, seed=1, model_name="tiny-gpt2")
    with torch.no_grad():
        for t in tc.threshold:
            t.fill_(0.5)
    tc.save_pretrained(root / "clt")
    return root / "model", root / "clt"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_model_and_clt(tmp_path_factory.mktemp("trace"))


def test_trace_cli_writes_graph_and_summary(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    model, clt = artifacts
    result = runner.invoke(app, ["trace", "w1 w2 w3 w4 w5", "--model", str(model), "--transcoder", str(clt), "--supernodes",
                                 "--out", str(tmp_path / "g"), "--offline"])
    assert result.exit_code == 0, result.output
    gf = load(tmp_path / "g" / "graph.json")
    assert gf.metadata["prompt_tokens"] == ["<bos>", "w1", "w2", "w3", "w4", "w5"]
    assert any(n["feature_type"] == "logit" for n in gf.nodes.values())
    for group in gf.qparams["supernodes"]:  # suggested groups name kept feature nodes only
        assert len(group) >= 3 and all(gf.nodes[n]["feature_type"] == "cross layer transcoder" for n in group[1:])
    summary = (tmp_path / "g" / "summary.txt").read_text()
    assert "replacement score" in summary and "strongest path into the top logit" in summary
    assert "targets (weight)" in result.output


def test_trace_cli_errors(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    model, clt = artifacts
    other = random_transcoder("clt", n_layers=2, d_model=32, d_sae=8)
    other.save_pretrained(tmp_path / "other")
    bad = runner.invoke(app, ["trace", "w1 w2", "--model", str(model), "--transcoder", str(tmp_path / "other")])
    assert bad.exit_code == 1 and "n_layers=2" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["trace", "w1", "--model", str(tmp_path / "nope"), "--transcoder", str(clt), "--offline"])
    assert missing.exit_code == 1 and "is not available" in missing.output
    long = runner.invoke(app, ["trace", " ".join(["w1"] * 80), "--model", str(model), "--transcoder", str(clt)])
    assert long.exit_code == 1 and "context is 64" in long.output


def test_intervene_cli(artifacts: tuple[Path, Path]) -> None:
    model, clt = artifacts
    base = ["intervene", "w1 w2 w3 w4 w5", "--model", str(model), "--transcoder", str(clt), "--offline"]
    result = runner.invoke(app, [*base, "--scale", "0:3@2=-5", "--set", "1:4=2.5", "--mode", "open"])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output
    bad = runner.invoke(app, [*base, "--set", "nonsense"])
    assert bad.exit_code == 1 and "LAYER:FEATURE[@POS]=NUMBER" in bad.output
    oob = runner.invoke(app, [*base, "--set", "0:999=1"])
    assert oob.exit_code == 1 and "feature index 999 out of range" in oob.output


def test_trace_cli_custom_targets(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    model, clt = artifacts
    base = ["trace", "w1 w2 w3", "--model", str(model), "--transcoder", str(clt), "--offline", "--out", str(tmp_path)]
    ok = runner.invoke(app, [*base, "--logit-diff", "w7|w9", "--target", "w4", "--max-feature-nodes", "5"])
    assert ok.exit_code == 0, ok.output
    gf = load(tmp_path / "graph.json")
    logit_nodes = [n for n in gf.nodes.values() if n["feature_type"] == "logit"]
    assert sum(n["feature_type"] == "cross layer transcoder" for n in gf.nodes.values()) <= 5
    labels = {n["clerp"].split(" (p=")[0] for n in logit_nodes}
    assert labels == {"Output \"'w4'\"", "Output \"'w7' - 'w9'\""}
    bad = runner.invoke(app, [*base, "--target", "w4 w5"])
    assert bad.exit_code == 1 and "is 2 tokens" in bad.output


def test_supernode_intervention_equals_its_members(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    model, clt = artifacts
    prompt = "w1 w2 w3 w4 w5"
    traced = runner.invoke(app, ["trace", prompt, "--model", str(model), "--transcoder", str(clt), "--supernodes",
                                 "--out", str(tmp_path), "--offline"])
    assert traced.exit_code == 0, traced.output
    import json

    data = json.loads((tmp_path / "graph.json").read_text())
    features = [n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    name, members = "my group", features[:3]  # a user-named supernode of three kept features
    assert len(members) == 3
    data["qParams"]["supernodes"] = [[name, *members]]
    (tmp_path / "graph.json").write_text(json.dumps(data))
    base = ["intervene", prompt, "--model", str(model), "--transcoder", str(clt), "--offline", "--mode", "open"]
    by_name = runner.invoke(app, [*base, "--graph", str(tmp_path / "graph.json"), "--scale-supernode", f"{name}=-3"])
    assert by_name.exit_code == 0, by_name.output
    explicit = []
    for node in members:  # node ids are layer_feature_pos
        layer, feature, pos = node.split("_")
        explicit += ["--scale", f"{layer}:{feature}@{pos}=-3"]
    by_members = runner.invoke(app, [*base, *explicit])
    assert by_members.exit_code == 0, by_members.output
    assert by_name.output == by_members.output
    unknown = runner.invoke(app, [*base, "--graph", str(tmp_path / "graph.json"), "--scale-supernode", "nope=2"])
    assert unknown.exit_code == 1 and "no supernode named 'nope'" in unknown.output
    no_graph = runner.invoke(app, [*base, "--scale-supernode", f"{name}=2"])
    assert no_graph.exit_code == 1 and "--graph" in no_graph.output


def test_trace_cli_contexts(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    model, clt = artifacts
    (tmp_path / "texts.txt").write_text("\n".join(f"w{i} w{i + 3} w{i + 7} w{i + 1}" for i in range(40)))
    result = runner.invoke(app, ["trace", "w1 w2 w3 w4 w5", "--model", str(model), "--transcoder", str(clt),
                                 "--out", str(tmp_path / "g"), "--offline", "--contexts", str(tmp_path / "texts.txt")])
    assert result.exit_code == 0, result.output
    contexts = json.loads((tmp_path / "g" / "contexts.json").read_text())
    nodes = {n["node_id"]: n for n in load(tmp_path / "g" / "graph.json").nodes.values()}
    assert contexts and set(contexts) <= set(nodes)
    with_contexts = [n for n, c in contexts.items() if c]
    assert with_contexts, "no kept feature fired anywhere in 40 texts"
    for node in with_contexts:
        assert "fires on" in nodes[node]["clerp"]
        acts = [c["activation"] for c in contexts[node]]
        assert acts == sorted(acts, reverse=True) and acts[0] > 0
