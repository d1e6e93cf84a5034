"""Circuits over model components (Edge Pruning, EAP, EAP-IG) on `transformers` models.

components: writers, readers and edges via the adapters; run: the disentangled forward with edge masks,
patched from the corrupted run; tasks: IOI, greater-than and JSON lines task files; eap, edge_pruning: the
methods; evaluate: one evaluation for all; truth: a model with a known circuit; api: find_circuits; plot, cli.
"""

from clt_hub.circuits.api import METHODS, CircuitConfig, CircuitResult, find_circuits
from clt_hub.circuits.components import ComponentGraph, component_graph
from clt_hub.circuits.eap import EapConfig, eap_scores
from clt_hub.circuits.edge_model import EdgeModel, estimate_bytes
from clt_hub.circuits.edge_pruning import EdgePruningConfig, EdgePruningResult, edge_pruning
from clt_hub.circuits.evaluate import CircuitMetrics, evaluate, keep_top, sweep
from clt_hub.circuits.tasks import Example, Task, get_task, greater_than, ioi, load_jsonl

__all__ = [
    "METHODS", "CircuitConfig", "CircuitMetrics", "CircuitResult", "ComponentGraph", "EapConfig", "EdgeModel",
    "EdgePruningConfig", "EdgePruningResult", "Example", "Task", "component_graph", "eap_scores", "edge_pruning",
    "estimate_bytes", "evaluate", "find_circuits", "get_task", "greater_than", "ioi", "keep_top", "load_jsonl",
    "sweep",
]
