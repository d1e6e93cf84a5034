"""How attribution time and memory grow with prompt length and with the number of feature nodes, for one
or more versions of the code side by side (`--code DIR` per version: each row runs in a fresh process with
DIR first on its import path).

GPT-2-small-shaped random model (12 layers, d_model 768, 2,048 positions) with a random CLT whose
thresholds give a realistic sparsity. Each configuration runs in a fresh process, so peak RSS is its own;
"peak extra" is the process's peak resident memory minus its memory once the model and CLT are built.
Where two versions both finish a row, their graphs are compared: the same kept features and edges, the
largest relative difference of a kept edge, and both scores.

    python benchmarks/bench_attribution.py [--lengths 128 512 2048] [--nodes 1024] [--features 4096]
        [--budget-gib 4] [--code /path/to/old/checkout --code .] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# model shapes: n_layer, n_embd, n_head, vocab_size, n_positions
SHAPES = {"gpt2-small": (12, 768, 12, 50257, 2048), "tiny": (2, 32, 4, 128, 64)}


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(length: int, features: int, nodes: int, l0: float, batch: int, budget: float, out: str,
          shape: str) -> None:
    import transformers as T
    from safetensors.torch import save_file

    from clt_hub import Transcoder, TranscoderConfig
    from clt_hub.attribution.attribute import attribute
    from clt_hub.attribution.pruning import prune, scores

    torch.manual_seed(0)
    n_layers, d_model, heads, vocab, positions = SHAPES[shape]
    cfg = T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=heads, vocab_size=vocab, n_positions=positions)
    cfg._attn_implementation = "eager"
    model = T.GPT2LMHeadModel(cfg).eval()
    tc = Transcoder.from_config(TranscoderConfig(n_layers=n_layers, d_model=d_model, d_sae=features))
    from clt_hub.models.hooks import mlp_io

    ids = torch.randint(0, vocab, (length,))
    calib, _ = mlp_io(model, torch.randint(0, vocab, (1, 64)))
    with torch.no_grad():
        for l in range(n_layers):  # threshold each layer on real MLP inputs so about `l0` features fire per token
            pre = tc.pre_activations(calib[0, 1:, l], l)
            tc.threshold[l].fill_(float(pre.flatten().kthvalue(int(pre.numel() * (1 - l0 / features))).values))
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"max_memory_bytes": int(budget * 2**30)} if budget else {}  # old trees lack it
    g = attribute(model, tc, ids, max_feature_nodes=nodes, batch_size=batch, **kwargs)
    wall = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    p = prune(g)
    s = scores(g)
    edges = p.edge_mask.nonzero() if not hasattr(p, "kept_edges") else torch.stack(p.kept_edges(g)[:2], 1)
    weights = (g.adjacency[edges[:, 0], edges[:, 1]] if not hasattr(p, "kept_edges") else p.kept_edges(g)[2])
    save_file({"features": g.features.contiguous(), "node_mask": p.node_mask.contiguous(),
               "edges": edges.contiguous(), "weights": weights.float().contiguous()}, out)
    print(json.dumps({"length": length, "nodes": nodes, "wall_s": wall, "peak_mb": peak, **g.meta["timings"],
                      "kept_features": g.n_features, "replacement": s.replacement, "completeness": s.completeness}))


def compare(a: str, b: str) -> str:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if not torch.equal(x["features"], y["features"]) or not torch.equal(x["node_mask"], y["node_mask"]):
        return "different nodes"
    order_x = (x["edges"][:, 0] * 10**7 + x["edges"][:, 1]).argsort()
    order_y = (y["edges"][:, 0] * 10**7 + y["edges"][:, 1]).argsort()
    top = float(y["weights"].abs().max())
    if not torch.equal(x["edges"][order_x], y["edges"][order_y]):
        ex = {tuple(e): float(w) for e, w in zip(x["edges"].tolist(), x["weights"], strict=True)}
        ey = {tuple(e): float(w) for e, w in zip(y["edges"].tolist(), y["weights"], strict=True)}
        only = [ex[e] for e in ex.keys() - ey.keys()] + [ey[e] for e in ey.keys() - ex.keys()]
        both = ex.keys() & ey.keys()
        rel = max(abs(ex[e] - ey[e]) for e in both) / top
        return (f"{len(only)} of {len(ey)} kept edges differ (largest |weight| {max(map(abs, only)) / top:.1e} of the "
                f"largest edge); the other edges agree to {rel:.1e}")
    wx, wy = x["weights"][order_x], y["weights"][order_y]
    return f"same nodes and edges, max rel diff {float(((wx - wy).abs() / top).max()):.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--nodes", type=int, nargs="+", default=[256])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget-gib", type=float, default=0.0, help="max_memory_bytes in GiB (default: the library's)")
    ap.add_argument("--code", action="append", default=None, help="a checkout to run (repeatable; default: this one)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds a row may take")
    ap.add_argument("--smoke", action="store_true",
                    help="check the code path in seconds: a tiny GPT-2-shaped model, two short prompts, this checkout")
    ap.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        length, features, nodes, l0, batch, budget, out, shape = args.child
        return child(int(length), int(features), int(nodes), float(l0), int(batch), float(budget), out, shape)
    shape = "gpt2-small"
    if args.smoke:
        shape, args.lengths, args.nodes, args.features, args.l0, args.batch, args.code = \
            "tiny", [8, 16], [8], 64, 4.0, 8, None
    codes = [str(Path(c).resolve()) for c in (args.code or [str(Path(__file__).resolve().parents[1])])]
    scratch = Path(tempfile.mkdtemp(prefix="bench-attribution-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {shape} shape, CLT {args.features} "
          f"features/layer, ~{args.l0:g} active per layer and token; batch {args.batch}; budget "
          f"{args.budget_gib or 'default'} GiB", flush=True)
    for nodes in args.nodes:
        for length in args.lengths:
            graphs = {}
            for code in codes:
                out = scratch / f"{abs(hash(code))}-{length}-{nodes}.safetensors"
                env = {**os.environ, "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", "")}
                load = os.getloadavg()[0]
                try:
                    done = subprocess.run([sys.executable, __file__, "--child", str(length), str(args.features),
                                           str(nodes), str(args.l0), str(args.batch), str(args.budget_gib), str(out),
                                           shape],
                                          capture_output=True, text=True, env=env, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{Path(code).name:>10}  len {length:4d}  nodes {nodes:5d}  timed out after {args.timeout:.0f} s")
                    continue
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
                    print(f"{Path(code).name:>10}  len {length:4d}  nodes {nodes:5d}  failed: {last}", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                graphs[code] = str(out)
                print(f"{Path(code).name:>10}  len {r['length']:4d}  nodes {r['nodes']:5d}  active {r['active_features']:6d}  "
                      f"wall {r['wall_s']:7.1f}s  forward {r['forward_and_encode_s']:6.1f}s  rows {r['rows_s']:7.1f}s "
                      f"({r['backward_passes']} backward)  peak +{r['peak_mb']:7.0f} MiB  scores "
                      f"{r['replacement']:.4f}/{r['completeness']:.4f}  load {load:.1f}", flush=True)
            if len(graphs) == 2:
                print(f"            graphs: {compare(*graphs.values())}", flush=True)


if __name__ == "__main__":
    main()
