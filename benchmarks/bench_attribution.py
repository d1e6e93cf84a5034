"""How attribution time and memory grow with prompt length and with the number of feature nodes.

GPT-2-small-shaped random model (12 layers, d_model 768) with a random CLT whose thresholds give a
realistic sparsity; each configuration runs in a fresh process so peak RSS is its own.

    python benchmarks/bench_attribution.py [--lengths 16 32 64 128] [--features 4096] [--nodes 256 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(length: int, features: int, nodes: int, l0: float, batch: int) -> None:
    import transformers as T

    from clt_hub import Transcoder, TranscoderConfig
    from clt_hub.attribution.attribute import attribute

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    model = T.GPT2LMHeadModel(cfg).eval()
    tc = Transcoder.from_config(TranscoderConfig(n_layers=12, d_model=768, d_sae=features))
    from clt_hub.models.hooks import mlp_io

    ids = torch.randint(0, 50257, (length,))
    calib, _ = mlp_io(model, torch.randint(0, 50257, (1, 64)))
    with torch.no_grad():
        for l in range(12):  # threshold each layer on real MLP inputs so about `l0` features fire per token
            pre = tc.pre_activations(calib[0, 1:, l], l)
            tc.threshold[l].fill_(float(pre.flatten().kthvalue(int(pre.numel() * (1 - l0 / features))).values))
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    g = attribute(model, tc, ids, max_feature_nodes=nodes, batch_size=batch)
    wall = time.perf_counter() - t0
    print(json.dumps({"length": length, "nodes": nodes, "wall_s": wall, "peak_mb": _status("VmHWM") - base,
                      **g.meta["timings"], "kept_features": g.n_features}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--nodes", type=int, nargs="+", default=[256])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", nargs=5, type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        length, features, nodes, l0, batch = args.child
        return child(int(length), int(features), int(nodes), l0, int(batch))
    rows = []
    for nodes in args.nodes:
        for length in args.lengths:
            out = subprocess.run([sys.executable, __file__, "--child", str(length), str(args.features), str(nodes),
                                  str(args.l0), str(args.batch)], check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"len {r['length']:4d}  nodes {r['nodes']:5d}  active {r['active_features']:6d}  wall {r['wall_s']:7.2f}s  "
                  f"forward {r['forward_and_encode_s']:6.2f}s  rows {r['rows_s']:7.2f}s ({r['backward_passes']} backward)  "
                  f"values {r['values_and_constants_s']:5.2f}s  peak +{r['peak_mb']:7.0f} MiB", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2-small shape, CLT {args.features} "
          f"features/layer, ~{args.l0:g} active per layer and token")


if __name__ == "__main__":
    main()
