"""Gemma Scope 2 transcoders (google/gemma-scope-2-*) on synthetic files written in their layout.

No real file was available (no Hub access): the layout is the one circuit-tracer 0.5.0 and SAE-Lens 6.54
read (docs/layouts/gemma_scope_2.md). Every tensor is random, biases and the CLT's unused decoders
(targets before the source layer) included, so nothing passes by luck.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hubserver import FakeHub
from safetensors.torch import load_file, save_file
from test_artifacts import assert_identical

from clt_hub import ArtifactError, Transcoder
from clt_hub.artifacts.hub import describe
from clt_hub.artifacts.layouts import detect
from clt_hub.artifacts.registry import entries
from clt_hub.transcoders.transcoder import CrossLayerTranscoder, PerLayerTranscoder

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md

L, D, F = 3, 8, 12
SET = "width_12_l0_small"
Raw = dict[int, dict[str, torch.Tensor]]


def raw_layer(g: torch.Generator, d: int, w_dec_shape: tuple[int, ...], affine: bool) -> dict[str, torch.Tensor]:
    t = {"w_enc": torch.randn(d, F, generator=g), "w_dec": torch.randn(w_dec_shape, generator=g) * 0.5,
         "b_enc": torch.randn(F, generator=g) * 0.5, "b_dec": torch.randn(d, generator=g),
         "threshold": torch.rand(F, generator=g)}
    if affine:
        t["affine_skip_connection"] = torch.randn(d, d, generator=g) * 0.3
    return t


def gs2_config(l: int, affine: bool, **extra: object) -> dict[str, object]:
    """A config.json as Gemma Scope 2 writes one (the fields SAE-Lens reads)."""
    return {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "affine_connection": affine,
            "hf_hook_point_in": f"model.layers.{l}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"model.layers.{l}.post_feedforward_layernorm.output", **extra}


def write_plt(root: Path, name: str = SET, affine: bool = False, seed: int = 0, config: bool = True,
              d: int = D) -> Raw:
    """One set: layer_<l>_<name>/params.safetensors (+ config.json) for layers 0..L-1."""
    g = torch.Generator().manual_seed(seed)
    raw = {}
    for l in range(L):
        folder = root / f"layer_{l}_{name}"
        folder.mkdir(parents=True)
        raw[l] = raw_layer(g, d, (F, d), affine)
        save_file(raw[l], folder / "params.safetensors")
        if config:
            (folder / "config.json").write_text(json.dumps(gs2_config(l, affine)))
    return raw


def write_clt(root: Path, affine: bool = False, seed: int = 1) -> Raw:
    """params_layer_<l>.safetensors with decoders to every layer, [F, L, d]."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    raw = {}
    for l in range(L):
        raw[l] = raw_layer(g, D, (F, L, D), affine)
        save_file(raw[l], root / f"params_layer_{l}.safetensors")
    return raw


def edit(path: Path, **changes: torch.Tensor | None) -> None:
    """Replace (tensor) or delete (None) keys of a safetensors file."""
    t = load_file(path)
    for k, v in changes.items():
        if v is None:
            del t[k]
        else:
            t[k] = v
    save_file(t, path)


def hand_acts(raw: Raw, x: torch.Tensor) -> torch.Tensor:
    """JumpReLU by hand from the raw tensors: a = z * (z > threshold), z = x @ w_enc + b_enc."""
    acts = []
    for l in range(L):
        z = x[..., l, :] @ raw[l]["w_enc"] + raw[l]["b_enc"]
        acts.append(z * (z > raw[l]["threshold"]))
    return torch.stack(acts, dim=-2)


def hand_plt(raw: Raw, x: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    out = []
    for l in range(L):
        y = acts[..., l, :] @ raw[l]["w_dec"] + raw[l]["b_dec"]
        if "affine_skip_connection" in raw[l]:
            y = y + x[..., l, :] @ raw[l]["affine_skip_connection"]
        out.append(y)
    return torch.stack(out, dim=-2)


def hand_clt(raw: Raw, x: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Layer l = sum over sources s <= l of a_s @ w_dec_s[:, l, :] + b_dec_l (+ x_l @ affine_l)."""
    out = []
    for l in range(L):
        y = sum(acts[..., s, :] @ raw[s]["w_dec"][:, l, :] for s in range(l + 1)) + raw[l]["b_dec"]
        if "affine_skip_connection" in raw[l]:
            y = y + x[..., l, :] @ raw[l]["affine_skip_connection"]
        out.append(y)
    return torch.stack(out, dim=-2)


def some_active(acts: torch.Tensor) -> None:
    frac = float((acts != 0).float().mean())
    assert 0.05 < frac < 0.95, f"the test data should make some features active and others not ({frac:.2f})"


# ----------------------------------------------------------------- loading


@pytest.mark.parametrize("affine", [False, True])
def test_plt_set_loads_and_matches_a_hand_computation(tmp_path: Path, affine: bool) -> None:
    name = SET + ("_affine" if affine else "")
    raw = write_plt(tmp_path / "transcoder_all", name, affine=affine)
    root = tmp_path / "transcoder_all"
    assert detect(root) == "gemmascope2"
    model = Transcoder.from_pretrained(root)
    assert isinstance(model, PerLayerTranscoder)
    cfg = model.cfg
    assert (cfg.kind, cfg.n_layers, cfg.d_model, cfg.d_sae, cfg.activation, cfg.skip) == ("plt", L, D, F, "jumprelu", affine)
    assert (cfg.feature_input_hook, cfg.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out")
    assert cfg.hf_hook_name == "model.layers.{layer}.pre_feedforward_layernorm.output"
    assert cfg.hf_hook_name_out == "model.layers.{layer}.post_feedforward_layernorm.output"
    assert cfg.model_name == "google/gemma-3-270m"  # 'gemma-v3-270m-pt' normalised as SAE-Lens does
    for l in range(L):
        assert torch.equal(model.W_enc[l], raw[l]["w_enc"].T)
        assert model.W_dec[l].shape == (F, 1, D)
    x = torch.randn(5, L, D)
    acts = model.encode(x)
    some_active(acts)
    torch.testing.assert_close(acts, hand_acts(raw, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.decode(acts, x if affine else None), hand_plt(raw, x, acts), rtol=1e-6, atol=1e-5)
    if affine:
        with pytest.raises(ValueError, match="needs the MLP inputs"):
            model.decode(acts)


@pytest.mark.parametrize("affine", [False, True])
def test_clt_loads_keeping_only_decoders_to_later_layers(tmp_path: Path, affine: bool) -> None:
    root = tmp_path / "clt" / ("width_12_l0_medium" + ("_affine" if affine else ""))
    raw = write_clt(root, affine=affine)
    assert detect(root) == "gemmascope2"
    model = Transcoder.from_pretrained(root)
    assert isinstance(model, CrossLayerTranscoder)
    cfg = model.cfg
    assert (cfg.kind, cfg.n_layers, cfg.d_model, cfg.d_sae, cfg.skip) == ("clt", L, D, F, affine)
    assert (cfg.feature_input_hook, cfg.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out")
    for l in range(L):
        assert model.W_dec[l].shape == (F, L - l, D)
        assert torch.equal(model.W_dec[l], raw[l]["w_dec"][:, l:, :])
    x = torch.randn(2, 4, L, D)
    acts = model.encode(x)
    some_active(acts)
    torch.testing.assert_close(acts, hand_acts(raw, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.decode(acts, x if affine else None), hand_clt(raw, x, acts), rtol=1e-6, atol=1e-5)
    recon, _ = model(x)
    torch.testing.assert_close(recon, hand_clt(raw, x, acts), rtol=1e-6, atol=1e-5)


def test_clt_config_json_beside_the_files_is_read(tmp_path: Path) -> None:
    root = tmp_path / "clt_set"
    write_clt(root)
    (root / "config.json").write_text(json.dumps(gs2_config(0, False, model_name="google/gemma-3-1b-pt")))
    cfg = Transcoder.from_pretrained(root).cfg
    assert cfg.model_name == "google/gemma-3-1b-pt"
    assert cfg.hf_hook_name == "model.layers.{layer}.pre_feedforward_layernorm.output"


@pytest.mark.parametrize(("kind", "affine"), [("plt", False), ("plt", True), ("clt", True)])
def test_converted_copy_reloads_bit_identically(tmp_path: Path, kind: str, affine: bool) -> None:
    root = tmp_path / "gs2"
    if kind == "plt":
        write_plt(root, SET + ("_affine" if affine else ""), affine=affine)
    else:
        write_clt(root, affine=affine)
    model = Transcoder.from_pretrained(root)
    model.save_pretrained(tmp_path / "native")
    again = Transcoder.from_pretrained(tmp_path / "native")
    assert_identical(model, again)
    assert detect(tmp_path / "native") != "gemmascope2"
    x = torch.randn(3, L, D)
    torch.testing.assert_close(model(x)[0], again(x)[0])
    if kind == "plt":  # and through the other layouts it can be written in
        model.save_pretrained(tmp_path / "ct", layout="circuit-tracer")
        assert_identical(model, Transcoder.from_pretrained(tmp_path / "ct"))


def test_without_config_json_hooks_are_inferred_and_the_model_from_the_cache_path(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    write_plt(plain, config=False)
    cfg = Transcoder.from_pretrained(plain).cfg
    assert cfg.hf_hook_name == "model.layers.{layer}.pre_feedforward_layernorm.output"
    assert cfg.hf_hook_name_out == "model.layers.{layer}.post_feedforward_layernorm.output"
    assert cfg.model_name == ""  # d_model 8 is no Gemma-3; nothing names the model
    cached = tmp_path / "models--google--gemma-scope-2-270m-it" / "snapshots" / "abc" / "transcoder_all"
    write_plt(cached, config=False)
    assert Transcoder.from_pretrained(cached).cfg.model_name == "google/gemma-3-270m-it"
    d640 = tmp_path / "d640"
    write_plt(d640, config=False, d=640)
    assert Transcoder.from_pretrained(d640).cfg.model_name == "google/gemma-3-270m"


def test_a_folder_of_links_to_one_set_loads(tmp_path: Path) -> None:
    """How to load one set out of a folder holding several (what the error message suggests)."""
    everything = tmp_path / "transcoder_all"
    raw = write_plt(everything, "width_12_l0_small")
    write_plt(everything, "width_12_l0_big", seed=5)
    one = tmp_path / "one_set"
    one.mkdir()
    for l in range(L):
        (one / f"layer_{l}_width_12_l0_small").symlink_to(everything / f"layer_{l}_width_12_l0_small")
    model = Transcoder.from_pretrained(one)
    assert all(torch.equal(model.b_dec[l], raw[l]["b_dec"]) for l in range(L))


def test_describe_names_the_layout(tmp_path: Path) -> None:
    write_plt(tmp_path / "s", SET + "_affine", affine=True)
    info = describe(tmp_path / "s")
    assert (info["layout"], info["kind"], info["layers"], info["skip"]) == ("gemmascope2", "plt", L, True)
    assert info["model"] == "google/gemma-3-270m"


# ----------------------------------------------------------------- clear errors


def test_missing_layer(tmp_path: Path) -> None:
    write_plt(tmp_path / "s")
    for p in (tmp_path / "s" / f"layer_1_{SET}").iterdir():
        p.unlink()
    (tmp_path / "s" / f"layer_1_{SET}").rmdir()
    with pytest.raises(ArtifactError, match=rf"set {SET} has layers \[0, 2\]; layer\(s\) \[1\] are missing"):
        Transcoder.from_pretrained(tmp_path / "s")
    # an empty layer folder (an interrupted download) is a missing layer too
    (tmp_path / "s" / f"layer_1_{SET}").mkdir()
    with pytest.raises(ArtifactError, match=r"layer\(s\) \[1\] are missing"):
        Transcoder.from_pretrained(tmp_path / "s")


def test_two_sets_in_one_folder_are_named(tmp_path: Path) -> None:
    write_plt(tmp_path / "s", "width_12_l0_small")
    write_plt(tmp_path / "s", "width_12_l0_small_affine", affine=True)
    with pytest.raises(ArtifactError, match=r"holds 2 Gemma Scope 2 sets: width_12_l0_small, "
                                            r"width_12_l0_small_affine; clt_hub loads one set at a time.*"
                                            r"--include 'transcoder_all/layer_\*_width_16k_l0_small/\*'"):
        Transcoder.from_pretrained(tmp_path / "s")


def test_a_whole_repo_points_at_its_set_folders(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_plt(repo / "transcoder_all", "width_12_l0_small")
    write_clt(repo / "clt" / "width_12_l0_medium")
    write_plt(repo / "resid_post_all", "width_12_l0_small")  # SAEs: not offered
    assert detect(repo) == "gemmascope2"
    with pytest.raises(ArtifactError, match="no Gemma Scope 2 set itself") as exc:
        Transcoder.from_pretrained(repo)
    assert "transcoder_all (width_12_l0_small)" in str(exc.value)
    assert "width_12_l0_medium (cross-layer transcoder)" in str(exc.value)
    assert "resid_post_all" not in str(exc.value)


@pytest.mark.parametrize(("layer", "key", "shape", "expected"), [
    (1, "w_enc", (D + 1, F), rf"w_enc' has shape \({D + 1}, {F}\), expected \({D}, {F}\) \(\[d_in, d_sae\]\)"),
    (2, "w_dec", (F - 1, D), rf"w_dec' has shape \({F - 1}, {D}\), expected \({F}, {D}\)"),
    (0, "threshold", (F + 1,), rf"threshold' has shape \({F + 1},\), expected \({F},\)"),
    (0, "w_dec", (F, 2, D), r"must both be 2-D.*cross-layer"),
])
def test_wrong_shapes(tmp_path: Path, layer: int, key: str, shape: tuple[int, ...], expected: str) -> None:
    write_plt(tmp_path / "s")
    path = tmp_path / "s" / f"layer_{layer}_{SET}" / "params.safetensors"
    edit(path, **{key: torch.zeros(shape)})
    with pytest.raises(ArtifactError, match=expected) as exc:
        Transcoder.from_pretrained(tmp_path / "s")
    assert str(path) in str(exc.value)


def test_missing_key(tmp_path: Path) -> None:
    write_plt(tmp_path / "s")
    path = tmp_path / "s" / f"layer_2_{SET}" / "params.safetensors"
    edit(path, threshold=None)
    with pytest.raises(ArtifactError, match=rf"{path}: tensor 'threshold' is missing"):
        Transcoder.from_pretrained(tmp_path / "s")


def test_unexpected_key(tmp_path: Path) -> None:
    write_plt(tmp_path / "s")
    path = tmp_path / "s" / f"layer_1_{SET}" / "params.safetensors"
    edit(path, log_sparsity=torch.zeros(F))
    with pytest.raises(ArtifactError, match=rf"{path}: unexpected tensor\(s\) log_sparsity"):
        Transcoder.from_pretrained(tmp_path / "s")


def test_affine_must_be_in_every_layer_and_match_the_name(tmp_path: Path) -> None:
    write_plt(tmp_path / "a", SET + "_affine", affine=True)
    edit(tmp_path / "a" / f"layer_2_{SET}_affine" / "params.safetensors", affine_skip_connection=None)
    with pytest.raises(ArtifactError, match="tensor 'affine_skip_connection' is missing"):
        Transcoder.from_pretrained(tmp_path / "a")
    write_plt(tmp_path / "b", SET + "_affine", affine=False, config=False)
    with pytest.raises(ArtifactError, match=rf"named '{SET}_affine' but the file has no 'affine_skip_connection'"):
        Transcoder.from_pretrained(tmp_path / "b")
    write_plt(tmp_path / "c", SET + "_affine", affine=True)
    cfg = json.loads((tmp_path / "c" / f"layer_0_{SET}_affine" / "config.json").read_text())
    (tmp_path / "c" / f"layer_0_{SET}_affine" / "config.json").write_text(json.dumps({**cfg, "affine_connection": False}))
    with pytest.raises(ArtifactError, match="affine_connection is False but the weights have"):
        Transcoder.from_pretrained(tmp_path / "c")


def test_config_json_mistakes(tmp_path: Path) -> None:
    write_plt(tmp_path / "s")
    cfg_path = tmp_path / "s" / f"layer_1_{SET}" / "config.json"
    good = json.loads(cfg_path.read_text())
    cases = {
        "wrong layer": ({**good, "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output"},
                        "a hook of layer 2, but the folder is layer 1"),
        "an SAE": ({k: v for k, v in good.items() if k != "hf_hook_point_out"}, "SAE.*not a transcoder"),
        "another hook": ({**good, "hf_hook_point_in": "model.layers.1.output"}, "hf_hook_point_in is 'model.layers.1.output'"),
        "architecture": ({**good, "architecture": "topk"}, "architecture is 'topk'"),
    }
    for what, (data, expected) in cases.items():
        cfg_path.write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match=expected):
            Transcoder.from_pretrained(tmp_path / "s")
        assert what
    cfg_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Transcoder.from_pretrained(tmp_path / "s")


def test_sae_folder_without_config_is_refused(tmp_path: Path) -> None:
    write_plt(tmp_path / "resid_post_all", config=False)
    with pytest.raises(ArtifactError, match="resid_post_all/, which holds Gemma Scope 2 SAEs"):
        Transcoder.from_pretrained(tmp_path / "resid_post_all")


def test_clt_errors(tmp_path: Path) -> None:
    root = tmp_path / "clt"
    write_clt(root)
    (root / "params_layer_2.safetensors").unlink()
    with pytest.raises(ArtifactError, match="w_dec decodes to 3 layers but .* has 2 params_layer"):
        Transcoder.from_pretrained(root)
    write_clt(tmp_path / "clt2")
    (tmp_path / "clt2" / "params_layer_1.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"layers \[0, 2\]; layer\(s\) \[1\] are missing"):
        Transcoder.from_pretrained(tmp_path / "clt2")
    write_clt(tmp_path / "clt3")
    edit(tmp_path / "clt3" / "params_layer_1.safetensors", w_dec=torch.zeros(F, L, D + 1))
    with pytest.raises(ArtifactError, match=r"w_dec' has shape \(12, 3, 9\), expected \(12, 3, 8\)"):
        Transcoder.from_pretrained(tmp_path / "clt3")
    write_clt(tmp_path / "clt4")
    edit(tmp_path / "clt4" / "params_layer_0.safetensors", w_dec=torch.zeros(F, D))
    with pytest.raises(ArtifactError, match=r"w_dec \[d_sae, n_layers, d_out\]"):
        Transcoder.from_pretrained(tmp_path / "clt4")
    write_clt(tmp_path / "both")
    write_plt(tmp_path / "both")
    with pytest.raises(ArtifactError, match="both per-layer sets .* and cross-layer files"):
        Transcoder.from_pretrained(tmp_path / "both")


def test_lazy_loading_is_refused_with_the_way_out(tmp_path: Path) -> None:
    write_clt(tmp_path / "clt")
    with pytest.raises(Exception, match="lazy decoder loading needs the CLT layout.*convert"):
        Transcoder.from_pretrained(tmp_path / "clt", lazy=True)


# ----------------------------------------------------------------- registry


def gs2_entries() -> dict:
    return {n: e for n, e in entries().items() if e.repo_id.startswith("google/gemma-scope-2-")}


def test_registry_entries_each_select_exactly_one_set() -> None:
    """Every folder name SAE-Lens lists for the 270M transcoder_all release: 18 layers x 8 sets."""
    from huggingface_hub.utils import filter_repo_objects

    found = gs2_entries()
    assert found
    sets = [f"width_{w}_l0_{s}{a}" for w in ("16k", "262k") for s in ("small", "big") for a in ("", "_affine")]
    listing = [f"transcoder_all/layer_{l}_{s}/{f}" for l in range(18) for s in sets
               for f in ("params.safetensors", "config.json")]
    for name, e in found.items():
        assert e.model.startswith("google/gemma-3-270m") and e.kind == "plt", name
        assert (e.feature_input_hook, e.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out"), name
        assert "not verified" in e.description and "Hub access" in e.description, name
        chosen = list(filter_repo_objects(listing, allow_patterns=[f"{e.subfolder}/*", f"{e.subfolder}/**"]))
        folders = {p.rsplit("/", 1)[0].split("/")[-1] for p in chosen}
        assert len(folders) == 18 and len({f.split("_", 2)[2] for f in folders}) == 1, (name, sorted(folders))
        assert e.subfolder.endswith(next(iter(folders)).split("_", 2)[2]), name


def publish_two_sets(hub: FakeHub, tmp_path: Path, repo: str) -> Raw:
    src = tmp_path / "src"
    raw = write_plt(src / "transcoder_all", "width_12_l0_small")
    write_plt(src / "transcoder_all", "width_12_l0_small_affine", affine=True, seed=3)
    hub.add_folder(repo, src)
    return raw


def write_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo: str) -> None:
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"gs2-test-set": {
        "repo_id": repo, "model": "google/gemma-3-270m", "kind": "plt",
        "subfolder": "transcoder_all/layer_*_width_12_l0_small"}}))
    monkeypatch.setenv("CLT_HUB_REGISTRY", str(reg))
    monkeypatch.setenv("CLT_HUB_CACHE", str(tmp_path / "clt_hub_cache"))  # where resolve gathers the set


def test_registry_glob_downloads_one_set_only(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The glob in `subfolder` fetches exactly one set's 18 (here 3) folders, the form the bundled entries use."""
    from huggingface_hub import snapshot_download

    from clt_hub.artifacts.hub import resolve

    raw = publish_two_sets(hub, tmp_path, "fake/gemma-scope-2-tiny")
    write_registry(tmp_path, monkeypatch, "fake/gemma-scope-2-tiny")
    resolve("gs2-test-set", cache_dir=tmp_path / "cache")
    pattern = "transcoder_all/layer_*_width_12_l0_small"
    snapshot = Path(snapshot_download("fake/gemma-scope-2-tiny", cache_dir=tmp_path / "cache", local_files_only=True,
                                      allow_patterns=[f"{pattern}/*", f"{pattern}/**"]))
    assert sorted(p.name for p in (snapshot / "transcoder_all").iterdir()) == [f"layer_{l}_width_12_l0_small" for l in range(L)]
    model = Transcoder.from_pretrained(snapshot / "transcoder_all")
    assert all(torch.equal(model.W_enc[l], raw[l]["w_enc"].T) for l in range(L))


def test_registry_name_of_one_set_loads(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = publish_two_sets(hub, tmp_path, "fake/gemma-scope-2-named")
    write_registry(tmp_path, monkeypatch, "fake/gemma-scope-2-named")
    model = Transcoder.from_pretrained("gs2-test-set", cache_dir=tmp_path / "cache")
    assert all(torch.equal(model.W_enc[l], raw[l]["w_enc"].T) for l in range(L))
