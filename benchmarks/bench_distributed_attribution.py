"""Attribution in one process against two torch.distributed (gloo) processes on the same cores (issue 41).

The same realistic random CLT (bench_real_model.realistic_clt: 4,096 features per layer, ~20 active per layer and
token, saved once and loaded by every run) traces the same prompt of Gemma-3-270M:

- 1 process x 2 threads: `attribute` as a user runs it on this machine;
- 2 processes x 1 thread: `torchrun --nproc_per_node 2`, each rank running half of every round's backward seeds;
- 1 process x 1 thread: the per-core reference, to tell the split's efficiency from the threads'.

Each run is a fresh process (peak RSS is its own: VmHWM, per process). Wall and the rows phase are from the
graph's own timings; ratios are against the 1 x 2 run of the same invocation. The graphs are compared too (the
largest edge difference relative to the largest edge).

    python benchmarks/bench_distributed_attribution.py [--length 64] [--nodes 512] [--features 4096] [--sharded]
    python benchmarks/bench_distributed_attribution.py --smoke    # a tiny random Gemma-3, in seconds
    python benchmarks/bench_distributed_attribution.py --arithmetic    # what each of N GPUs holds, no run

--arithmetic prints, for a Gemma-2-2B-shaped model with the 426k-feature CLT (26 layers x 16,384 features,
d_model 2,304), what each rank holds and what is communicated per phase, from the terms `attribute`'s memory plan
uses (clt_hub/attribution/attribute.py, `_plan_memory`), and the longest prompt that fits N x 80 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_model import MODEL, TEXT, _ids, _status, realistic_clt  # noqa: E402


def _run(rank: int, world: int, port: int, args: dict, out: str) -> None:
    """One process of a run: load, trace, write its timings (and rank 0 its rows)."""
    torch.set_num_threads(args["threads"])
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from clt_hub import Transcoder
    from clt_hub.attribution.attribute import attribute
    from clt_hub.models.loading import load_model
    from clt_hub.transcoders.sharded import shard_decoders

    model, tok = load_model(args["model"])
    tc = Transcoder.from_pretrained(args["clt"])
    tc = shard_decoders(tc) if args["sharded"] else tc
    ids = _ids(tok, args["length"])
    base = _status("VmRSS")
    t0 = time.perf_counter()
    g = attribute(model, tc, ids, max_feature_nodes=args["nodes"], batch_size=args["batch"])
    result = {"wall_s": time.perf_counter() - t0, "peak_rss_mb": _status("VmHWM"), "peak_extra_mb": _status("VmHWM") - base,
              **g.meta["timings"]}
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"rows": g.rows.contiguous()}, f"{out}.rows.safetensors")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(args: dict, world: int, threads: int, folder: Path) -> dict:
    import torch.multiprocessing as mp

    out = str(folder / f"w{world}t{threads}")
    mp.start_processes(_run, args=(world, _port(), {**args, "threads": threads}, out), nprocs=world,
                       start_method="spawn")
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]
    from safetensors.torch import load_file

    rows = load_file(f"{out}.rows.safetensors")["rows"]
    return {"world": world, "threads": threads, "ranks": ranks, "rows": rows}


def arithmetic(n_gpus: tuple[int, ...] = (1, 2, 4, 8), gpu_gb: float = 80.0, l0: float = 20.0,
               budget: int = 8192, batch: int = 64, n_logits: int = 10) -> None:
    """Per-rank memory of attribution (float32 weights and rows) for a Gemma-2-2B-shaped model and a 26 x 16,384
    CLT at `l0` active features per layer and token and `budget` feature rows, from the terms of
    attribute._plan_memory, in two layouts: decoders lazy (each rank reads the active rows from host memory or disk
    in every pass, as one process does for a big CLT) and decoders sharded over the ranks (the active rows
    exchanged chunk by chunk in every pass, as the plan does when they are too many to hold)."""
    L, d, F, params = 26, 2304, 16384, 2.61e9
    GB, MB = 1e9, 1e6
    weights = params * 4 + L * F * d * 4                              # model + encoders, replicated
    decoders = F * d * sum(L - l for l in range(L)) * 4               # all decoders
    active = l0 * L                                                   # active features per prompt token
    cache = active * sum(L - l for l in range(L)) / L * d * 4         # their decoder rows
    chunk = 1024 * sum(L - l for l in range(L)) / L * d * 4           # one chunk of them (FEATURE_CHUNK), transient
    n_rows = budget + n_logits
    rows = 4 * n_rows * (active + L + 1)                              # all rows, a column per node
    final = 4 * n_rows * (L + 1)                                      # the final graph's copy, per token
    final_fixed = 4 * n_rows * n_rows                                 # and its feature columns
    forward = 8 * L * d * 4                                           # the retained frozen forward
    per_seed = (2 * (L + 1) + 4) * d * 4                              # one seed's gradients
    print(f"Gemma-2-2B shape (26 layers, d_model 2,304, 2.61B parameters) + CLT 26 x 16,384 (425,984 features), "
          f"float32; {l0:g} active features per layer and token, max_feature_nodes {budget}, batch {batch}, "
          f"{gpu_gb:g} GB per GPU, 10% kept free (the plan's margin)")
    print(f"on every rank: model + encoders {weights / GB:.1f} GB, the final graph's feature columns "
          f"{final_fixed / GB:.2f} GB. All decoders: {decoders / GB:.1f} GB. Per prompt token: the active features' "
          f"decoder rows {cache / MB:.1f} MB, all rows {rows / MB:.1f} MB (each rank holds 1/N), the final graph "
          f"{final / MB:.2f} MB (on every rank), the retained forward {forward / MB:.2f} MB, each seed's gradients "
          f"{per_seed / MB:.2f} MB")
    print("\n| GPUs | decoders | per rank: fixed (GB) | per token (MB) | longest prompt (tokens) | communicated per "
          "round of 64 targets (MB per token) | communicated once (MB per token) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in n_gpus:
        seeds = -(-batch // n)
        for layout in ("lazy", "sharded") if n > 1 else ("lazy",):
            fixed = weights + final_fixed + (decoders / n + chunk if layout == "sharded" else 0)
            per_token = rows / n + final + forward + seeds * per_seed
            longest = max(0, int((gpu_gb * GB * 0.9 - fixed) // per_token))
            # per round: the influence estimate's all-reduce (a value per node); sharded, the active rows of the
            # layers below the round's deepest target, exchanged chunk by chunk (at most all of them)
            per_round = (4 * (active + L + 1) if n > 1 else 0) + (cache if layout == "sharded" else 0)
            once = final if n > 1 else 0  # the final graph, all-reduced once
            print(f"| {n} | {layout} | {fixed / GB:.1f} | {per_token / MB:.1f} | {longest:,} | "
                  f"{per_round / MB:.3g} | {once / MB:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=512)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sharded", action="store_true", help="shard the decoders over the two processes too")
    ap.add_argument("--smoke", action="store_true", help="a tiny random Gemma-3 model, in seconds")
    ap.add_argument("--arithmetic", action="store_true", help="print the N-GPU arithmetic only (no run)")
    args = ap.parse_args()
    if args.arithmetic:
        arithmetic()
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-dist-attr-"))
    model = MODEL
    if args.smoke:
        from _tiny import save_tiny_model

        model = save_tiny_model(folder / "model", "gemma3", [TEXT])
        args.length, args.nodes, args.features, args.l0, args.batch = 16, 16, 32, 4.0, 8
    from clt_hub.models.loading import load_model

    lm, tok = load_model(model)
    realistic_clt(lm, tok, args.features, args.l0).save_pretrained(folder / "clt")
    del lm
    run = {"model": str(model), "clt": str(folder / "clt"), "length": args.length, "nodes": args.nodes,
           "batch": args.batch, "sharded": False}
    print(f"{model}: {args.length} tokens, max_feature_nodes {args.nodes}, CLT {args.features} features/layer "
          f"(~{args.l0:g} active per layer and token), batch {args.batch}; {os.cpu_count()} CPUs, load average at "
          f"start {os.getloadavg()[0]:.1f}", flush=True)
    base = measure(run, 1, 2, folder)
    runs = [base, measure({**run, "sharded": args.sharded}, 2, 1, folder), measure(run, 1, 1, folder)]
    scale = float(base["rows"].abs().max())
    print("\n| processes x threads | wall (s) | rows phase (s) | peak RSS per process (MB) | wall / 1 x 2 | "
          "peak RSS / 1 x 2 | largest edge difference / largest edge |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        wall = max(x["wall_s"] for x in r["ranks"])
        rows = max(x["rows_s"] for x in r["ranks"])
        rss = max(x["peak_rss_mb"] for x in r["ranks"])
        diff = float((r["rows"] - base["rows"]).abs().max()) / scale
        label = f"{r['world']} x {r['threads']}" + (" (decoders sharded)" if r["world"] > 1 and args.sharded else "")
        print(f"| {label} | {wall:.1f} | {rows:.1f} | {rss:,.0f} | {wall / max(x['wall_s'] for x in base['ranks']):.2f} "
              f"| {rss / max(x['peak_rss_mb'] for x in base['ranks']):.2f} | {diff:.1e} |")
    print(f"\nactive features {base['ranks'][0]['active_features']}, backward rounds "
          f"{base['ranks'][0]['backward_passes']}; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
