"""The model organism: a small GPT-2-style model trained from scratch on the synthetic corpus,
and a CLT trained on it with clt_hub's own trainer. Rebuild everything from seeds with

    python -m paper_cases.organism build      (or: python3 -m nox -s organism)

The results are committed in Hub layout under paper_cases/artifacts/ (model + tokenizer in
`save_pretrained` form; CLT in the native layout with its model card and metrics), so the checks,
tests and the Space load them with `from_pretrained` and never train.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from paper_cases import corpus as corpus_mod

if TYPE_CHECKING:
    from clt_hub.training.config import TrainConfig

ARTIFACTS = Path(__file__).parent / "artifacts"
MODEL_DIR = ARTIFACTS / "model"
CLT_DIR = ARTIFACTS / "clt"
REPORT = ARTIFACTS / "build_report.json"
# Share of training couplets whose line 2 sees line 1 only through the newline (a training-only attention
# mask; the saved model is a plain GPT-2 with full causal attention either way). With it, line 2 follows
# whatever plan the newline holds (`plan` below: 192/192 for the bundled organism); without it, the model
# may recompute the plan from line 1's words at every position of line 2.
BOTTLENECK = 0.5
LM_STEPS = 3000
N_LAYERS = 4


def make_tokenizer(vocab: list[str]) -> Any:
    """Word-level tokenizer: one token per space-separated word (newline included), BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(vocab_size: int, seed: int) -> Any:
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_layer=N_LAYERS, n_embd=128, n_head=4, n_inner=512, vocab_size=vocab_size, n_positions=64,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return T.GPT2LMHeadModel(cfg)


def padded_batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids padded on the right, their 0/1 padding mask, and labels (-100 on padding)."""
    ids = torch.full((len(rows), max(map(len, rows))), pad)
    mask = torch.zeros(ids.shape, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def attention_masks(encoded: list[list[int]], width: int, line1: list[tuple[int, int] | None], hide: torch.Tensor
                    ) -> torch.Tensor:
    """Causal + padding masks (batch, 1, width, width), additive (0 or the dtype's minimum), the form
    every attention implementation takes. Where `hide` is set, line 2 of a couplet (the positions after
    its newline) does not see line 1's words, only the newline: the training bottleneck (BOTTLENECK)."""
    allowed = torch.ones(width, width, dtype=torch.bool).tril().repeat(len(encoded), 1, 1, 1)
    for r, ids in enumerate(encoded):
        allowed[r, 0, :, len(ids):] = False
        span = line1[r]
        if span is not None and hide[r]:
            allowed[r, 0, span[1] + 1:, span[0]:span[1]] = False
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def line1_span(ids: list[int], poem: int, newline: int) -> tuple[int, int] | None:
    """(first word of line 1, position of its newline) for a couplet, else None."""
    if len(ids) < 3 or ids[1] != poem or newline not in ids:
        return None
    return 3, ids.index(newline)  # <bos> poem : | line 1 ... \n | line 2


def train_lm(model: Any, tok: Any, texts: list[str], steps: int, batch: int, seed: int, lr: float = 3e-3,
             bottleneck: float = 0.0) -> list[float]:
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    encoded = [tok(t + " <eos>")["input_ids"] for t in texts]
    poem, newline = tok.convert_tokens_to_ids(["poem", "\n"])
    spans = [line1_span(ids, poem, newline) for ids in encoded]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="organism LM", unit="step")
    for step in bar:
        idx = torch.randint(0, len(encoded), (batch,), generator=g).tolist()
        rows = [encoded[i] for i in idx]
        ids, mask, labels = padded_batch(rows, tok.pad_token_id)
        if bottleneck > 0:
            hide = torch.rand(batch, generator=g) < bottleneck
            mask = attention_masks(rows, ids.shape[1], [spans[i] for i in idx], hide)
        warm = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def greedy(model: Any, tok: Any, prompt: str, max_new: int = 6) -> list[str]:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    words = tok.convert_ids_to_tokens(out[0, ids.shape[1]:].tolist())
    return words[: words.index("<eos>")] if "<eos>" in words else words


def couplet_ok(line2: list[str], line1_end: str) -> bool:
    """Line 2 = two or three lead-in words + an end word of the same family (not line 1's), and the
    lead-in is one the corpus pairs with that end word."""
    if not line2:
        return False
    end = line2[-1]
    fam = corpus_mod.family_of(line1_end)
    words = corpus_mod.RHYMES[fam]
    return end in words and end != line1_end and " ".join(line2[:-1]) in words[end]


def patch_names(n_layers: int) -> tuple[str, ...]:
    """What a newline patch can replace in a model of `n_layers` blocks (see _patched_modules)."""
    return ("hidden", "mlp", *(f"mlp{k}" for k in range(n_layers)))


PATCHES = patch_names(N_LAYERS)


def _patched_modules(model: Any, patch: str) -> dict[int, Any]:
    """Layer -> the module whose output `patch` names: every block ("hidden"), every MLP ("mlp"), or one MLP ("mlp<k>")."""
    blocks = model.transformer.h  # the organism is GPT-2
    valid = patch_names(len(blocks))
    if patch not in valid:
        raise ValueError(f"patch must be one of {', '.join(valid)}, got {patch!r}")
    layers = range(len(blocks)) if patch in ("hidden", "mlp") else [int(patch[3:])]
    return {k: blocks[k] if patch == "hidden" else blocks[k].mlp for k in layers}


@torch.no_grad()
def newline_state(model: Any, tok: Any, text: str, patch: str = "hidden") -> dict[int, torch.Tensor]:
    """The outputs that `patch` names (see _patched_modules) at the last position of `text` (line 1's newline)."""
    ids = torch.tensor([tok(text)["input_ids"]])
    nl = ids.shape[1] - 1
    state: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: state.__setitem__(
        k, (o[0] if isinstance(o, tuple) else o)[:, nl].clone())) for k, m in _patched_modules(model, patch).items()]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return state


@torch.no_grad()
def line2_with_newline_state(model: Any, tok: Any, prompt: str, state: dict[int, torch.Tensor], patch: str = "hidden"
                             ) -> list[str]:
    """Greedy line 2 after `prompt` (ending in line 1's newline), with the outputs that `patch` names
    set to `state` (layer -> vector) at the newline."""
    nl = len(tok(prompt)["input_ids"]) - 1

    def put(out: Any, layer: int) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] > nl:  # the prompt pass; later tokens reuse its cache
            h[:, nl] = state[layer]
        return out

    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: put(o, k)) for k, m in _patched_modules(model, patch).items()]
    try:
        return greedy(model, tok, prompt, max_new=4)
    finally:
        for h in hooks:
            h.remove()


def plan_probe(model: Any, tok: Any, patch: str = "hidden") -> dict[str, int]:
    """Where line 2 gets its end word from: for each line-1 end word and each ordered pair of cues
    naming two other members of its family, write line 2 after cue A's line 1 with the newline's
    state (`patch`, see _patched_modules) from cue B's. If line 2 follows the plan held at the
    newline it ends in B's word; if it recomputes the plan from line 1's words, in A's."""
    counts = {"tried": 0, "follows_newline": 0, "follows_line1": 0, "other": 0, "lead_in_fits_newline": 0}
    for words in corpus_mod.RHYMES.values():
        for w1 in words:
            others = [w for w in words if w != w1]
            line1 = {w: corpus_mod.couplet_prompt(w1, corpus_mod.CUES[w][0]) for w in others}
            donor = {w: newline_state(model, tok, line1[w], patch) for w in others}  # one forward per cue
            for end_a, end_b in itertools.permutations(others, 2):
                line2 = line2_with_newline_state(model, tok, line1[end_a], donor[end_b], patch)
                end = line2[-1] if line2 else ""
                counts["tried"] += 1
                counts["follows_newline"] += end == end_b
                counts["follows_line1"] += end == end_a
                counts["other"] += end not in (end_a, end_b)
                counts["lead_in_fits_newline"] += " ".join(line2[:-1]) in words[end_b]
    return counts


def accuracy(model: Any, tok: Any, heldout: dict[str, list[tuple[str, str]]], limit: int = 300) -> dict[str, dict[str, float]]:
    """Greedy held-out accuracy per task."""
    report: dict[str, dict[str, float]] = {}
    for task, items in heldout.items():
        items = items[:limit]
        good = 0
        carries = carry_good = 0
        for prompt, expected in items:
            out = greedy(model, tok, prompt, max_new=6)
            if task == "couplets":
                ok = couplet_ok(out, prompt.split(" ")[-2]) and out[-1] == expected
            else:
                ok = " ".join(out) == expected
                if task == "addition":
                    a, b = (int(x.replace(" ", "")) for x in prompt.split(":")[1].split("=")[0].split("+"))
                    if a % 10 + b % 10 >= 10:
                        carries += 1
                        carry_good += ok
            good += ok
        report[task] = {"correct": good, "tried": len(items), "accuracy": good / max(1, len(items))}
        if task == "addition":
            report[task]["with_carry"] = carry_good / max(1, carries)
    return report


def write_documents(path: Path, docs: list[str]) -> Path:
    """The CLT's training texts as JSON lines, not .txt: a .txt dataset is one document per line, which
    would cut every couplet at its newline and leave the CLT untrained where the rhyme plan lives."""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def write_texts(texts_dir: Path, corpus: corpus_mod.Corpus, train: list[str] | None = None) -> None:
    """train.jsonl (`train`, default the corpus's training texts) and heldout.jsonl, as clt_config reads them."""
    texts_dir.mkdir(parents=True, exist_ok=True)
    write_documents(texts_dir / "train.jsonl", corpus.train if train is None else train)
    write_documents(texts_dir / "heldout.jsonl", corpus.heldout_text)


def clt_config(model_dir: Path, texts_dir: Path, **overrides: Any) -> TrainConfig:
    """The organism's CLT training settings (texts_dir holds train.jsonl and heldout.jsonl); `overrides`
    replace fields, of the run or of its transcoder (d_sae, kind, skip, ...), so experiments that vary one
    setting share everything else with the build."""
    from dataclasses import fields as dataclass_fields

    from clt_hub.config import Architecture
    from clt_hub.training.config import TrainConfig

    arch_fields = {f.name for f in dataclass_fields(Architecture)}
    transcoder: dict[str, Any] = {"d_sae": 512, **{k: v for k, v in overrides.items() if k in arch_fields}}
    run: dict[str, Any] = dict(
        model=str(model_dir), dataset=str(texts_dir / "train.jsonl"), out_dir=str(texts_dir / "clt_run"),
        n_tokens=1_000_000, batch_size=1024, lr=2e-3, context_size=64, sparsity_coeff=2e-3, sparsity_warmup_fraction=0.3,
        preact_coeff=3e-6, threshold_init=0.1, warmup_steps=50, checkpoint_every=200, log_every=20, seed=0,
        buffer_tokens=65536, eval_dataset=str(texts_dir / "heldout.jsonl"), eval_tokens=5000)
    run.update({k: v for k, v in overrides.items() if k not in arch_fields})
    return TrainConfig(**run, transcoder=Architecture(**transcoder))


def build(seed: int = 0, lm_steps: int = LM_STEPS, clt_tokens: int = 1_000_000, d_sae: int = 512,
          out: Path = ARTIFACTS, sparsity_coeff: float = 2e-3, clt_only: bool = False,
          bottleneck: float = BOTTLENECK) -> dict[str, Any]:
    """Corpus -> model (skipped with `clt_only`, which retrains only the CLT on the saved model) -> CLT."""
    from clt_hub.training.run import train

    t0 = time.perf_counter()
    corpus = corpus_mod.build(seed)
    vocab = corpus_mod.vocabulary(corpus)
    if clt_only:
        from clt_hub.config import load_json
        from clt_hub.models.loading import load_model

        model, tok = load_model(str(out / "model"), local_files_only=True)
        previous: Any = {}
        if (out / "build_report.json").exists():
            previous = load_json(out / "build_report.json", what="build report",
                                 fix="delete it, or build without --clt-only")
        if not isinstance(previous, dict):
            previous = {}
        losses = [previous.get("final_lm_loss", float("nan"))] * 100
        lm_steps = previous.get("lm_steps", 0)
        bottleneck = previous.get("bottleneck", 0.0)
        t_lm = previous.get("minutes_lm", 0.0) * 60
    else:
        tok = make_tokenizer(vocab)
        model = make_model(len(vocab), seed)
        losses = train_lm(model, tok, corpus.train, lm_steps, batch=128, seed=seed, bottleneck=bottleneck)
        t_lm = time.perf_counter() - t0
    acc = accuracy(model, tok, corpus.heldout)
    print(json.dumps(acc, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    if not clt_only:
        model.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
    texts_dir = out.parent / ".organism_build"
    write_texts(texts_dir, corpus)
    cfg = clt_config(out / "model", texts_dir, d_sae=d_sae, n_tokens=clt_tokens, sparsity_coeff=sparsity_coeff, seed=seed)
    import shutil

    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    final = train(cfg, model=model, tokenizer=tok)
    from clt_hub import Transcoder

    tc = Transcoder.from_pretrained(final)
    tc.cfg.model_name = "clt_hub/organism"
    tc.cfg.dataset_path = f"paper_cases/.organism_build/train.jsonl (paper_cases.corpus, seed {seed})"  # not this machine's path
    tc.save_pretrained(out / "clt")
    for png in ("training_curves.png", "layers.png"):
        if (Path(cfg.out_dir) / png).exists():
            shutil.copy(Path(cfg.out_dir) / png, out / f"clt_{png}")
    report = {"seed": seed, "lm_steps": lm_steps, "bottleneck": bottleneck, "final_lm_loss": sum(losses[-100:]) / 100, "heldout": acc,
              "clt_metrics": tc.cfg.metrics, "minutes_lm": round(t_lm / 60, 2),
              "minutes_total": round((time.perf_counter() - t0) / 60, 2)}
    (out / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build", "accuracy", "plan"],
                    help="build: rebuild from seeds; accuracy: held-out accuracy of the saved model; "
                         "plan: does line 2 follow the plan held at the newline (patching probe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-steps", type=int, default=LM_STEPS)
    ap.add_argument("--clt-tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--sparsity-coeff", type=float, default=2e-3)
    ap.add_argument("--bottleneck", type=float, default=BOTTLENECK,
                    help="share of training couplets whose line 2 sees line 1 only through the newline")
    ap.add_argument("--clt-only", action="store_true", help="keep the saved model; retrain only the CLT")
    ap.add_argument("--out", type=Path, default=ARTIFACTS)
    ap.add_argument("--patch", choices=PATCHES, default="hidden",
                    help="plan: what is patched at the newline (every block's output, every MLP's, or one MLP's)")
    args = ap.parse_args()
    if args.command == "build":
        build(args.seed, args.lm_steps, args.clt_tokens, args.d_sae, args.out, args.sparsity_coeff, args.clt_only,
              args.bottleneck)
    else:
        from clt_hub.models.loading import load_model

        model, tok = load_model(str(args.out / "model"), local_files_only=True)
        if args.command == "plan":
            print(json.dumps(plan_probe(model, tok, args.patch), indent=1))
        else:
            print(json.dumps(accuracy(model, tok, corpus_mod.build(args.seed).heldout), indent=1))


if __name__ == "__main__":
    main()
