"""TraceOptions (issue 38): the tracing defaults are declared once, and a bad value is refused when the options are
made, with the message the CLI has always given."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from clt_hub.attribution.attribute import attribute
from clt_hub.attribution.graph_json import to_json
from clt_hub.attribution.options import DEFAULT_OPTIONS, TraceOptions
from clt_hub.attribution.pruning import prune
from clt_hub.errors import ConfigError


def _defaults(fn: object) -> dict[str, object]:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()  # type: ignore[arg-type]
            if p.default is not inspect.Parameter.empty}


def test_the_defaults_are_declared_once() -> None:
    """The CLI's flags, prune, to_json, attribute, the Space's sliders and the case studies all read
    TraceOptions' defaults (app.py, space/state.py and paper_cases/common.py take them from TraceOptions)."""
    import typer

    from clt_hub.cli import trace_cmd

    d = DEFAULT_OPTIONS
    assert (d.node_threshold, d.edge_threshold, d.max_logits, d.batch_size) == (0.8, 0.98, 10, 64)
    cli = {n: p.default for n, p in inspect.signature(trace_cmd).parameters.items()}
    for name in ("node_threshold", "edge_threshold", "max_logits", "batch_size", "max_feature_nodes"):
        default = cli[name].default if isinstance(cli[name], typer.models.OptionInfo) else cli[name]
        assert default == getattr(d, name), name
    for fn in (prune, to_json):
        assert _defaults(fn)["node_threshold"] == d.node_threshold
        assert _defaults(fn)["edge_threshold"] == d.edge_threshold
    for name in ("max_logits", "logit_cumulative", "batch_size", "max_feature_nodes", "max_memory_bytes"):
        assert _defaults(attribute)[name] == getattr(d, name), name
    from space.state import Space

    assert _defaults(Space.trace)["options"] is DEFAULT_OPTIONS
    app = (Path(__file__).resolve().parents[1] / "app.py").read_text()
    assert "0.98" not in app and "TraceOptions.edge_threshold" in app


@pytest.mark.parametrize(("options", "message"), [
    ({"node_threshold": 5.0}, "node_threshold is a fraction of influence between 0 and 1, not 5.0"),
    ({"edge_threshold": float("nan")}, "edge_threshold is a fraction of influence between 0 and 1, not nan"),
    ({"max_logits": 0}, "max_logits must be a whole number of at least 1, not 0"),
    ({"max_feature_nodes": -3}, "max_feature_nodes must be a whole number of at least 1, not -3"),
    ({"batch_size": True}, "batch_size must be a whole number of at least 1, not True"),
    ({"targets": ["w4", "w4"]}, "target 'w4' is given twice"),
    ({"logit_diffs": [("w4", "w4")]}, "compares a token with itself"),
    ({"logit_cumulative": 0.0}, "logit_cumulative is a probability above 0 and at most 1, not 0.0"),
])
def test_a_bad_option_is_refused_when_made(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TraceOptions(**options)  # type: ignore[arg-type]


def test_options_are_frozen_and_take_lists() -> None:
    o = TraceOptions(targets=["w4"], logit_diffs=[["w4", "w5"]])  # type: ignore[arg-type]
    assert o.targets == ("w4",) and o.logit_diffs == (("w4", "w5"),)
    assert hash(o) == hash(TraceOptions(targets=("w4",), logit_diffs=(("w4", "w5"),)))
    with pytest.raises(AttributeError):
        o.node_threshold = 0.5  # type: ignore[misc]
