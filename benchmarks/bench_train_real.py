"""Training throughput on a real model, as ratios to the plain forward (the floor a trainer that makes its
own activations cannot beat): tokens/s of the model's forward, of the activation path training uses
(`model_activations`: body only, hooks, padding and special tokens dropped), of one training step on
those activations, and of both together (what `clt-hub train` does per token without a cache).

For TopK (the default, k=32 as in recipes/gemma-3-270m-clt.yaml) every width is trained twice from the same
initial weights: the step `clt-hub train` takes (the sparse decode, cost following k) and the same step with
`sparse_decode=false` (the dense decode, every decoder row multiplied), rows interleaved; a second table gives
the sparse step's tokens/s over the dense one's, on cached activations (the step alone) and end to end (the
activation path plus the step: 1 / (1/activations + 1/step), from the two measured rates).

One or more versions of the code side by side (`--code DIR` per version, each in a fresh process with
that checkout first on PYTHONPATH), rows interleaved within a process so load changes hit them alike:

    python benchmarks/bench_train_real.py --model gemma-3-270m --kind clt --d-sae 256 [--d-sae 2048] \
        [--activation topk --topk 32] [--code /path/to/old/checkout --code .] [--repeats 3]

Text: paragraphs of Python's own documentation (`pydoc_data`, in every CPython), so no download. `--smoke` runs
the same rows on a tiny random Gemma-3 model (a temporary folder) and this checkout only, in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from clt_hub.config import Kind


def _texts() -> list[str]:
    import pydoc_data.topics as topics
    import re

    paras = (" ".join(p.split()) for v in topics.topics.values() for p in re.split(r"\n\s*\n", v))
    return [p for p in paras if len(p) > 400]


def _step_rows(kind: Kind, d_sae: int) -> tuple[str, str]:
    return (f"training step ({kind}, {d_sae} features/layer)",
            f"training step, dense decode ({kind}, {d_sae} features/layer)")


def child(model_name: str, kind: Kind, widths: list[int], activation: str, topk: int, batch: int, seq: int,
          step_tokens: int, repeats: int) -> dict:
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
    # a checkout from before sparse decoding has no such field: its own step is the dense one
    has_sparse = "sparse_decode" in {f.name for f in dataclasses.fields(TrainConfig)}

    def trainer(d_sae: int, sparse: bool | None) -> Trainer:
        arch = Architecture(kind=kind, d_sae=d_sae, activation=activation,
                            topk=topk if activation == "topk" else None)
        extra: dict[str, Any] = {"sparse_decode": sparse} if has_sparse else {}
        made = Trainer(TrainConfig(model=model_name, dataset="bench", n_tokens=10**9, batch_size=step_tokens,
                                   transcoder=arch, **extra), n_layers=L, d_model=d)
        made.fit_scales(x, y)
        made.train_step(x, y)  # warm-up
        return made

    def activations() -> None:
        next(model_activations(model, tokenizer, texts, source))

    rows: dict[str, tuple[Callable[..., object], int]] = {
            "model(ids): plain forward, with LM head": (lambda: model(ids), batch * seq),
            "model body (no LM head)": (lambda: model.base_model(ids), batch * seq),
            "activation path (model_activations)": (activations, batch * seq)}
    pairs_of_steps: list[tuple[str, str]] = []
    for d_sae in widths:
        own, dense = _step_rows(kind, d_sae)
        rows[own] = (trainer(d_sae, None).train_step, step_tokens)   # what `clt-hub train` runs
        if activation == "topk" and has_sparse:
            rows[dense] = (trainer(d_sae, False).train_step, step_tokens)
            pairs_of_steps.append((own, dense))
    with torch.no_grad():
        model(ids[:1, :8])
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(repeats):
        for name, (fn, _) in rows.items():
            t0 = time.perf_counter()
            if name.startswith("training"):
                fn(x, y)
            else:
                with torch.no_grad():
                    fn()
            times[name].append(time.perf_counter() - t0)
    out = {name: rows[name][1] / statistics.median(ts) for name, ts in times.items()}
    act = out["activation path (model_activations)"]
    for d_sae in widths:
        for name in _step_rows(kind, d_sae):
            if name in out:
                out[f"activations + {name} (training without a cache)"] = 1 / (1 / act + 1 / out[name])
    return {"tok_s": out, "pairs": pairs_of_steps, "threads": torch.get_num_threads(),
            "load": os.getloadavg()[0], "layers": L, "d_model": d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="known model name, id or folder")
    ap.add_argument("--kind", default="clt", choices=["clt", "plt"])
    ap.add_argument("--d-sae", type=int, action="append", default=None,
                    help="features per layer (repeatable: several widths in one run; default 256)")
    ap.add_argument("--activation", default="topk", choices=["topk", "jumprelu", "relu"])
    ap.add_argument("--topk", type=int, default=32, help="k of TopK")
    ap.add_argument("--batch", type=int, default=8, help="sequences per model forward")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--step-tokens", type=int, default=1024, help="tokens per training step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code", action="append", default=None, help="a checkout to run (repeatable; default: this one)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the code path in seconds: a tiny random Gemma-3 model, small batches, this checkout")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.d_sae = args.d_sae or [256]
    if args.child:
        print(json.dumps(child(args.model, args.kind, args.d_sae, args.activation, args.topk, args.batch, args.seq,
                               args.step_tokens, args.repeats)))
        return
    if args.smoke:
        from _tiny import save_tiny_model

        args.model = save_tiny_model(Path(tempfile.mkdtemp(prefix="bench-train-real-")), "gemma3", _texts())
        args.d_sae, args.batch, args.seq, args.step_tokens, args.repeats, args.code = [16], 2, 16, 64, 1, None
        args.topk = 4
    codes = [str(Path(c).resolve()) for c in (args.code or [str(Path(__file__).resolve().parents[1])])]
    results = {}
    for code in codes:
        env = {**os.environ, "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--kind", args.kind,
               *(a for w in args.d_sae for a in ("--d-sae", str(w))), "--activation", args.activation, "--topk",
               str(args.topk), "--batch", str(args.batch), "--seq", str(args.seq), "--step-tokens",
               str(args.step_tokens), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{code}: the run failed:\n{done.stderr[-3000:]}")
        results[code] = json.loads(done.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    k = f" k={args.topk}" if args.activation == "topk" else ""
    print(f"{args.model}: {first['layers']} layers, d_model {first['d_model']}, {first['threads']} threads; "
          f"forward batches {args.batch} x {args.seq} tokens, training steps of {args.step_tokens} tokens, "
          f"{args.kind} {args.activation}{k}")
    head = "| | " + " | ".join(f"{Path(c).name} tok/s | x forward" for c in codes) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(codes))
    for row in max((results[c]["tok_s"] for c in codes), key=len):   # the checkout with the most rows
        cells = []
        for code in codes:
            r = results[code]["tok_s"]
            floor = r["model(ids): plain forward, with LM head"]
            cells.append(f"{r[row]:,.0f} | {r[row] / floor:.2f}" if row in r else "- | -")
        print(f"| {row} | " + " | ".join(cells) + " |")
    widths_rows = [_step_rows(args.kind, w)[0] for w in args.d_sae]
    if len(codes) > 1:  # each checkout's own step (what `clt-hub train` runs there) against the first one's
        base = codes[0]
        print()
        print(f"| step: tokens/s over {Path(base).name}'s | " + " | ".join(
            f"{Path(c).name}: cached activations | end to end" for c in codes[1:]) + " |")
        print("|---|" + "---:|---:|" * (len(codes) - 1))
        for own in widths_rows:
            cells = []
            for code in codes[1:]:
                r, b = results[code]["tok_s"], results[base]["tok_s"]
                e2e = f"activations + {own} (training without a cache)"
                cells.append(f"{r[own] / b[own]:.2f}x | {r[e2e] / b[e2e]:.2f}x")
            print(f"| {own.removeprefix('training step ')} | " + " | ".join(cells) + " |")
    if first["pairs"] or any(results[c]["pairs"] for c in codes):
        print()
        print("| step (sparse decode / dense decode) | " + " | ".join(
            f"{Path(c).name}: cached activations | end to end" for c in codes) + " |")
        print("|---|" + "---:|---:|" * len(codes))
        for own, dense in next(results[c]["pairs"] for c in codes if results[c]["pairs"]):
            cells = []
            for code in codes:
                r = results[code]["tok_s"]
                if dense not in r:
                    cells.append("- | -")
                    continue
                both = [r[f"activations + {n} (training without a cache)"] for n in (own, dense)]
                cells.append(f"{r[own] / r[dense]:.2f}x | {both[0] / both[1]:.2f}x")
            print(f"| {own.removeprefix('training step ')} | " + " | ".join(cells) + " |")
    print("load average at the end of each run: " + ", ".join(f"{results[c]['load']:.1f}" for c in codes))


if __name__ == "__main__":
    main()
