"""Find a task's circuit over model components with one of three methods, evaluated the same way.

    from clt_hub.circuits import CircuitConfig, find_circuits
    result = find_circuits(model, tokenizer, "ioi", CircuitConfig(method="eap-ig", sparsities=(0.9, 0.95)))
    result.rows        # per sparsity: edges kept, KL, logit difference recovered, accuracy, seconds
    result.save("out/")  # results.json, circuit_<sparsity>.json, curves.png, circuit.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clt_hub.circuits.components import ComponentGraph
from clt_hub.circuits.eap import EapConfig, eap_scores
from clt_hub.circuits.edge_model import EdgeModel, check_memory
from clt_hub.circuits.edge_pruning import EdgePruningConfig, edge_pruning
from clt_hub.circuits.evaluate import evaluate, keep_top, reference
from clt_hub.circuits.tasks import Batch, Task, batches, get_task
from clt_hub.errors import ConfigError

METHODS = ("eap", "eap-ig", "edge-pruning")


@dataclass(frozen=True)
class CircuitConfig:
    method: str = "eap"
    sparsities: tuple[float, ...] = (0.9, 0.95, 0.98)
    examples: int = 64             # generated tasks: how many (half held out by default)
    test_fraction: float = 0.5
    batch_size: int = 8
    ig_steps: int = 5              # EAP-IG interpolation steps
    seed: int = 0
    pruning: EdgePruningConfig = field(default_factory=EdgePruningConfig)  # its sparsity is set per target

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.sparsities:
            raise ConfigError("give at least one sparsity (the fraction of edges removed, e.g. 0.95)")
        for s in self.sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
                raise ConfigError(f"sparsity {s!r} must be a number in [0, 1) (the fraction of edges removed)")
        for name in ("examples", "batch_size", "ig_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"CircuitConfig.{name} must be an integer >= 1, got {v!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        EapConfig(self.ig_steps)


@dataclass
class CircuitResult:
    model: str
    task: str
    method: str
    graph: ComponentGraph
    rows: list[dict[str, Any]]                 # one per sparsity: metrics + seconds
    keeps: dict[float, torch.Tensor]           # sparsity -> bool [E]
    rankings: dict[float, torch.Tensor]        # sparsity -> the ranking that chose it (EAP: |score|)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def circuit_json(self, sparsity: float) -> dict[str, Any]:
        g, keep, ranking = self.graph, self.keeps[sparsity], self.rankings[sparsity]
        edges: list[dict[str, Any]] = []
        for e in keep.nonzero().flatten().tolist():
            w, r = int(g.edge_writer[e]), int(g.edge_reader[e])
            edges.append({"writer": g.writers[w].name, "reader": g.readers[r].name, "score": float(ranking[e])})
        edges.sort(key=lambda d: -d["score"])
        row = next(r for r in self.rows if r["sparsity_target"] == sparsity)
        nodes = sorted({e["writer"] for e in edges} | {e["reader"].split("<")[0] for e in edges})
        return {"model": self.model, "task": self.task, "method": self.method, "sparsity": row["sparsity"],
                "edges_total": g.n_edges, "edges_kept": len(edges), "metrics": row, "nodes": nodes, "edges": edges,
                "graph": {"layers": g.n_layers, "heads": g.n_heads, "kv_heads": g.n_kv_heads}}

    def save(self, folder: str | Path, draw: float | None = None) -> Path:
        """results.json, circuit_<sparsity>.json for each sparsity, curves.png and circuit.png (at `draw`, by
        default the sparsest circuit; its strongest edges)."""
        from clt_hub.circuits.plot import plot_circuit, plot_curves, plot_training

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({"model": self.model, "task": self.task,
                                                         "method": self.method, "edges_total": self.graph.n_edges,
                                                         "seconds": self.seconds, "info": self.info,
                                                         "rows": self.rows}, indent=1) + "\n")
        for s in self.keeps:
            (folder / f"circuit_{s:g}.json").write_text(json.dumps(self.circuit_json(s), indent=1) + "\n")
        plot_curves({self.method: self.rows}, folder / "curves.png", f"{self.model}: {self.task}")
        if any("train_history" in r for r in self.rows):
            plot_training([r for r in self.rows if "train_history" in r], folder / "training.png",
                          f"{self.model}: {self.task}, Edge Pruning")
        s = draw if draw is not None else max(self.keeps)
        if s not in self.keeps:
            raise ConfigError(f"no circuit at sparsity {s}; found {', '.join(f'{k:g}' for k in self.keeps)}")
        keep, ranking = self.keeps[s], self.rankings[s]
        order = [e for e in torch.argsort(ranking, descending=True, stable=True).tolist() if keep[e]]
        edges = [(int(self.graph.edge_writer[e]), int(self.graph.edge_reader[e])) for e in order]
        plot_circuit(self.graph, edges, folder / "circuit.png",
                     f"{self.model} {self.task} {self.method}: {len(edges)} of {self.graph.n_edges} edges")
        return folder


def task_batches(tokenizer: Any, task: Task, batch_size: int, context: int | None) -> tuple[list[Batch], list[Batch]]:
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else 0
    return (batches(tokenizer, task.train, batch_size, context, pad),
            batches(tokenizer, task.test, batch_size, context, pad))


def run_method(em: EdgeModel, train: list[Batch], test: list[Batch], config: CircuitConfig, *,
               checkpoints: Path | None = None, progress: bool = True) -> tuple[list[dict[str, Any]],
                                                                               dict[float, torch.Tensor],
                                                                               dict[float, torch.Tensor], float]:
    """Circuits at every sparsity on `train`, metrics on `test` (rows, keeps, rankings, seconds)."""
    vocab = int(getattr(em.model.config, "vocab_size", 0))
    dbytes = torch.finfo(em.dtype).bits // 8
    for part in (train, test):
        check_memory(em.graph, max(len(b) for b in part), max(b.tokens for b in part), grad=True,
                     dtype_bytes=dbytes, vocab=vocab)
    refs = [reference(em, b) for b in test]
    rows: list[dict[str, Any]] = []
    keeps: dict[float, torch.Tensor] = {}
    rankings: dict[float, torch.Tensor] = {}
    start = time.perf_counter()
    if config.method in ("eap", "eap-ig"):
        t = time.perf_counter()
        scores = eap_scores(em, train, EapConfig(1 if config.method == "eap" else config.ig_steps), progress)
        scoring = time.perf_counter() - t
        for s in config.sparsities:
            keeps[s], rankings[s] = keep_top(scores.abs(), s), scores.abs()
            rows.append({"sparsity_target": s, **evaluate(em, test, keeps[s], refs).to_dict(), "seconds": scoring})
    else:
        for s in config.sparsities:
            cfg = dataclasses.replace(config.pruning, sparsity=s, seed=config.seed)
            folder = None if checkpoints is None else checkpoints / f"edge-pruning-{s:g}"
            result = edge_pruning(em, train, cfg, checkpoint=folder, progress=progress)
            keeps[s], rankings[s] = result.keep, result.log_alpha
            rows.append({"sparsity_target": s, **evaluate(em, test, result.keep, refs).to_dict(),
                         "seconds": result.seconds, "train_kl_last": result.history[-1]["kl"],
                         "train_expected_sparsity_last": result.history[-1]["expected_sparsity"],
                         "steps": len(result.history), "resumed_from_step": result.resumed_from,
                         "train_history": [[h["step"], h["kl"], h["expected_sparsity"]] for h in result.history]})
    return rows, keeps, rankings, time.perf_counter() - start


def find_circuits(model: Any, tokenizer: Any, task: str | Task, config: CircuitConfig | None = None, *,
                  model_name: str = "", checkpoints: str | Path | None = None,
                  progress: bool = True) -> CircuitResult:
    """The circuit of `task` (a built-in name, a .jsonl path or a Task) at each of `config.sparsities`."""
    from clt_hub.models.loading import context_length

    config = config or CircuitConfig()
    if isinstance(task, str):
        task = get_task(task, tokenizer, n=config.examples, seed=config.seed, test_fraction=config.test_fraction)
    train, test = task_batches(tokenizer, task, config.batch_size, context_length(model))
    em = EdgeModel(model)
    rows, keeps, rankings, seconds = run_method(
        em, train, test, config, checkpoints=Path(checkpoints) if checkpoints is not None else None, progress=progress)
    info = {"train_examples": len(task.train), "test_examples": len(task.test), "batch_size": config.batch_size,
            "tokens": max(b.tokens for b in train + test), "threads": torch.get_num_threads(),
            "config": _jsonable(dataclasses.asdict(config))}
    return CircuitResult(model_name or getattr(model.config, "_name_or_path", ""), task.name, config.method,
                         em.graph, rows, keeps, rankings, seconds, info)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
