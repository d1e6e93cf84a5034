"""clt_hub vs circuit-tracer on long prompts: wall time and peak memory side by side, as ratios.

Runs in circuit-tracer's venv (`python3 -m nox -s peer -- scaling`, or directly with that venv's python).
The model is GPT-2-small-shaped (12 layers, d_model 768, 12 heads, 2,048 positions) with random weights,
built once as a TransformerLens model for circuit-tracer and copied into a Hugging Face GPT-2 for clt_hub;
the CLT has 4,096 random features per layer, thresholded so that about `--l0` fire per layer and token (the
same set-up as benchmarks/bench_attribution.py). Both trace the same prompt with the same number of feature
nodes and the same batch size, each in a fresh process so that its peak resident memory is its own ("peak
extra": the peak minus the memory once model and CLT are built). A process that would pass `--max-gib` of
address space fails with an allocation error instead of taking the machine down; that length is reported
as not run.

circuit-tracer re-ranks the candidate features every `update_interval` (4) batches, clt_hub after every
batch, so with a feature-node limit the two choose overlapping but not identical feature sets; the overlap
is printed. (Equal graphs without the limit are checked by crosschecks/circuit_tracer_attribution.py.)

    python crosschecks/circuit_tracer_scaling.py [--lengths 128 256 512 1024 2048] [--nodes 1024] [--smoke]

`--smoke`: the same on a tiny GPT-2 shape and two short prompts, in seconds (a check that the code path runs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# model shapes: layers, d_model, heads, vocabulary, context
SHAPES = {"gpt2-small": (12, 768, 12, 50257, 2048), "tiny": (2, 64, 4, 512, 64)}


def child(tool: str, length: int, nodes: int, features: int, l0: float, batch: int, out: str, shape: str) -> None:
    from circuit_tracer.attribution.attribute import attribute as ct_attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer_attribution import _status, _tokenizer, to_hf
    from transformer_lens import HookedTransformerConfig

    from clt_hub import Transcoder, TranscoderConfig
    from clt_hub.attribution.attribute import attribute
    from clt_hub.models.hooks import mlp_io

    torch.manual_seed(0)
    L, d, heads, vocab, n_ctx = SHAPES[shape]
    cfg = HookedTransformerConfig(n_layers=L, d_model=d, n_ctx=n_ctx, d_head=d // heads, n_heads=heads, d_mlp=4 * d,
                                  d_vocab=vocab, act_fn="gelu_new", normalization_type="LN",
                                  positional_embedding_type="standard", seed=0)
    tc = Transcoder.from_config(TranscoderConfig(n_layers=L, d_model=d, d_sae=features))
    folder = Path(tempfile.mkdtemp()) / "clt"
    tc.save_pretrained(folder)
    clt = load_clt(str(folder), scan="crosschecks", feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out",
                   lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32)
    rm = TransformerLensReplacementModel.from_config(cfg, clt)
    rm.tokenizer = _tokenizer(vocab)
    hf = to_hf(rm, cfg)
    calib, _ = mlp_io(hf, torch.randint(1, vocab, (1, 64), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():  # about `l0` features per layer and token fire, on both copies of the CLT
        for l in range(L):
            pre = tc.pre_activations(calib[0, 1:, l], l).flatten()
            q = float(pre.kthvalue(int(pre.numel() * (1 - l0 / features))).values)
            tc.threshold[l].fill_(q)
            rm.transcoders.activation_function.threshold[l].fill_(q)
    ids = torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(2))
    ids[0] = 0
    if tool == "circuit-tracer":
        del hf
        run = lambda: ct_attribute(ids, rm, batch_size=batch, max_feature_nodes=nodes)  # noqa: E731
    else:
        del rm, clt
        run = lambda: attribute(hf, tc, ids, batch_size=batch, max_feature_nodes=nodes)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    graph = run()
    wall = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    if tool == "circuit-tracer":
        feats = graph.active_features[graph.selected_features].tolist()
    else:
        feats = graph.features.tolist()
    Path(out).write_text(json.dumps({"features": feats}))
    print(json.dumps({"tool": tool, "length": length, "wall_s": wall, "peak_mb": peak}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--nodes", type=int, default=1024)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-gib", type=float, default=20.0, help="address-space limit of each traced process")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--smoke", action="store_true", help="a tiny GPT-2 shape and two short prompts, in seconds")
    ap.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        limit = int(args.max_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        tool, length, nodes, features, l0, batch, out, shape = args.child
        child(tool, int(length), int(nodes), int(features), float(l0), int(batch), out, shape)
        return 0
    shape = "gpt2-small"
    if args.smoke:
        shape, args.lengths, args.nodes, args.features, args.l0, args.batch = "tiny", [16, 32], 16, 64, 4.0, 8
    scratch = Path(tempfile.mkdtemp(prefix="ct-scaling-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {shape} shape, CLT {args.features} "
          f"features/layer, ~{args.l0:g} active per layer and token, {args.nodes} feature nodes, batch {args.batch}")
    print("| tokens | circuit-tracer wall (s) | clt_hub wall (s) | ratio | circuit-tracer peak extra (MiB) | "
          "clt_hub peak extra (MiB) | ratio | features chosen by both |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        got: dict[str, dict] = {}
        for tool in ("circuit-tracer", "clt_hub"):
            out = scratch / f"{tool}-{length}.json"
            cmd = [sys.executable, __file__, "--max-gib", str(args.max_gib), "--child", tool, str(length),
                   str(args.nodes), str(args.features), str(args.l0), str(args.batch), str(out), shape]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                got[tool] = {"why": f"over {args.timeout:.0f} s"}
                continue
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                got[tool] = {"why": "out of memory" if "alloc" in last.lower() or "memory" in last.lower()
                             else last[:120]}
                continue
            got[tool] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                         "features": {tuple(f) for f in json.loads(out.read_text())["features"]}}
        ct, ours = got["circuit-tracer"], got["clt_hub"]

        def cell(r: dict, key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else f"not run ({r['why']})"

        both = "wall_s" in ct and "wall_s" in ours
        ratio_t = f"{ours['wall_s'] / ct['wall_s']:.2f}x" if both else "-"
        ratio_m = f"{ours['peak_mb'] / ct['peak_mb']:.2f}x" if both else "-"
        shared = f"{len(ct['features'] & ours['features'])}/{len(ours['features'])}" if both else "-"
        print(f"| {length:,} | {cell(ct, 'wall_s', '.1f')} | {cell(ours, 'wall_s', '.1f')} | {ratio_t} | "
              f"{cell(ct, 'peak_mb', ',.0f')} | {cell(ours, 'peak_mb', ',.0f')} | {ratio_m} | {shared} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
