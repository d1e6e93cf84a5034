"""Training throughput on a real model, as ratios to the plain forward (the floor a trainer that makes its
own activations cannot beat): tokens/s of the model's forward, of the activation path training uses
(`model_activations`: body only, hooks, padding and special tokens dropped), of one training step on
those activations, and of both together (what `clt-hub train` does per token without a cache).

One or more versions of the code side by side (`--code DIR` per version, each in a fresh process with
that checkout first on PYTHONPATH), rows interleaved within a process so load changes hit them alike:

    python benchmarks/bench_train_real.py --model gemma-3-270m --kind clt --d-sae 256 \
        [--code /path/to/old/checkout --code .] [--repeats 3]

Text: paragraphs of Python's own documentation (`pydoc_data`, in every CPython), so no download. `--smoke` runs
the same rows on a tiny random Gemma-3 model (a temporary folder) and this checkout only, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clt_hub.config import Kind


def _texts() -> list[str]:
    import pydoc_data.topics as topics
    import re

    paras = (" ".join(p.split()) for v in topics.topics.values() for p in re.split(r"\n\s*\n", v))
    return [p for p in paras if len(p) > 400]


def child(model_name: str, kind: Kind, d_sae: int, batch: int, seq: int, step_tokens: int, repeats: int) -> dict:
    from clt_hub.config import Architecture
    from clt_hub.models.loading import load_model
    from clt_hub.training.activation_store import SourceConfig, model_activations
    from clt_hub.training.config import TrainConfig
    from clt_hub.training.trainer import Trainer

    model, tokenizer = load_model(model_name)
    texts = _texts()
    source = SourceConfig(context_size=seq, model_batch=batch)
    ids = torch.stack([torch.tensor(tokenizer(t)["input_ids"][:seq]) for t in texts if
                       len(tokenizer(t)["input_ids"]) >= seq][:batch])
    pairs = model_activations(model, tokenizer, texts, source)
    xs, ys = zip(*(next(pairs) for _ in range(-(-step_tokens // (batch * seq)) + 1)), strict=True)
    x, y = torch.cat(xs)[:step_tokens], torch.cat(ys)[:step_tokens]
    L, d = x.shape[1], x.shape[2]
    trainer = Trainer(TrainConfig(model=model_name, dataset="bench", n_tokens=10**9, batch_size=step_tokens,
                                  transcoder=Architecture(kind=kind, d_sae=d_sae)), n_layers=L, d_model=d)
    trainer.fit_scales(x, y)

    def activations() -> None:
        next(model_activations(model, tokenizer, texts, source))

    rows = {"model(ids): plain forward, with LM head": (lambda: model(ids), batch * seq),
            "model body (no LM head)": (lambda: model.base_model(ids), batch * seq),
            "activation path (model_activations)": (activations, batch * seq),
            f"training step ({kind}, {d_sae} features/layer)": (lambda: trainer.train_step(x, y), step_tokens)}
    with torch.no_grad():
        model(ids[:1, :8])
    trainer.train_step(x, y)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(repeats):
        for name, (fn, _) in rows.items():
            t0 = time.perf_counter()
            if name.startswith("training"):
                fn()
            else:
                with torch.no_grad():
                    fn()
            times[name].append(time.perf_counter() - t0)
    out = {name: rows[name][1] / statistics.median(ts) for name, ts in times.items()}
    act, step = out["activation path (model_activations)"], out[f"training step ({kind}, {d_sae} features/layer)"]
    out["activations + step (training without a cache)"] = 1 / (1 / act + 1 / step)
    return {"tok_s": out, "threads": torch.get_num_threads(), "load": os.getloadavg()[0], "layers": L, "d_model": d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="known model name, id or folder")
    ap.add_argument("--kind", default="clt", choices=["clt", "plt"])
    ap.add_argument("--d-sae", type=int, default=256, help="features per layer")
    ap.add_argument("--batch", type=int, default=8, help="sequences per model forward")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--step-tokens", type=int, default=1024, help="tokens per training step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code", action="append", default=None, help="a checkout to run (repeatable; default: this one)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the code path in seconds: a tiny random Gemma-3 model, small batches, this checkout")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.kind, args.d_sae, args.batch, args.seq, args.step_tokens,
                               args.repeats)))
        return
    if args.smoke:
        from _tiny import save_tiny_model

        args.model = save_tiny_model(Path(tempfile.mkdtemp(prefix="bench-train-real-")), "gemma3", _texts())
        args.d_sae, args.batch, args.seq, args.step_tokens, args.repeats, args.code = 16, 2, 16, 64, 1, None
    codes = [str(Path(c).resolve()) for c in (args.code or [str(Path(__file__).resolve().parents[1])])]
    results = {}
    for code in codes:
        env = {**os.environ, "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--kind", args.kind, "--d-sae",
               str(args.d_sae), "--batch", str(args.batch), "--seq", str(args.seq), "--step-tokens",
               str(args.step_tokens), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{code}: the run failed:\n{done.stderr[-3000:]}")
        results[code] = json.loads(done.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"{args.model}: {first['layers']} layers, d_model {first['d_model']}, {first['threads']} threads; "
          f"forward batches {args.batch} x {args.seq} tokens, training steps of {args.step_tokens} tokens")
    head = "| | " + " | ".join(f"{Path(c).name} tok/s | x forward" for c in codes) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(codes))
    for row in first["tok_s"]:
        cells = []
        for code in codes:
            r = results[code]["tok_s"]
            floor = r["model(ids): plain forward, with LM head"]
            cells.append(f"{r[row]:,.0f} | {r[row] / floor:.2f}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    print("load average at the end of each run: " + ", ".join(f"{results[c]['load']:.1f}" for c in codes))


if __name__ == "__main__":
    main()
