"""Attribution and activation throughput on a real model: Gemma-3-270M (clt_hub.load_model("gemma-3-270m")).

Attribution rows: a random CLT of realistic width (4096 features per layer, 73,728 in all) with thresholds
set so about 20 features fire per layer and token (a trained transcoder's L0) and decoder norms scaled so
the reconstruction is as large as the real MLP output, traced on 16- and 64-token prompts of English text
at max_feature_nodes 512 and 4096. Each row runs in a fresh process, so its peak RSS is its own. A row
whose estimated time (from the row before it) is over --row-limit seconds is not run; its estimate is
printed instead.

Throughput: the activation forward training uses (`clt_hub.models.hooks.mlp_io`, which runs the model
without its LM head) against the plain forward `model(ids)` and the body alone `model.model(ids)`, on
batches of 8 x 128 tokens, interleaved in one process.

The machine's cores are shared: every timing is printed beside the 1-minute load average and the
process's CPU time.

    python benchmarks/bench_real_model.py [--lengths 16 64] [--nodes 512 4096] [--features 4096]
                                          [--row-limit 1200] [--skip-throughput] [--skip-attribution] [--smoke]

--smoke runs the same rows on a tiny random Gemma-3 model in a temporary folder, in seconds (a check that the
code path runs; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "gemma-3-270m"
TEXT = ("The history of the city of Dallas begins in 1841, when John Neely Bryan settled near a crossing of "
        "the Trinity River. The town grew slowly at first, but the arrival of two railroads in the 1870s made "
        "it a centre of trade for cotton, grain and buffalo hides. By the early twentieth century Dallas was a "
        "leading market for cotton and a hub of banking and insurance in the Southwest, and after the discovery "
        "of oil in East Texas in 1930 it became the financial capital of the oil industry.")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _ids(tokenizer, length: int) -> torch.Tensor:
    ids = tokenizer(TEXT)["input_ids"]
    if len(ids) < length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {length}")
    return torch.tensor(ids[:length])


def realistic_clt(model, tokenizer, features: int, l0: float, seed: int = 0):
    """A random CLT for `model`, thresholds and decoder scales calibrated on the 64-token text (the same for
    every row): ~l0 active features per layer and token, reconstruction norms like the real MLP outputs."""
    from clt_hub import Transcoder, TranscoderConfig
    from clt_hub.models.hooks import mlp_io

    cfg = TranscoderConfig(n_layers=model.config.num_hidden_layers, d_model=model.config.hidden_size,
                           d_sae=features, kind="clt", feature_input_hook="mlp.hook_in",
                           feature_output_hook="hook_mlp_out")
    tc = Transcoder.from_config(cfg)
    tc.reset_parameters(generator=torch.Generator().manual_seed(seed))
    x, y = mlp_io(model, _ids(tokenizer, 64)[None], "mlp.hook_in", "hook_mlp_out")
    x, y = x[0, 1:], y[0, 1:]  # [T, L, d]; BOS excluded (attribution zeroes its features)
    L = cfg.n_layers
    with torch.no_grad():
        acts = []
        for l in range(L):
            pre = tc.pre_activations(x[:, l], l)
            tc.threshold[l].fill_(float(pre.flatten().kthvalue(int(pre.numel() * (1 - l0 / features))).values))
            acts.append(tc.activate(pre, l))
        recon = tc.decode(torch.stack(acts, dim=1))  # [T, L, d]
        for target in range(L):  # every source layer's write into `target`, scaled together
            factor = y[:, target].norm(dim=-1).mean() / recon[:, target].norm(dim=-1).mean().clamp(min=1e-12)
            for source in range(target + 1):
                tc.W_dec[source][:, target - source].mul_(factor)
    return tc


def child_attribution(name: str, length: int, nodes: int, features: int, l0: float, batch: int) -> dict:
    from clt_hub.attribution.attribute import attribute
    from clt_hub.models.loading import load_model

    model, tok = load_model(name)
    tc = realistic_clt(model, tok, features, l0)
    ids = _ids(tok, length)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    g = attribute(model, tc, ids, max_feature_nodes=nodes, batch_size=batch)
    return {"length": length, "nodes": nodes, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "load": load, "load_after": os.getloadavg()[0], "peak_extra_mb": _status("VmHWM") - base,
            "peak_rss_mb": _status("VmHWM"), "kept_features": g.n_features, "n_logits": g.n_logits,
            **g.meta["timings"]}


def child_throughput(name: str, batch: int, seq: int, repeats: int) -> dict:
    from clt_hub.models.hooks import mlp_io
    from clt_hub.models.loading import load_model

    model, _ = load_model(name)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ways = {
        "mlp_io (training activations)": lambda ids: mlp_io(model, ids, "mlp.hook_in", "hook_mlp_out"),
        "model(ids) (with the LM head)": lambda ids: model(ids),
        "model.model(ids) (no LM head)": lambda ids: model.model(ids),
    }
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in ways}
    with torch.no_grad():
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        for fn in ways.values():  # warm-up
            fn(ids[:1, :16])
        for _ in range(repeats):
            for name, fn in ways.items():  # interleaved, so load changes hit all three alike
                load = os.getloadavg()[0]
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn(ids)
                times[name].append((time.perf_counter() - t0, time.process_time() - c0, load))
                del out
    tokens = batch * seq
    return {"tokens": tokens, "threads": torch.get_num_threads(),
            "rows": {k: {"wall_s": [t[0] for t in v], "cpu_s": [t[1] for t in v], "load": [t[2] for t in v],
                         "best_tok_s": tokens / min(t[0] for t in v),
                         "median_tok_s": tokens / sorted(t[0] for t in v)[len(v) // 2]} for k, v in times.items()}}


def _run(args: list[str], timeout: float | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"child {args} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--nodes", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--row-limit", type=float, default=1200.0,
                    help="skip a row estimated to take longer (seconds; 0 = run every row)")
    ap.add_argument("--repeats", type=int, default=3, help="throughput repetitions")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-attribution", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="check the code path in seconds on a tiny random Gemma-3 model")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, name, *rest = args.child
        if kind == "attribution":
            out = child_attribution(name, int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3]), int(rest[4]))
        else:
            out = child_throughput(name, int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return

    model, shape = MODEL, ["8", "128"]  # throughput batches: sequences x tokens
    if args.smoke:
        from _tiny import save_tiny_model

        model = save_tiny_model(Path(tempfile.mkdtemp(prefix="bench-real-model-")), "gemma3", [TEXT])
        args.lengths, args.nodes, args.features, args.l0, args.batch, args.repeats = [16], [8, 16], 32, 4.0, 8, 1
        shape = ["2", "16"]
    start = time.perf_counter()
    print(f"{model}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[dict] = []
    if not args.skip_attribution:
        print(f"\nattribution: CLT {args.features} features/layer, ~{args.l0:g} active per layer and token, "
              f"batch {args.batch}", flush=True)
        for length in args.lengths:
            per_pass = None  # seconds per backward pass at this length, from the row before
            for nodes in sorted(args.nodes):
                if per_pass is not None:
                    passes = math.ceil((nodes + 10) / args.batch)
                    estimate = rows[-1]["forward_and_encode_s"] + rows[-1]["values_and_constants_s"] + per_pass * passes
                    if args.row_limit and estimate > args.row_limit:
                        rows.append({"length": length, "nodes": nodes, "skipped": True, "estimate_s": estimate,
                                     "passes": passes})
                        print(f"len {length:3d}  nodes {nodes:5d}  NOT RUN: estimated {estimate / 60:.0f} min "
                              f"({passes} backward passes x {per_pass:.1f} s) > --row-limit {args.row_limit:.0f} s",
                              flush=True)
                        continue
                r = _run(["--child", "attribution", model, str(length), str(nodes), str(args.features),
                          str(args.l0), str(args.batch)])
                rows.append(r)
                per_pass = r["rows_s"] / max(r["backward_passes"], 1)
                print(f"len {length:3d}  nodes {nodes:5d}  active {r['active_features']:6d}  wall {r['wall_s']:7.1f} s "
                      f"(CPU {r['cpu_s']:7.1f} s, load {r['load']:.1f}-{r['load_after']:.1f})  forward "
                      f"{r['forward_and_encode_s']:5.1f} s  rows {r['rows_s']:7.1f} s ({r['backward_passes']} backward)  "
                      f"values {r['values_and_constants_s']:5.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MiB "
                      f"(+{r['peak_extra_mb']:5.0f})", flush=True)
    if not args.skip_throughput:
        t = _run(["--child", "throughput", model, *shape, str(args.repeats)])
        print(f"\nforward throughput, batch {shape[0]} x {shape[1]} = {t['tokens']} tokens, {args.repeats} interleaved "
              "runs each:")
        for name, r in t["rows"].items():
            runs = ", ".join(f"{w:.1f} s (CPU {c:.1f}, load {lo:.1f})" for w, c, lo in
                             zip(r["wall_s"], r["cpu_s"], r["load"], strict=True))
            print(f"  {name:32} median {r['median_tok_s']:6.0f} tok/s, best {r['best_tok_s']:6.0f} tok/s   [{runs}]")
    if rows:
        print("\n| prompt tokens | max_feature_nodes | active features | wall (s) | CPU (s) | load avg | forward + "
              "encode (s) | rows: backward passes (s) | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.get("skipped"):
                print(f"| {r['length']} | {r['nodes']} | | not run: ~{r['estimate_s'] / 60:.0f} min estimated "
                      f"({r['passes']} passes) | | | | | |")
                continue
            print(f"| {r['length']} | {r['nodes']} | {r['active_features']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                  f"{r['load']:.1f} | {r['forward_and_encode_s']:.1f} | {r['rows_s']:.1f} ({r['backward_passes']} "
                  f"passes) | {r['peak_rss_mb']:.0f} (+{r['peak_extra_mb']:.0f}) |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
