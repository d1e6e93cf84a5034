"""TraceOptions: how a graph is traced (pruning thresholds, node budget, targets, batch, memory), declared and
checked once. The CLI, `trace()`, the Space and the case studies build one; pruning and graph JSON take their
defaults from it. Light on purpose (no torch), so the CLI's --help and the Space's page read it cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clt_hub.errors import ConfigError


def check_fraction(name: str, value: Any) -> None:
    """A pruning threshold: a fraction of influence, 0 to 1 (NaN and infinities refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} is a fraction of influence between 0 and 1, not {value!r}")


def check_counts(max_logits: int, batch_size: int, max_feature_nodes: int | None) -> None:
    """Attribution's whole-number options (0 or a negative number would give an empty or broken graph)."""
    for name, count in (("max_logits", max_logits), ("batch_size", batch_size), ("max_feature_nodes", max_feature_nodes)):
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ConfigError(f"{name} must be a whole number of at least 1, not {count!r}")


def check_qk(qk: Any) -> None:
    """How many (layer, head, query, key) QK tracing explains: a whole number, 0 for none."""
    if isinstance(qk, bool) or not isinstance(qk, int) or qk < 0:
        raise ConfigError(f"qk is how many (layer, head, query, key) to explain, a whole number (0: none), not {qk!r}; "
                          "e.g. qk=10 (--qk 10)")


def check_targets(targets: tuple[str, ...], logit_diffs: tuple[tuple[str, str], ...]) -> None:
    """Targets as texts: each given once, no logit difference of a text with itself. `trace.target_ids` checks
    them against the tokenizer."""
    seen: set[Any] = set()
    for text in targets:
        if text in seen:
            raise ConfigError(f"target {text!r} is given twice; give each target once")
        seen.add(text)
    for a, b in logit_diffs:
        if a == b:
            raise ConfigError(f"logit difference {a!r} - {b!r} compares a token with itself (always 0); give two "
                              "different tokens, e.g. ' Austin| Dallas'")
        if (a, b) in seen:
            raise ConfigError(f"logit difference {a!r} - {b!r} is given twice; give each once")
        seen.add((a, b))


@dataclass(frozen=True)
class TraceOptions:
    """Everything about a trace but its inputs (prompt, model, tokenizer, transcoder, context texts). Checked when
    made, before any work (a bad value would otherwise fail after attribution); frozen, so a checked one stays so.

    `targets`: single-token texts to attribute instead of the top logits; `logit_diffs`: (a, b) text pairs, each
    attributed as logit(a) - logit(b). Without either, the top logits up to `logit_cumulative` probability, at most
    `max_logits`. `max_feature_nodes`: keep only this many features, chosen by influence (None: all);
    `max_memory_bytes`: attribution's memory plan (None: half the machine's memory); `supernodes`: put the
    suggested groups into the graph JSON; `max_context_texts`: documents searched for top activating contexts;
    `qk`: explain this many (layer, head, query, key), those carrying the most kept cross-position influence, with
    exact QK attribution in the graph JSON (clt_hub.attribution.qk; 0: none)."""

    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_logits: int = 10
    logit_cumulative: float = 0.95
    batch_size: int = 64
    max_feature_nodes: int | None = None
    max_memory_bytes: int | None = None
    targets: tuple[str, ...] = ()
    logit_diffs: tuple[tuple[str, str], ...] = ()
    supernodes: bool = False
    max_context_texts: int = 1000
    slug: str = "graph"
    qk: int = 0

    def __post_init__(self) -> None:
        # lists are taken as given (a caller's `targets=["a"]`), kept as tuples so the options stay frozen
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "logit_diffs", tuple((a, b) for a, b in self.logit_diffs))
        check_fraction("node_threshold", self.node_threshold)
        check_fraction("edge_threshold", self.edge_threshold)
        if isinstance(self.logit_cumulative, bool) or not isinstance(self.logit_cumulative, (int, float)) \
                or not 0.0 < self.logit_cumulative <= 1.0:
            raise ConfigError(f"logit_cumulative is a probability above 0 and at most 1, not {self.logit_cumulative!r}")
        check_counts(self.max_logits, self.batch_size, self.max_feature_nodes)
        check_targets(self.targets, self.logit_diffs)
        check_qk(self.qk)


DEFAULT_OPTIONS = TraceOptions()  # the defaults, as one value (a function's default argument)
