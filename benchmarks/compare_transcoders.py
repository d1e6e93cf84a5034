"""Transcoders for one model side by side on the case prompts: each graph's replacement and completeness
scores (Ameisen et al. 2025, "Graph evaluation"), traced exactly as the real-model case checks trace
(paper_cases.common: 512 feature nodes unless `--max-feature-nodes` says otherwise, top logits as targets).

The prompts are fixed, not chosen by what any transcoder does: four of each case (one-hop recall, addition,
greater-than on years, couplets through line 2's lead-in), 16 in all.

    python benchmarks/compare_transcoders.py --model gemma-3-270m \
        --transcoder clt=real_out/gemma-3-270m-clt/transcoder --transcoder plt=real_out/gemma-3-270m-plt/transcoder \
        [--out docs/research/real_model/graph_scores.json] [--max-feature-nodes 0] [--per-case 1]
    python benchmarks/compare_transcoders.py --smoke    # the same on a tiny random model, in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # paper_cases lives beside the package

from paper_cases import addition, greater_than, rhyme, two_hop  # noqa: E402

PROMPTS = {
    "recall": [two_hop.one_hop_prompt(c) for c in ("Dallas", "Oakland", "Miami", "Chicago")],
    "addition": [addition.real_prompt(a, b)[0] for a, b in ((2, 3), (4, 4), (7, 1), (3, 5))],
    "greater-than": [greater_than.prompt(yy) for yy in (32, 45, 61, 78)],
    "rhyme": [rhyme.couplet(*c) for c in rhyme.REAL_COUPLETS[:4]],
}


def _plot(named: list[list[str]], path: Path) -> Path | None:
    from clt_hub.training.curves import plot_runs

    runs = {}
    for name, tc_path in named:
        run = Path(tc_path).parent
        if (run / "train_log.jsonl").is_file():
            history = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line]
            report = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
            runs[name] = (history, report)
    return plot_runs(runs, path)


def _smoke_inputs(folder: Path) -> tuple[str, list[str]]:
    """A tiny random Gemma-3 model whose tokenizer knows every prompt's words, and a random CLT and PLT for it."""
    import torch
    from _tiny import save_tiny_model

    from clt_hub import Transcoder, TranscoderConfig

    model = save_tiny_model(folder / "model", "gemma3", [p for prompts in PROMPTS.values() for p in prompts])
    named = []
    for kind in ("clt", "plt"):
        tc = Transcoder.from_config(TranscoderConfig(n_layers=2, d_model=32, d_sae=16, kind=kind))
        tc.reset_parameters(generator=torch.Generator().manual_seed(0))
        tc.save_pretrained(folder / kind)
        named.append(f"{kind}={folder / kind}")
    return model, named


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="required unless --smoke")
    p.add_argument("--transcoder", action="append", metavar="NAME=PATH",
                   help="a transcoder to compare, with the name its column gets (repeat; required unless --smoke)")
    p.add_argument("--out", type=Path, help="write every prompt's scores here as JSON")
    p.add_argument("--plot", type=Path, help="draw the runs' training and held-out FVU here (PNG), for transcoders "
                   "that sit in a training run folder (RUN/transcoder beside RUN/train_log.jsonl and RUN/eval.json)")
    p.add_argument("--smoke", action="store_true", help="check the code path in seconds: a tiny random Gemma-3 model "
                   "and random transcoders in a temporary folder")
    p.add_argument("--max-feature-nodes", type=int, default=None,
                   help="the graphs' feature budget (default: the case checks' 512; 0: every active feature)")
    p.add_argument("--per-case", type=int, default=4, help="the first N prompts of each case (at most 4)")
    a = p.parse_args()
    cases = {case: prompts[: a.per_case] for case, prompts in PROMPTS.items()}
    if a.smoke:  # and one prompt per case
        a.model, a.transcoder = _smoke_inputs(Path(tempfile.mkdtemp(prefix="compare-transcoders-")))
        cases = {case: prompts[:1] for case, prompts in cases.items()}
    if not a.model or not a.transcoder:
        p.error("--model and --transcoder are required (or --smoke)")
    named = [t.split("=", 1) for t in a.transcoder]
    if any(len(n) != 2 for n in named):
        p.error("--transcoder takes NAME=PATH, e.g. clt=real_out/gemma-3-270m-clt/transcoder")

    from tqdm.auto import tqdm

    from clt_hub.models.loading import load_model, load_transcoder
    from paper_cases.common import subject_for, trace

    model, tokenizer = load_model(a.model)
    rows: dict[str, dict[str, Any]] = {}
    for name, path in named:
        subject = subject_for(model, tokenizer, load_transcoder(path), a.model)
        if a.max_feature_nodes is not None:
            subject.max_feature_nodes = a.max_feature_nodes or None
        for case, prompts in cases.items():
            for prompt in tqdm(prompts, desc=f"{name}: {case}", leave=False):
                start = time.perf_counter()
                t = trace(subject, prompt)
                rows.setdefault(prompt, {"case": case})[name] = {
                    "replacement": t.replacement, "completeness": t.completeness,
                    "seconds": time.perf_counter() - start}
    names = [n for n, _ in named]
    print("| case | " + " | ".join(f"{n} replacement | {n} completeness" for n in names) + " |")
    print("|---|" + "---:|---:|" * len(names))
    for case in [*cases, "all"]:
        got = [r for r in rows.values() if case in ("all", r["case"])]
        cells = [f"{statistics.mean(r[n]['replacement'] for r in got):.3f} | "
                 f"{statistics.mean(r[n]['completeness'] for r in got):.3f}" for n in names]
        print(f"| {case} (mean of {len(got)}) | " + " | ".join(cells) + " |")
    if a.plot:
        print(f"runs drawn: {_plot(named, a.plot)}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"model": a.model, "transcoders": dict(named), "prompts": rows}, indent=1))


if __name__ == "__main__":
    main()
