"""`TrainConfig.from_sources`: a run from a YAML config, command-line flags and `--set` overrides (what
`clt-hub train` merges), and the declared field checks of `TrainConfig.validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clt_hub.config import Architecture
from clt_hub.errors import ConfigError
from clt_hub.training.config import CHECKS, TrainConfig

YAML = """\
model: m
dataset: d.txt
lr: 1.0e-3
warmup_steps: 7
transcoder:
  d_sae: 16
  kind: plt
"""


def _yaml(tmp_path: Path, text: str = YAML) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_alone(tmp_path: Path) -> None:
    cfg = TrainConfig.from_sources(_yaml(tmp_path), {}, [])
    assert (cfg.model, cfg.dataset, cfg.lr, cfg.warmup_steps) == ("m", "d.txt", 1e-3, 7)
    assert cfg.transcoder == Architecture(d_sae=16, kind="plt")


def test_precedence_yaml_then_flags_then_set(tmp_path: Path) -> None:
    flags: dict[str, Any] = {"model": "flag-model", "lr": 5e-4, "dataset": None, "transcoder.d_sae": 32,
                             "transcoder.kind": None}
    cfg = TrainConfig.from_sources(str(_yaml(tmp_path)), flags, ["lr=2.0e-3", "transcoder.d_sae=64"])
    assert cfg.model == "flag-model"          # a flag over the YAML
    assert cfg.dataset == "d.txt"             # None: the flag was not given, the YAML's value stays
    assert cfg.lr == 2e-3                     # --set over the flag
    assert cfg.transcoder.d_sae == 64         # --set transcoder.FIELD over the flag
    assert cfg.transcoder.kind == "plt"       # the YAML's nested field stays
    assert cfg.warmup_steps == 7


def test_no_yaml_flags_and_nested_sets() -> None:
    flags = {"model": "m", "dataset": "d", "transcoder.d_sae": 8, "transcoder.activation": "topk",
             "transcoder.topk": 2}
    cfg = TrainConfig.from_sources(None, flags, ["transcoder.skip=true", " seed = 3", "cache_dir=null"])
    assert cfg.transcoder == Architecture(d_sae=8, activation="topk", topk=2, skip=True)
    assert cfg.seed == 3 and cfg.cache_dir is None     # the key is stripped; the value is YAML
    assert TrainConfig.from_sources(None, flags, None) == TrainConfig.from_sources(None, flags, [])


def test_later_set_wins_and_values_are_yaml() -> None:
    cfg = TrainConfig.from_sources(None, {"model": "m", "dataset": "d", "transcoder.d_sae": 8},
                                   ["warmup_steps=5", "warmup_steps=9", "text_field=a=b", "amp=true"])
    assert cfg.warmup_steps == 9 and cfg.text_field == "a=b" and cfg.amp is True


@pytest.mark.parametrize(("yaml_text", "flags", "sets", "message"), [
    (None, {}, ["warmup_steps"], "--set 'warmup_steps': write FIELD=VALUE, e.g. --set warmup_steps=50"),
    (None, {}, [""], "--set '': write FIELD=VALUE"),
    ("model: m\ndataset: d\ntranscoder: 16\n", {}, [],
     "'transcoder' in the training config must be a mapping (d_sae, kind, activation, ...)"),
    ("- a\n- b\n", {}, [], "must be a mapping of TrainConfig fields"),
    (None, {"model": "m", "dataset": "d", "transcoder.d_sae": 8}, ["learning_rate=1"],
     "training options: unknown field(s) learning_rate"),
    (None, {"model": "m", "dataset": "d"}, [], "training options: "),   # no d_sae anywhere
    (None, {"dataset": "d", "transcoder.d_sae": 8}, [], "training options: missing required field(s) model"),
    (None, {"model": "m", "dataset": "d", "transcoder.d_sae": 8}, ["seed=1.5"],
     "training options: training field 'seed' must be an integer (int), got 1.5 (float)"),
    (None, {"model": "m", "dataset": "d", "transcoder.d_sae": 8}, ["lr=[1"], "--set lr"),
    (None, {"model": "m", "dataset": "d", "transcoder.d_sae": 8}, ["transcoder.width=3"],
     "unknown field(s) width"),
])
def test_mistakes_are_one_line(tmp_path: Path, yaml_text: str | None, flags: dict[str, Any], sets: list[str],
                               message: str) -> None:
    path = _yaml(tmp_path, yaml_text) if yaml_text is not None else None
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_sources(path, flags, sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_field_has_a_declared_check() -> None:
    """Every scalar training field is named by a row of the field table (or is free: a path, a flag, a name)."""
    named = {check[0] for check in CHECKS if isinstance(check, tuple)}
    free = {"transcoder", "batch_topk", "cache_dir", "amp", "push_to_hub", "eval_dataset", "tensorboard",
            "cache_tokens"}   # types only (push_to_hub and cache_tokens by their own rules)
    fields = set(TrainConfig.__dataclass_fields__)
    assert fields - named - free == set()
    assert named - fields == {"transcoder.topk"}
