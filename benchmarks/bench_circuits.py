"""Component circuits on real models, and how time and memory grow (docs/circuits.md).

results: EAP, EAP-IG and Edge Pruning on one model and task; EAP/EAP-IG score once and are cut at every
sparsity, Edge Pruning trains once per sparsity (--ep-sparsities, --ep-steps: it is the slow one on a CPU).
Writes <out>/<method>/ (results.json, circuit_<s>.json, circuit.png) and <out>/{table.md, curves.png,
comparison.json}.

    python benchmarks/bench_circuits.py results --model smollm2-135m-instruct --task ioi \
        --out docs/circuits/smollm2-ioi [--examples 32] [--ep-steps 40] [--ep-sparsities 0.95]

scaling: time and peak memory of one EAP pass and one Edge Pruning step on tiny random Llama models, as the
number of edges (layers), the sequence length and the batch grow; each row in a fresh process (its own peak
RSS), beside the estimate `clt_hub.circuits.edge_model.estimate_bytes` refuses by.

    python benchmarks/bench_circuits.py scaling [--threads 1]

steps: seconds per Edge Pruning step on a real model for one or more versions of the code side by side
(`--code DIR` per version, each in a fresh process, alternating `--repeats` times), with the log alphas after
the last step compared between versions (a speed-up must not change the masks).

    python benchmarks/bench_circuits.py steps --model smollm2-135m-instruct --task ioi \
        --code /path/to/old/checkout --code . [--steps 8] [--repeats 2]

smoke (`--smoke`, no subcommand): all three on a tiny random Llama model and the IOI task, in seconds (a check
that the code path runs; its numbers mean nothing), writing only into a temporary folder.

The machine's two cores are shared: every timing is printed with the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GRID = [(l, 16, 8) for l in (2, 4, 8, 16)] + [(4, t, 8) for t in (8, 32, 64, 128)] + [(4, 16, b) for b in (2, 32, 64)]
SMOKE_GRID = [(2, 8, 2), (2, 16, 2)]  # (layers, tokens, batch)


def _load() -> float:
    return os.getloadavg()[0]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def results(args: argparse.Namespace) -> None:
    from clt_hub.circuits import CircuitConfig, EdgePruningConfig, find_circuits, get_task
    from clt_hub.circuits.cli import markdown_table
    from clt_hub.circuits.plot import plot_curves
    from clt_hub.models.loading import load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, tok = load_model(args.model)
    task = get_task(args.task, tok, n=args.examples, seed=args.seed)
    rows, timing = {}, {}
    for method in args.methods:
        sparsities = tuple(args.ep_sparsities if method == "edge-pruning" else args.sparsities)
        cfg = CircuitConfig(method=method, sparsities=sparsities, batch_size=args.batch_size, ig_steps=args.ig_steps,
                            seed=args.seed, pruning=EdgePruningConfig(steps=args.ep_steps, lr=args.ep_lr,
                                                                      reg_lr=args.ep_lr, seed=args.seed))
        load, start = _load(), time.perf_counter()
        result = find_circuits(model, tok, task, cfg, model_name=args.model, checkpoints=out / method / "checkpoints")
        seconds = time.perf_counter() - start
        result.save(out / method, draw=args.draw if args.draw in sparsities else None)
        rows[method] = result.rows
        timing[method] = {"seconds_total": seconds, "load_avg_1min": load, "peak_rss_gb": _rss_gb()}
        print(f"{method}: {seconds:.0f} s (load {load:.1f}), peak RSS {_rss_gb():.2f} GB; {result.graph.summary()}",
              flush=True)
    plot_curves(rows, out / "curves.png", f"{args.model}: {task.name}")
    (out / "table.md").write_text(markdown_table(rows))
    (out / "comparison.json").write_text(json.dumps({
        "model": args.model, "task": task.name, "train": len(task.train), "test": len(task.test),
        "threads": args.threads, "timing": timing, "rows": rows,
        "args": {k: v for k, v in vars(args).items() if k != "func"}}, indent=1) + "\n")
    print(markdown_table(rows))


def _scaling_row(layers: int, tokens: int, batch: int, threads: int) -> dict:
    from _tiny import tiny_model

    from clt_hub.circuits import (
        EapConfig,
        EdgeModel,
        EdgePruningConfig,
        eap_scores,
        edge_pruning,
        estimate_bytes,
    )
    from clt_hub.circuits.tasks import Batch

    torch.set_num_threads(threads)
    model = tiny_model("llama", vocab=64, n_layers=layers, d_model=64)
    model.config.max_position_embeddings = max(tokens, 64)
    em = EdgeModel(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (batch, tokens), generator=g)
    ones = torch.ones(batch, 1, dtype=torch.bool)
    b = Batch(ids, torch.randint(3, 64, (batch, tokens), generator=g), torch.full((batch,), tokens - 1),
              ids[:, :1], ones, ids[:, 1:2], ones)
    base = _rss_gb()
    t = time.perf_counter()
    eap_scores(em, [b], EapConfig(1), progress=False)
    eap_s = time.perf_counter() - t
    t = time.perf_counter()
    edge_pruning(em, [b], EdgePruningConfig(steps=3), progress=False)
    step_s = (time.perf_counter() - t) / 3
    return {"layers": layers, "edges": em.graph.n_edges, "tokens": tokens, "batch": batch, "eap_s": eap_s,
            "ep_step_s": step_s, "peak_rss_gb": _rss_gb(), "rss_before_gb": base,
            "estimate_gb": estimate_bytes(em.graph, batch, tokens, grad=True, vocab=64) / 2**30, "load": _load()}


def scaling(args: argparse.Namespace) -> None:
    rows = []
    for layers, tokens, batch in SMOKE_GRID if args.smoke else GRID:
        out = subprocess.run([sys.executable, __file__, "_row", str(layers), str(tokens), str(batch),
                              str(args.threads)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| layers | edges | tokens | batch | EAP pass (s) | EP step (s) | peak RSS (GB) | estimate (GB) | load |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['edges']:,} | {r['tokens']} | {r['batch']} | {r['eap_s']:.2f} | "
                     f"{r['ep_step_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['estimate_gb']:.3f} | {r['load']:.1f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def _steps_child(model_name: str, task_name: str, steps: int, out: str) -> dict:
    from clt_hub.circuits import EdgePruningConfig, get_task
    from clt_hub.circuits.api import task_batches
    from clt_hub.circuits.edge_model import EdgeModel
    from clt_hub.circuits.edge_pruning import _Trainer
    from clt_hub.models.loading import context_length, load_model

    torch.set_num_threads(1)
    model, tok = load_model(model_name)
    task = get_task(task_name, tok, n=32, seed=0)
    train, _ = task_batches(tok, task, 8, context_length(model))
    em = EdgeModel(model)
    trainer = _Trainer(em, train, EdgePruningConfig(steps=steps))
    for i in range(len(train)):  # the corrupted runs are cached once per batch: not part of a step
        trainer.ref(i)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = (time.perf_counter() - start) / steps
    from safetensors.torch import save_file
    save_file({"log_alpha": trainer.log_alpha.detach()}, out)
    return {"step_s": seconds, "peak_rss_gb": _rss_gb(), "edges": em.graph.n_edges, "load": _load()}


def steps(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    codes = [str(Path(c).resolve()) for c in (args.code or [str(Path(__file__).resolve().parents[1])])]
    scratch = Path(tempfile.mkdtemp(prefix="bench-ep-steps-"))
    times: dict[str, list[float]] = {c: [] for c in codes}
    for rep in range(args.repeats):
        for code in codes:
            out = scratch / f"{abs(hash(code))}.safetensors"
            env = {**os.environ, "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", "")}
            done = subprocess.run([sys.executable, __file__, "_steps", args.model, args.task, str(args.steps), str(out)],
                                  capture_output=True, text=True, env=env, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            times[code].append(r["step_s"])
            print(f"{Path(code).name:>12}  run {rep + 1}  {r['edges']:,} edges  {r['step_s']:.2f} s/step  peak RSS "
                  f"{r['peak_rss_gb']:.2f} GB  load {r['load']:.1f}", flush=True)
    ref = min(times[codes[0]])
    for code in codes:
        print(f"{Path(code).name:>12}  best {min(times[code]):.2f} s/step  ({min(times[code]) / ref:.2f}x the first)")
    if len(codes) > 1:
        alphas = [load_file(str(scratch / f"{abs(hash(c))}.safetensors"))["log_alpha"] for c in codes]
        print(f"log alphas after {args.steps} steps: largest difference {float((alphas[0] - alphas[1]).abs().max()):.3g}")


def smoke(parser: argparse.ArgumentParser) -> None:
    """Each subcommand once, on a tiny random Llama model whose word tokenizer knows the IOI prompts."""
    from _tiny import save_tiny_model

    from clt_hub.circuits.tasks import IOI_TEMPLATES, NAMES

    work = Path(tempfile.mkdtemp(prefix="bench-circuits-"))
    model = ["--model", save_tiny_model(work / "model", "llama", [*IOI_TEMPLATES, *NAMES]), "--task", "ioi"]
    for argv in (["--smoke", "results", *model, "--out", str(work / "results"), "--examples", "8", "--batch-size", "4",
                  "--sparsities", "0.5", "0.9", "--ep-sparsities", "0.9", "--ep-steps", "2", "--ig-steps", "2",
                  "--draw", "0.9"],
                 ["--smoke", "scaling"],
                 ["--smoke", "steps", *model, "--steps", "1", "--repeats", "1"]):
        print(f"\n$ bench_circuits.py {' '.join(argv)}", flush=True)
        args = parser.parse_args(argv)
        args.func(args)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_steps":
        print(json.dumps(_steps_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_row":
        layers, tokens, batch, threads = map(int, sys.argv[2:6])
        print(json.dumps(_scaling_row(layers, tokens, batch, threads)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="alone: check all three subcommands' code paths in seconds "
                   "on a tiny random model; `--smoke scaling`: scaling's tiny grid only")
    sub = p.add_subparsers()
    r = sub.add_parser("results")
    r.add_argument("--model", required=True)
    r.add_argument("--task", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--methods", nargs="+", default=["eap", "eap-ig", "edge-pruning"])
    r.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995])
    r.add_argument("--ep-sparsities", nargs="+", type=float, default=[0.95])
    r.add_argument("--ep-steps", type=int, default=40)
    r.add_argument("--ep-lr", type=float, default=0.3)
    r.add_argument("--examples", type=int, default=32)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--ig-steps", type=int, default=5)
    r.add_argument("--draw", type=float, default=0.95)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(func=results)
    s = sub.add_parser("scaling")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", default="")
    s.set_defaults(func=scaling)
    st = sub.add_parser("steps")
    st.add_argument("--model", required=True)
    st.add_argument("--task", required=True)
    st.add_argument("--code", action="append", default=None, help="a checkout to run (repeatable; default: this one)")
    st.add_argument("--steps", type=int, default=8)
    st.add_argument("--repeats", type=int, default=2)
    st.set_defaults(func=steps)
    args = p.parse_args()
    if "func" in args:
        args.func(args)
    elif args.smoke:
        smoke(p)
    else:
        p.error("choose results, scaling or steps (or --smoke)")


if __name__ == "__main__":
    main()
