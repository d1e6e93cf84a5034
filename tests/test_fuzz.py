"""Property-based fuzzing (hypothesis) of the parsers users feed (issue 37).

Every property says: for ANY input, the parser either returns a valid value or raises one of clt_hub's own
errors (`clt_hub.errors.CltHubError`: ConfigError, ArtifactError, ...) with a one-line message; never a raw
KeyError, TypeError, RecursionError, ValueError or OverflowError from inside, and never a hang.

Targets: the YAML/JSON loader (`clt_hub.config.load_yaml`/`load_json`), `Architecture`/`TranscoderConfig`
from mappings, the registry reader, `TrainConfig.from_dict(...).validate()`, the CLI's `--set`/`--scale`
spec parser, supernode lookup and interventions, graph JSON files, circuit task files.

CI runs EXAMPLES (200) examples per property, 11 properties, derandomized (the same inputs every run) with no
per-example deadline: about 2,200 inputs, under a minute on a 2-core CPU. Set CLT_FUZZ_EXAMPLES to run more
locally (e.g. 5000). Inputs that once found a bug stay as explicit `@example`s (docs/hardening.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clt_hub.artifacts import registry
from clt_hub.attribution import graph_json
from clt_hub.attribution.interventions import Intervention
from clt_hub.attribution.supernodes import find_supernode, interventions_for
from clt_hub.circuits import Task, load_jsonl
from clt_hub.cli import _parse_intervention
from clt_hub.config import Architecture, TranscoderConfig, load_json, load_yaml
from clt_hub.errors import CltHubError
from clt_hub.training.config import TrainConfig

EXAMPLES = int(os.environ.get("CLT_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def parsed_or_refused(fn: Any, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """(True, value) or (False, error) for a CltHubError with a one-line message; anything else propagates."""
    try:
        return True, fn(*args, **kwargs)
    except CltHubError as exc:
        message = str(exc)
        assert message.strip(), f"{type(exc).__name__} without a message"
        assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"
        return False, exc


# --- strategies -----------------------------------------------------------------------------------------------

big_ints = st.integers(min_value=-(10**400), max_value=10**400)
scalars = (st.none() | st.booleans() | st.integers() | big_ints | st.floats() | st.text(max_size=20)
           | st.sampled_from(["", "0", "-1", "1e999", "nan", "clt", "plt", "topk", "relu", "jumprelu", "float32",
                              "hook_resid_mid", "org/name", "²", "٣"]))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                            max_size=4),
                           max_leaves=20)
yaml_keys = st.text(max_size=8) | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(yaml_keys, c, max_size=4),
                      max_leaves=20)
nested_text = st.integers(0, 200).map(lambda n: "[" * n + "]" * n) | st.integers(0, 200).map(
    lambda n: "a:\n" + "".join(" " * (i + 1) + "b:\n" for i in range(n)))


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True)


yaml_texts = st.text() | values.map(_yaml_text) | nested_text | json_values.map(json.dumps)


def mappings(fields: list[str], required: tuple[str, ...], plausible: st.SearchStrategy[Any]) -> st.SearchStrategy:
    """Mostly the right keys with plausible (often valid, often not) values, sometimes unknown or odd keys."""
    wrong_keys = st.dictionaries(st.text(max_size=8) | st.integers() | st.none() | st.booleans(), values, max_size=2)
    return st.builds(
        lambda req, opt, extra, drop: {k: v for k, v in {**req, **opt, **extra}.items() if k not in drop},
        st.fixed_dictionaries({k: plausible for k in required}),
        st.dictionaries(st.sampled_from(fields), plausible, max_size=len(fields)),
        st.none().map(lambda _: {}) | wrong_keys,
        st.sets(st.sampled_from(required), max_size=1) | st.just(set()),
    )


plausible = (st.integers(-2, 70) | st.integers(1, 2**27) | st.sampled_from(
    ["clt", "plt", "jumprelu", "relu", "topk", "float32", "bfloat16", "hook_resid_mid", "model.layers.{layer}.mlp",
     "{layer:>9}", "org/name", "data", "features", "raise", "skip", "gpt2", "texts.txt"])
    | st.booleans() | st.none() | st.floats() | big_ints | values)


# --- the loader ---------------------------------------------------------------------------------------------

@FUZZ
@given(yaml_texts)
def test_load_yaml_returns_a_value_or_one_config_error(text: str) -> None:
    parsed_or_refused(load_yaml, text, source="fuzz.yaml")
    parsed_or_refused(load_yaml, text.encode("utf-8", "surrogatepass"), source="fuzz.yaml")


@FUZZ
@given(st.text() | json_values.map(json.dumps) | nested_text | st.binary())
def test_load_json_returns_a_value_or_one_config_error(text: str | bytes) -> None:
    ok, value = parsed_or_refused(load_json, text, source="fuzz.json")
    if ok and isinstance(text, str):
        assert json.dumps(value, allow_nan=True) is not None


@FUZZ
@given(json_values)
def test_json_and_yaml_round_trip(value: Any) -> None:
    """What the loaders refuse is only what they say they refuse: shallow, finite values come back unchanged."""
    if any(isinstance(f, float) and not math.isfinite(f) for f in _leaves(value)):
        return
    ok, back = parsed_or_refused(load_json, json.dumps(value), source="fuzz.json")
    assert ok and back == value
    text = _yaml_text(value)  # PyYAML's own round trip is not exact (U+0085 in a key): compare with safe_load
    ok, back = parsed_or_refused(load_yaml, text, source="fuzz.yaml")
    assert ok and back == yaml.safe_load(text)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


# --- configs --------------------------------------------------------------------------------------------------

ARCH_FIELDS = [f.name for f in dataclasses.fields(Architecture)]
CONFIG_FIELDS = [f.name for f in dataclasses.fields(TranscoderConfig)]
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


@FUZZ
@given(mappings(ARCH_FIELDS, ("d_sae",), plausible) | values)
@example({"d_sae": 8, 1: 2, "x": 3})              # mixed key types: sorted() raised TypeError
@example({"d_sae": 8, "jumprelu_bandwidth": 10**400})  # math.isfinite raised OverflowError
def test_architecture_from_any_mapping(data: Any) -> None:
    ok, arch = parsed_or_refused(Architecture.from_dict, data, source="fuzz")
    if ok:
        arch.validate()
        assert Architecture(**dataclasses.asdict(arch)) == arch


@FUZZ
@given(mappings(CONFIG_FIELDS, ("n_layers", "d_model", "d_sae"), plausible) | values)
@example({"n_layers": 2, "d_model": 4, "d_sae": 8, None: 1, "x": 2})
def test_transcoder_config_from_any_mapping(data: Any) -> None:
    ok, cfg = parsed_or_refused(TranscoderConfig.from_dict, data, source="fuzz")
    if ok:
        cfg.validate()
        assert TranscoderConfig.from_dict(cfg.to_dict()) == cfg


train_plausible = plausible | mappings(ARCH_FIELDS, ("d_sae",), plausible)


@FUZZ
@given(mappings(TRAIN_FIELDS, ("model", "dataset", "transcoder"), train_plausible) | values)
@example({"model": "gpt2", "dataset": "t.txt", "transcoder": {"d_sae": 8}, 2: 1, "x": 1})
@example({"model": "gpt2", "dataset": "t.txt", "transcoder": {"d_sae": 8, "jumprelu_bandwidth": 10**400}})
def test_train_config_from_any_mapping(data: Any) -> None:
    ok, cfg = parsed_or_refused(TrainConfig.from_dict, data, source="fuzz")
    if ok:
        parsed_or_refused(cfg.validate)
        assert isinstance(cfg.transcoder, Architecture)


@pytest.mark.parametrize("field", ["lr", "sparsity_c", "max_grad_norm", "auxk_coeff", "skip_lr_scale"])
def test_train_config_refuses_a_number_too_large_for_a_float(field: str) -> None:
    data = {"model": "gpt2", "dataset": "t.txt", "transcoder": {"d_sae": 8}, field: 10**400}
    parsed_or_refused(TrainConfig.from_dict, data, source="fuzz")


@FUZZ
@given(yaml_texts | st.dictionaries(yaml_keys, st.dictionaries(
    st.sampled_from(["repo_id", "revision", "model", "kind", "subfolder", "other"]) | st.text(max_size=5),
    values, max_size=4) | values, max_size=4).map(_yaml_text))
@example("x:\n  repo_id: null\n")    # was accepted as repo_id 'None'
@example("x:\n  repo_id: [a, b]\n")  # was accepted as repo_id "['a', 'b']"
@example("x:\n  repo_id: org/x\n  1: 2\n  z: 3\n")  # mixed key types: sorted() raised TypeError
def test_registry_file_from_any_yaml(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("registry") / "registry.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    ok, entries = parsed_or_refused(registry._read, path)
    if ok:
        for name, entry in entries.items():
            assert isinstance(name, str) and entry.name == name
            for f in dataclasses.fields(entry):
                value = getattr(entry, f.name)
                assert isinstance(value, str)
            assert entry.repo_id not in ("None", "") and not entry.repo_id.startswith(("[", "{"))


# --- interventions and supernodes ---------------------------------------------------------------------------

spec_texts = (st.text(max_size=30) | st.from_regex(r"\A-?\d{1,5}:-?\d{1,5}(@-?\d{1,4})?=-?[\d.eE+-]{1,8}\Z")
              | st.builds(lambda a, b: f"{a}:{b}@0=1", st.integers(1, 6000).map(lambda n: "1" * n), st.just("1")))


@FUZZ
@given(spec_texts, st.sampled_from(["set", "scale"]))
@example("1" * 5000 + ":1=1", "set")   # int() raised ValueError (more than 4,300 digits)
@example("3:1@2=1e999", "set")         # was accepted as value inf
@example("3:1=-1e400", "scale")        # was accepted as scale -inf
def test_intervention_spec_from_any_text(spec: str, kind: str) -> None:
    ok, iv = parsed_or_refused(_parse_intervention, spec, kind)
    if ok:
        assert isinstance(iv, Intervention)
        assert isinstance(iv.layer, int) and iv.layer >= 0 and isinstance(iv.feature, int) and iv.feature >= 0
        assert iv.pos is None or (isinstance(iv.pos, int) and iv.pos >= 0)
        amount = iv.value if kind == "set" else iv.scale
        assert isinstance(amount, float) and math.isfinite(amount)


node_ids = st.from_regex(r"\A-?\d{1,4}_-?\d{1,4}_-?\d{1,4}\Z") | st.text(max_size=12) | st.sampled_from(
    ["1_2_3", "0_-1_0", "E_5_0", "²_1_1", "1_²_1", "1_1_" + "9" * 5000])
supernode_lists = st.lists(st.lists(node_ids, max_size=4), max_size=4)
queries = node_ids | st.sampled_from(["1", "2", " 1 ", "²", "٣", "9" * 5000, "", " "])


@FUZZ
@given(supernode_lists, queries)
@example([["a", "1_2_3"]], "²")            # "²".isdigit() but int("²") raised ValueError
@example([["a", "1_2_3"]], "9" * 5000)     # int() raised ValueError (more than 4,300 digits)
@example([["a", "²_1_1"]], "a")            # the same in a member id
@example([["a", "1_1_" + "9" * 5000]], "a")
def test_supernode_lookup_and_interventions_from_any_list(supernodes: list[list[str]], query: str) -> None:
    names = [g[0] for g in supernodes if g]
    ok, found = parsed_or_refused(find_supernode, names, query)
    if ok:
        assert found in names
    ok, ivs = parsed_or_refused(interventions_for, supernodes, query, value=1.0)
    if ok:
        assert all(isinstance(iv, Intervention) and iv.feature >= 0 for iv in ivs)


# --- graph files and task files -----------------------------------------------------------------------------

graph_like = st.fixed_dictionaries(
    {"metadata": json_values, "nodes": st.lists(st.fixed_dictionaries({}, optional={"node_id": node_ids | json_values})
                                                | json_values, max_size=5),
     "links": st.lists(st.fixed_dictionaries({}, optional={
         "source": node_ids | json_values, "target": node_ids | json_values,
         "weight": st.floats() | json_values}) | json_values, max_size=5)},
    optional={"qParams": st.fixed_dictionaries({}, optional={"supernodes": st.lists(st.lists(
        st.text(max_size=5) | json_values, max_size=3), max_size=3) | json_values}) | json_values})


@FUZZ
@given(graph_like | json_values | st.dictionaries(st.sampled_from(["metadata", "nodes", "links", "qParams"]),
                                                   json_values))
def test_graph_file_from_any_json(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    path = tmp_path_factory.mktemp("graph") / "graph.json"
    path.write_text(json.dumps(data), encoding="utf-8", errors="surrogatepass")
    ok, gf = parsed_or_refused(graph_json.load, path)
    if ok:
        assert all(isinstance(k, str) for k in gf.nodes)
        assert all(s in gf.nodes and t in gf.nodes and math.isfinite(w) for s, t, w in gf.links)
        gf.adjacency()


example_lines = st.fixed_dictionaries({}, optional={
    "clean": st.text(max_size=8) | json_values, "corrupted": st.text(max_size=8) | json_values,
    "answer": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | json_values,
    "wrong": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | json_values,
    "split": st.sampled_from(["train", "test"]) | json_values}).map(json.dumps)
task_lines = st.lists(example_lines | json_values.map(json.dumps) | st.text(max_size=30) | nested_text, max_size=6)


@FUZZ
@given(task_lines)
def test_task_file_from_any_lines(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    ok, task = parsed_or_refused(load_jsonl, path)
    if ok:
        assert isinstance(task, Task) and task.train and task.test
        for ex in task.train + task.test:
            assert ex.clean.strip() and ex.corrupted.strip() and ex.answers and ex.wrong
            assert all(isinstance(t, str) and t for t in ex.answers + ex.wrong)
