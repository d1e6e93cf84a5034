"""A corpus the model writes itself: text sampled from the model, from its BOS token, at temperature 1.

A transcoder approximates the model's MLPs on some text distribution. The model's own distribution is one
that needs no download and no licence beyond the model's, and it is the text the model is most at home in.
Sampling costs CPU time that training on ready text does not, so whether it pays is measured per CPU hour
(docs/research/real_model_clt.md, "Which text trains better").

Generation is resumable: every batch of samples is appended to samples.jsonl as it is made, with its batch
index and seed, so an interrupted run continues where it stopped and gives the same text. When enough
tokens exist, the samples are split into train.jsonl and heldout.jsonl with corpus.json as the data card,
exactly as `clt_hub.training.corpus` does for Python's documentation.

    python -m clt_hub.training.sampled OUT_DIR --model gemma-3-270m --tokens 150000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from clt_hub.config import parse_json_text
from clt_hub.training.corpus import write_split

SAMPLES = "samples.jsonl"


def _done(path: Path) -> list[dict]:
    """The complete records of an earlier run; a line cut off by an interruption is dropped (and rewritten
    away), since its batch is generated again with the same seed."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(parse_json_text(line))  # clt_hub's JSON reader: a mangled deep line is a ParseError
        except ValueError:
            break
    last = max((r["batch"] for r in records), default=-1)
    if records and sum(r["batch"] == last for r in records) < records[0]["rows"]:
        records = [r for r in records if r["batch"] != last]  # a batch written only in part
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


@torch.no_grad()
def _batch(model: Any, tokenizer: Any, rows: int, new_tokens: int, seed: int) -> list[tuple[str, int]]:
    """`rows` samples of up to `new_tokens` tokens after BOS: (text, tokens) each, cut at the first EOS."""
    bos = tokenizer.bos_token_id
    ids = torch.full((rows, 1), bos, dtype=torch.long)
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id or 0)
    stop = set(tokenizer.all_special_ids)
    samples = []
    for row in out[:, 1:].tolist():
        n = next((i for i, t in enumerate(row) if t in stop), len(row))
        samples.append((tokenizer.decode(row[:n]), n))
    return samples


def generate(out_dir: str | Path, model_name: str, n_tokens: int, rows: int = 32, new_tokens: int = 127,
             seed: int = 0, progress: bool = True) -> Iterator[dict]:
    """Append samples to out_dir/samples.jsonl until they hold `n_tokens` tokens; yields every record (old
    ones first). 127 new tokens plus BOS make one 128-token training context."""
    from tqdm.auto import tqdm

    from clt_hub.models.loading import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SAMPLES
    records = _done(path)
    yield from records
    have = sum(r["tokens"] for r in records)
    if have >= n_tokens:
        return
    model, tokenizer = load_model(model_name)
    batch = max((r["batch"] for r in records), default=-1) + 1
    bar = tqdm(total=n_tokens, initial=have, desc="sampling", unit="tok", disable=not progress)
    with path.open("a", encoding="utf-8") as f:
        while have < n_tokens:
            start, wall = time.process_time(), time.perf_counter()
            batch_seed = seed * 1_000_003 + batch
            made = _batch(model, tokenizer, rows, new_tokens, batch_seed)
            cpu, wall = (time.process_time() - start) / rows, (time.perf_counter() - wall) / rows
            for row, (text, n) in enumerate(made):
                rec = {"name": f"sample:{seed}:{batch}:{row}", "text": text, "tokens": n, "batch": batch,
                       "rows": rows, "seed": batch_seed, "cpu_s": cpu, "wall_s": wall}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                have += n
                yield rec
            f.flush()
            bar.update(sum(n for _, n in made))
            batch += 1
    bar.close()


def build(out_dir: str | Path, model_name: str, n_tokens: int, rows: int = 32, seed: int = 0,
          progress: bool = True) -> dict:
    """Generate (or finish generating) the samples, then write the train/held-out split and corpus.json."""
    from clt_hub.models.known import KNOWN

    records = [r for r in generate(out_dir, model_name, n_tokens, rows=rows, seed=seed, progress=progress)
               if r["text"].strip()]
    known = KNOWN.get(model_name)
    licence = f"outputs of {model_name}: {known.licence}" if known else f"outputs of {model_name} (its licence)"
    info = {"source": f"text sampled from {model_name} (from BOS, temperature 1, no top-k/top-p), seed {seed}",
            "license": licence, "tokens": sum(r["tokens"] for r in records),
            "cpu_hours": round(sum(r["cpu_s"] for r in records) / 3600, 4),
            "wall_hours": round(sum(r["wall_s"] for r in records) / 3600, 4)}
    return write_split(out_dir, ((r["name"], r["text"]) for r in records), info)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m clt_hub.training.sampled", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for samples.jsonl, train.jsonl, heldout.jsonl and corpus.json")
    p.add_argument("--model", required=True, help="model name (e.g. gemma-3-270m), folder or Hub id")
    p.add_argument("--tokens", type=int, required=True, help="stop once the samples hold this many tokens")
    p.add_argument("--rows", type=int, default=32, help="samples generated together (a batch)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.tokens <= 0 or a.rows <= 0:
        p.error("--tokens and --rows must be positive")
    print(json.dumps(build(a.out_dir, a.model, a.tokens, rows=a.rows, seed=a.seed), indent=1))


if __name__ == "__main__":
    main()
