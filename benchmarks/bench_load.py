"""from_pretrained on a CLT of realistic shape: eager vs lazy decoders, time and peak memory.

Each mode runs in a fresh subprocess so peak RSS is its own. Also times one decode of a sparse
batch (what attribution does), since lazy loading moves cost from load time to use time.

    python benchmarks/bench_load.py [--layers 12 --d-model 768 --features 8192 --dtype bfloat16] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_artifact(path: Path, layers: int, d: int, features: int, dtype: str) -> None:
    from safetensors.torch import save_file

    from clt_hub.artifacts.layouts.circuit_tracer import _yaml_config
    from clt_hub.config import TranscoderConfig

    if (path / "config.yaml").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    for l in range(layers):
        save_file({f"W_enc_{l}": (torch.randn(features, d, generator=g) / d**0.5).to(dt),
                   f"b_enc_{l}": torch.full((features,), -0.5).to(dt), f"b_dec_{l}": torch.zeros(d, dtype=dt),
                   f"threshold_{l}": torch.full((features,), 0.1).to(dt)}, str(path / f"W_enc_{l}.safetensors"))
        save_file({f"W_dec_{l}": (torch.randn(features, layers - l, d, generator=g) * 0.01).to(dt)},
                  str(path / f"W_dec_{l}.safetensors"))
    cfg = TranscoderConfig(n_layers=layers, d_model=d, d_sae=features, dtype=dtype, model_name="gpt2-shaped")
    import yaml

    (path / "config.yaml").write_text(yaml.safe_dump(_yaml_config(cfg, "cross_layer_transcoder")))


def _status(field: str) -> float:
    """MiB from /proc/self/status (VmRSS = now, VmHWM = peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(mode: str, path: str) -> None:
    from clt_hub import Transcoder

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    tc = Transcoder.from_pretrained(path, lazy=(mode == "lazy"))
    load_s = time.perf_counter() - t0
    load_peak = _status("VmHWM")
    # a sparse batch like attribution's: 64 positions, ~50 active features per layer and position
    g = torch.Generator().manual_seed(1)
    acts = torch.zeros(64, tc.n_layers, tc.d_sae, dtype=tc.dtype)
    idx = torch.randint(0, tc.d_sae, (64, tc.n_layers, 50), generator=g)
    acts.scatter_(-1, idx, torch.rand(idx.shape, generator=g).to(tc.dtype))
    t0 = time.perf_counter()
    with torch.no_grad():
        tc.decode(acts)
    decode_s = time.perf_counter() - t0
    peak = _status("VmHWM")
    print(json.dumps({"mode": mode, "load_s": load_s, "load_mem_mb": load_peak - base,
                      "decode_s": decode_s, "peak_mem_mb": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--features", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", type=Path, help="where the artifact is built (default: bench_out/clt-load; with "
                    "--smoke, a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="check the code path in seconds: a 2-layer, 64-feature CLT")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    if args.smoke:
        args.layers, args.d_model, args.features = 2, 16, 64
        args.dir = args.dir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    args.dir = args.dir or Path("bench_out/clt-load")
    path = args.dir / f"L{args.layers}-d{args.d_model}-F{args.features}-{args.dtype}"
    print(f"building artifact {path} (once) ...", flush=True)
    make_artifact(path, args.layers, args.d_model, args.features, args.dtype)
    size = sum(p.stat().st_size for p in path.iterdir()) / 2**20
    results = {}
    for mode in ("eager", "lazy", "eager", "lazy"):  # second round: both with a warm page cache
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], check=True,
                             capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    e, lz = results["eager"], results["lazy"]
    print(f"\nCLT {args.layers} layers, d_model {args.d_model}, {args.features} features/layer, {args.dtype}, "
          f"{size:.0f} MiB on disk; warm page cache; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':28}{'eager':>10}{'lazy':>10}{'lazy/eager':>12}")
    for key, label in [("load_s", "from_pretrained time (s)"), ("load_mem_mb", "peak extra RSS, load (MiB)"),
                       ("decode_s", "decode 64 tok x 50/layer (s)"), ("peak_mem_mb", "peak extra RSS, +decode (MiB)")]:
        print(f"{label:28}{e[key]:10.3f}{lz[key]:10.3f}{lz[key] / max(e[key], 1e-9):12.3f}")


if __name__ == "__main__":
    main()
