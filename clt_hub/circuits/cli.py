"""`clt-hub circuit`: a task's circuit over model components (registered by clt_hub.cli as a sub-app).

    clt-hub circuit ioi --model gemma-3-270m --method eap --method eap-ig --method edge-pruning \
        --sparsity 0.9 --sparsity 0.95 --out circuits/ioi-gemma
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clt_hub.errors import CltHubError

circuit_app = typer.Typer(help="Find a task's circuit over model components (EAP, EAP-IG, Edge Pruning).",
                          pretty_exceptions_enable=False, subcommand_metavar="",
                          context_settings={"allow_interspersed_args": True})  # options after the task
console = Console()
err = Console(stderr=True)


@circuit_app.callback(invoke_without_command=True)
def circuit(
    task: Annotated[str, typer.Argument(help="ioi, greater-than, or a .jsonl task file (clean, corrupted, answer, "
                                             "wrong per line).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder, Hub id or known name (gemma-3-270m, "
                                                             "smollm2-135m-instruct).")],
    method: Annotated[list[str] | None, typer.Option("--method", help="eap, eap-ig or edge-pruning; repeat to "
                                                                      "compare.")] = None,
    sparsity: Annotated[list[float] | None, typer.Option("--sparsity", "-s", help="Fraction of edges removed; "
                                                                                  "repeat for a curve.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default circuits/<task>).")] = None,
    examples: Annotated[int, typer.Option(min=1, help="Examples generated for a built-in task.")] = 64,
    test_fraction: Annotated[float, typer.Option(help="Fraction held out for evaluation.")] = 0.5,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Edge Pruning: training steps per sparsity.")] = 300,
    lr: Annotated[float, typer.Option(help="Edge Pruning: learning rate of the masks.")] = 0.1,
    ig_steps: Annotated[int, typer.Option(min=1, help="EAP-IG: interpolation steps.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the task split and Edge Pruning.")] = 0,
    draw: Annotated[float | None, typer.Option(help="Sparsity of the circuit drawn (default: the sparsest).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (1 is fastest on a busy machine).")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Use local files only.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """Find TASK's circuit in MODEL at each sparsity with each method; write results.json, circuit_<s>.json,
    curves.png and circuit.png per method under --out, and a comparison (table.md, curves.png)."""
    try:
        _run(task, model, method or ["eap"], sparsity or [0.9, 0.95, 0.98], out, examples, test_fraction, batch_size,
             steps, lr, ig_steps, seed, draw, threads, offline, progress)
    except CltHubError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        err.print(f"[bold red]error:[/] {escape((exc.strerror or str(exc)) + where)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _run(task: str, model_name: str, methods: list[str], sparsities: list[float], out: Path | None, examples: int,
         test_fraction: float, batch_size: int, steps: int, lr: float, ig_steps: int, seed: int, draw: float | None,
         threads: int | None, offline: bool, progress: bool) -> None:
    import torch

    from clt_hub.circuits.api import CircuitConfig, find_circuits
    from clt_hub.circuits.edge_pruning import EdgePruningConfig
    from clt_hub.circuits.plot import plot_curves
    from clt_hub.circuits.tasks import BUILT_IN, get_task
    from clt_hub.models.loading import load_model

    for i, s in enumerate(sparsities):
        if s in sparsities[:i]:
            raise CltHubError(f"--sparsity {s} is given twice; give each sparsity once")
    configs = [CircuitConfig(method=m, sparsities=tuple(sparsities), examples=examples, test_fraction=test_fraction,
                             batch_size=batch_size, ig_steps=ig_steps, seed=seed,
                             pruning=EdgePruningConfig(steps=steps, lr=lr, seed=seed)) for m in dict.fromkeys(methods)]
    if draw is not None and draw not in sparsities:
        raise CltHubError(f"--draw {draw} is not one of the sparsities ({', '.join(map(str, sparsities))})")
    # a task file (or a misspelt task name) is read before the model loads; a built-in task needs its tokenizer
    the_task = None if task in BUILT_IN else get_task(task, None, n=examples, seed=seed, test_fraction=test_fraction)
    if threads is not None:
        torch.set_num_threads(threads)
    out = out or Path("circuits") / Path(task).stem
    lm, tokenizer = load_model(model_name, local_files_only=offline)
    if the_task is None:
        the_task = get_task(task, tokenizer, n=examples, seed=seed, test_fraction=test_fraction)
    rows = {}
    table = Table(title=escape(f"{model_name}: {the_task.name} ({len(the_task.train)} train, "
                               f"{len(the_task.test)} held out)"), title_justify="left")
    for col in ("method", "sparsity", "edges kept", "KL", "LD recovered", "accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for cfg in configs:
        result = find_circuits(lm, tokenizer, the_task, cfg, model_name=model_name,
                               checkpoints=out / cfg.method / "checkpoints", progress=progress)
        result.save(out / cfg.method, draw=draw)
        rows[cfg.method] = result.rows
        for r in result.rows:
            table.add_row(cfg.method, f"{r['sparsity']:.4f}", f"{r['edges_kept']:,}", f"{r['kl']:.4g}",
                          f"{r['logit_diff_recovered']:.3f}", f"{r['accuracy']:.3f}", f"{r['seconds']:.1f}")
        err.print(f"[green]{cfg.method}[/]: {result.graph.summary()}; {result.seconds:.1f} s; wrote "
                  f"{escape(str(out / cfg.method))}", highlight=False)
    console.print(table)
    plot_curves(rows, out / "curves.png", f"{model_name}: {the_task.name}")
    (out / "table.md").write_text(markdown_table(rows))
    (out / "comparison.json").write_text(json.dumps({"model": model_name, "task": the_task.name, "rows": rows,
                                                     "configs": [dataclasses.asdict(c) for c in configs]}, indent=1))
    console.print(str(out), highlight=False, soft_wrap=True)


def markdown_table(rows: dict[str, list[dict]]) -> str:
    lines = ["| method | sparsity | edges kept | KL | LD recovered | accuracy | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method, rs in rows.items():
        for r in rs:
            lines.append(f"| {method} | {r['sparsity']:.4f} | {r['edges_kept']:,} | {r['kl']:.4g} | "
                         f"{r['logit_diff_recovered']:.3f} | {r['accuracy']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
