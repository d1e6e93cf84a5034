"""Does the CLT training objective itself prefer the mixed code that every trained dictionary uses for
the rhyme plan at line 1's newline, or would it score a per-word code better (issue 26)?

Builds a per-word alternative for layer 0 of a CLT and scores both with the trainer's own loss
(Trainer.loss_terms: reconstruction MSE, tanh sparsity penalty, pre-activation penalty, with
organism.clt_config's coefficients and the sparsity coefficient at its full value), in the trainer's
units: inputs and targets scaled per layer by the scales the trainer fits on its first batch
(recomputed from that batch; the artifact has them folded in, so they are unfolded here).

The per-word dictionary is a copy of the CLT in which 32 layer-0 features are replaced: the 32 whose
removal alone costs the loss least on the training sample (none of layer 0's is dead). Feature w:
- encoder: a one-vs-rest logistic probe for "line 2 will end in w" on layer 0's MLP input (what a
  layer-0 encoder reads), fitted on the cued couplet newlines of SAMPLE_TEXTS training texts with every
  other token as a negative (a random 10000, plus those scoring high, mined twice). It is cut halfway
  between its lowest score on a line that plans w and its highest on any other token, and scaled so
  that the feature fires with 1 to 1.5 on its lines (JumpReLU threshold 1) and nowhere else in the
  sample. Uncued lines plan no given word and are left out.
- decoders: the mean over lines that plan w of what the CLT's layer-0 features write to layers 0-3 at
  the newline, minus the mean of that over w's rhyme family (plan_direction.py's plan direction; the
  family part stays with the rest of the dictionary), per unit of activation. `--baseline overall`
  subtracts the mean over all cued lines instead, so the feature also writes its family's part.
The rest of the dictionary still writes the plan too, so both dictionaries are refitted the same way:
STEPS steps of Trainer.train_step (the organism's lr, warmup and final decay, the sparsity coefficient
at its full value) on the same batches of the training sample, everything trainable except the plan
features' encoders (their decoders refit with the rest). The control is the bundled CLT given the
same steps, so the refit itself is not what wins (the bundled CLT, trained on 1M tokens, gains from it
too). At 300 steps the per-word refit has not yet undone the double write (its newline loss is 40%
above the control's; 4.5% at 1000 and at 2500 steps), hence 1000.

Scored on held-out tokens, as the issue asks: the newlines of the held-out couplets (the (cue,
line-1 word) pairs corpus.build holds out, with every subject and verb) and every token of
heldout.jsonl; and on training texts the refit never saw (the last EVAL_TEXTS), whose mix of tokens
is what the objective is minimised over. Then the rhyme check on the refitted per-word dictionary.

    PYTHONPATH=. python docs/experiments/per_word_code.py [DIR] [--steps N] [-n LINES] [--baseline overall]

DIR holds model/ and clt/ as the organism build writes them (default: the bundled organism). About
12 min on 2 busy cores (the two refits 5 min, the rhyme check 3); `--steps 300 -n 0` about 4.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import torch

from clt_hub.models.hooks import mlp_io
from clt_hub.texts import SkippedRecords
from clt_hub.training.run import _batches
from clt_hub.training.trainer import Trainer
from clt_hub.transcoders.transcoder import Transcoder
from paper_cases import common, corpus, organism, rhyme
from paper_cases.__main__ import run_case

WORDS = list(corpus.CUES)      # the 32 planned words
SAMPLE_TEXTS = 20000           # training texts whose activations fit the probes and feed the refit
EVAL_TEXTS = 3000              # the last training texts, not in that sample: scored as the objective's own mix
STEPS = 1000                   # refit steps (batches of organism.clt_config's batch_size)
THRESHOLD = 1.0                # plan features: JumpReLU threshold; they fire with 1 to 1 + SPREAD
SPREAD = 0.5
OTHER, UNCUED = -1, -2         # token labels besides a planned word's index


@torch.no_grad()
def activations(subject: common.Subject, texts: list[str], batch: int = 256
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs [N, L, d] of every token the trainer trains on (BOS dropped), and each
    token's label: the planned word's index at a cued couplet's newline, UNCUED at an uncued one, else OTHER."""
    tok = subject.tokenizer
    newline = tok.convert_tokens_to_ids("\n")
    special = torch.tensor(tok.all_special_ids)
    xs, ys, labels = [], [], []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        rows = [tok(t)["input_ids"] for t in chunk]
        ids, mask, _ = organism.padded_batch(rows, tok.pad_token_id)
        x, y = mlp_io(subject.model, ids, attention_mask=mask)
        label = torch.full(ids.shape, OTHER)
        for r, text in enumerate(chunk):
            if text.startswith("poem :"):
                cues = [w for w in text.split(" \n ")[0].split() if w in corpus.CUE_WORD]
                label[r, rows[r].index(newline)] = WORDS.index(corpus.CUE_WORD[cues[0]]) if cues else UNCUED
        keep = mask.bool() & ~torch.isin(ids, special)
        xs.append(x[keep])
        ys.append(y[keep])
        labels.append(label[keep])
    return torch.cat(xs), torch.cat(ys), torch.cat(labels)


def heldout_newlines() -> list[str]:
    """Line 1s of the (cue, line-1 word) pairs the corpus holds out, with every subject and verb."""
    out = []
    for prompt, _ in corpus.build(0).heldout["couplets"]:
        words = prompt.split()
        cue, end = words[words.index("and") - 1], words[-2]
        out += [corpus.couplet_prompt(end, cue, s, v) for s in corpus.SUBJECTS for v in corpus.LINE1_VERBS]
    return out


@torch.no_grad()
def into_trainer(trainer: Trainer, tc: Any) -> None:
    """Load an exported transcoder into the trainer's units (the inverse of Trainer.export)."""
    s_in, s_out = trainer.scale_in, trainer.scale_out
    for l in range(tc.n_layers):
        targets = list(tc.cfg.target_layers(l))
        trainer.tc.W_enc[l].copy_(tc.W_enc[l] / s_in[l])
        trainer.tc.b_enc[l].copy_(tc.b_enc[l])
        trainer.tc.threshold[l].copy_(tc.threshold[l])
        trainer.tc.W_dec[l].copy_(tc.W_dec[l] * s_out[targets][None, :, None])
        trainer.tc.b_dec[l].copy_(tc.b_dec[l] * s_out[l])


@torch.no_grad()
def score(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """The trainer's loss terms (each times its coefficient), FVU, L0 per layer and at layer 0, over raw (x, y)."""
    s_in, s_out = trainer.scale_in[None, :, None], trainer.scale_out[None, :, None]
    sums: dict[str, float] = {}
    err = torch.zeros(trainer.n_layers)
    for i in range(0, len(x), chunk):
        t = trainer.loss_terms(x[i:i + chunk] * s_in, y[i:i + chunk] * s_out)
        n = len(x[i:i + chunk])
        fired = (t["acts"] > 0).float().sum(-1)                 # [B, L]
        for key, value in (("mse", t["mse"]), ("sparsity", t["lam"] * t["sparsity"]),
                           ("preact", trainer.cfg.preact_coeff * t["preact"]), ("loss", t["loss"]),
                           ("l0", fired.mean()), ("l0 layer 0", fired[:, 0].mean())):
            sums[key] = sums.get(key, 0.0) + float(value) * n
        err += t["err"].sum(0)
    out = {k: v / len(x) for k, v in sums.items()}
    ys = y * s_out
    out["fvu"] = float(err.sum() / (ys - ys.mean(0)).pow(2).sum())
    return out


@torch.no_grad()
def removal_cost(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per layer-0 feature: how much the loss on (x, y) rises when that feature alone is zeroed."""
    cfg, tc = trainer.cfg, trainer.tc
    dec = tc.W_dec[0].flatten(1)                               # [F, L * d]
    norms = dec.norm(dim=-1)
    cost = torch.zeros(len(dec))
    for i in range(0, len(x), chunk):
        xs = x[i:i + chunk] * trainer.scale_in[None, :, None]
        ys = y[i:i + chunk] * trainer.scale_out[None, :, None]
        t = trainer.loss_terms(xs, ys)
        a = t["acts"][:, 0]
        e = (t["recon"] - ys).flatten(1)                       # every layer that layer 0 writes to
        cost += (a.square() * norms.square() - 2 * a * (e @ dec.T)).sum(0)
        cost -= t["lam"] * torch.tanh(cfg.sparsity_c * a * norms).sum(0)
        cost -= cfg.preact_coeff * (torch.relu(tc.threshold[0] - t["pre"][:, 0]) * norms).sum(0)
    return cost / len(x)


@torch.enable_grad()
def probes(x0: torch.Tensor, labels: torch.Tensor, rounds: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes for the planned word on layer 0's MLP input (raw units): scores
    x0 @ W + b [.., 32]. Positives: the cued newlines that plan the word; negatives: the other cued
    newlines and the other tokens (a random 10000, then those scoring high for any word, mined again
    each round). Uncued newlines are left out: which word they plan is not given."""
    cued = labels >= 0
    mu, sd = x0[cued].mean(0), x0[cued].std(0).clamp(min=1e-6)
    z_all = (x0 - mu) / sd
    others = (labels == OTHER).nonzero()[:, 0]
    negatives = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:10000]]
    w = torch.zeros(x0.shape[1], len(WORDS), requires_grad=True)
    b = torch.zeros(len(WORDS), requires_grad=True)
    for _ in range(rounds):
        z = torch.cat([z_all[cued], z_all[negatives]])
        lab = torch.cat([labels[cued], labels[negatives]])
        target = torch.where(lab[:, None] == torch.arange(len(WORDS)), 1.0, -1.0)
        weight = torch.where(lab >= 0, 0.5 / int(cued.sum()), 0.5 / len(negatives))[:, None]
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(300):
            loss = (torch.nn.functional.softplus(-target * (z @ w + b)) * weight).sum() / len(WORDS) + 1e-4 * w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            hard = others[(z_all[others] @ w + b > -2).any(1)]
            negatives = torch.unique(torch.cat([negatives, hard]))
    w, b = w.detach() / sd[:, None], b.detach() - (mu / sd) @ w.detach()
    return w, b


@torch.no_grad()
def per_word(tc: Any, trainer: Trainer, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, family: bool = True
             ) -> tuple[Any, torch.Tensor]:
    """A copy of `tc` (exported units) with the 32 cheapest layer-0 features replaced by plan features
    (see the module's docstring); returns it and the replaced feature ids (in WORDS order)."""
    slots = removal_cost(trainer, x, y).argsort()[:len(WORDS)]
    w, b = probes(x[:, 0], labels)
    scores = x[:, 0] @ w + b
    new = copy.deepcopy(tc)
    cued = labels >= 0
    acts0 = tc.encode_layer(x[cued, 0], 0)
    write = torch.einsum("nf,ftd->ntd", acts0, tc.W_dec[0])     # layer-0 features' write at cued newlines
    means = torch.stack([write[labels[cued] == k].mean(0) for k in range(len(WORDS))])
    if family:  # plan_direction.py's plan direction: the word's mean minus its rhyme family's
        base = {word: torch.stack([means[WORDS.index(v)] for v in corpus.RHYMES[corpus.family_of(word)]]).mean(0)
                for word in WORDS}
    else:
        base = {word: write.mean(0) for word in WORDS}
    for k, f in enumerate(slots.tolist()):
        pos = scores[labels == k, k]
        cut = (pos.min() + scores[(labels != k) & (labels != UNCUED), k].max()) / 2
        s = SPREAD / (pos.max() - cut)
        new.W_enc[0][f] = s * w[:, k]
        new.b_enc[0][f] = THRESHOLD + s * (b[k] - cut)
        new.threshold[0][f] = THRESHOLD
        a = THRESHOLD + s * (pos - cut)
        new.W_dec[0][f] = (means[k] - base[WORDS[k]]) / a.mean()
    return new, slots


def trainer_for(cfg: Any, tc: Any, scales: tuple[torch.Tensor, torch.Tensor]) -> Trainer:
    trainer = Trainer(cfg, tc.n_layers, tc.d_model)
    trainer.scale_in, trainer.scale_out = scales
    into_trainer(trainer, tc)
    return trainer


def refit(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, steps: int, frozen: dict[str, torch.Tensor]) -> None:
    """`steps` of Trainer.train_step on batches of (x, y) in a fixed order; rows `frozen[name]` of the
    layer-0 parameters named there get no gradient (Adam then leaves them exactly as they are)."""
    hooks = [getattr(trainer.tc, name)[0].register_hook(lambda g, rows=rows: g.index_fill(0, rows, 0.0))
             for name, rows in frozen.items()]
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(steps * trainer.cfg.batch_size // len(x) + 1)])
    batch = trainer.cfg.batch_size
    try:
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            trainer.train_step(x[idx], y[idx])
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def firing(tc: Any, slots: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor) -> str:
    """Where the plan features fire."""
    fired = tc.encode_layer(x0, 0)[:, slots] > 0
    cued = labels >= 0
    own = int(fired[cued].gather(1, labels[cued][:, None]).sum())
    return (f"own plan at {own}/{int(cued.sum())} cued newlines, another plan's feature {int(fired[cued].sum()) - own} "
            f"times, at {int(fired[labels == UNCUED].any(1).sum())}/{int((labels == UNCUED).sum())} uncued newlines, "
            f"on {int(fired[labels == OTHER].any(1).sum())}/{int((labels == OTHER).sum())} other tokens")


@torch.no_grad()
def plan_share(tc: Any, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> float:
    """At cued newlines: the plan features' share of what layer 0's features write into layer 0's MLP
    output along the plan direction (plan_direction.py's: the word's mean output minus its family's)."""
    cued = labels >= 0
    means = torch.stack([y[labels == k, 0].mean(0) for k in range(len(WORDS))])
    family = {k: [WORDS.index(v) for v in corpus.RHYMES[corpus.family_of(w)]] for k, w in enumerate(WORDS)}
    unit = torch.stack([means[k] - means[family[k]].mean(0) for k in range(len(WORDS))])
    unit = unit / unit.norm(dim=-1, keepdim=True)
    a = tc.encode_layer(x[cued, 0], 0)
    along = a * (tc.W_dec[0][:, 0] @ unit.T).T[labels[cued]]      # [n, F]: each feature's write along its line's direction
    return float(along[:, slots].sum() / along.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="holds model/ and clt/ (default: the bundled organism)")
    ap.add_argument("--steps", type=int, default=STEPS, help="refit steps for both dictionaries")
    ap.add_argument("-n", type=int, default=16, help="rhyme check lines on the per-word dictionary (0: skip it)")
    ap.add_argument("--baseline", choices=["family", "overall"], default="family",
                    help="plan features write the word's mean minus its family's (default) or minus all lines'")
    ap.add_argument("--out", type=Path, default=common.OUT / "per_word_code")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the refits' numbers then do not depend on the core count (2 threads move them by ~1%)
    t0 = time.perf_counter()
    subject = common.load_artifacts(args.folder)
    tc = subject.transcoder
    model_dir = Path(args.folder, "model") if args.folder else organism.MODEL_DIR
    c = corpus.build(0)
    organism.write_texts(args.out / "texts", c)
    cfg = organism.clt_config(model_dir, args.out / "texts", out_dir=str(args.out / "run"), sparsity_warmup_fraction=0.0)
    cfg = dataclasses.replace(cfg, n_tokens=args.steps * cfg.batch_size)  # the lr schedule spans the refit
    first = Trainer(cfg, tc.n_layers, tc.d_model)
    # _batches is a generator (typed as an Iterator), so it can be closed
    stream = cast(Generator[tuple[torch.Tensor, torch.Tensor], None, None],
                  _batches(cfg, subject.model, subject.tokenizer, SkippedRecords()))
    first.fit_scales(*next(stream))  # the scales the trainer fitted: on its first batch
    stream.close()
    scales = (first.scale_in, first.scale_out)

    x, y, labels = activations(subject, c.train[:SAMPLE_TEXTS])
    tx, ty, tl = activations(subject, c.train[-EVAL_TEXTS:])
    hx, hy, hl = activations(subject, c.heldout_text)
    nx, ny, nl = activations(subject, heldout_newlines())
    sets = {"held-out pairs, newlines": (nx[nl >= 0], ny[nl >= 0]), "heldout.jsonl, all tokens": (hx, hy),
            "training texts, cued newlines": (tx[tl >= 0], ty[tl >= 0]),
            "training texts, uncued newlines": (tx[tl == UNCUED], ty[tl == UNCUED]),
            "training texts, all tokens": (tx, ty)}
    bundled = trainer_for(cfg, tc, scales)
    pw, slots = per_word(tc, bundled, x, y, labels, family=args.baseline == "family")
    print(f"replaced layer-0 features (cheapest first): {slots.tolist()}")
    print(f"plan features on training texts: {firing(pw, slots, tx[:, 0], tl)}")
    print(f"plan features on held-out text: {firing(pw, slots, torch.cat([nx, hx])[:, 0], torch.cat([nl, hl]))}")
    per = trainer_for(cfg, pw, scales)
    rows = {("bundled", k): score(bundled, *v) for k, v in sets.items()}
    before = score(per, *sets["training texts, cued newlines"])["loss"]
    share = plan_share(pw, slots, tx, ty, tl)
    t1 = time.perf_counter()
    refit(bundled, x, y, args.steps, {})
    refit(per, x, y, args.steps, {name: slots for name in ("W_enc", "b_enc", "threshold")})
    t_refit = time.perf_counter() - t1
    rows.update({("bundled + refit", k): score(bundled, *v) for k, v in sets.items()})
    rows.update({("per-word + refit", k): score(per, *v) for k, v in sets.items()})
    export = Transcoder.from_tensors(dataclasses.replace(tc.cfg, metrics={}), per.export().tensors(),
                                     device=tc.device, dtype=tc.dtype)
    print(f"before the refit the per-word dictionary writes the plan twice: loss {before:.1f} at the training texts' "
          f"cued newlines; refit: {args.steps} steps each, {t_refit:.0f} s")
    print(f"plan features' share of layer 0's write along the plan direction at those newlines: {share:.2f} before "
          f"the refit, {plan_share(export, slots, tx, ty, tl):.2f} after")
    print("\n| tokens | dictionary | MSE | sparsity | pre-act | loss | FVU | L0 per layer | L0 layer 0 |\n|---|---|---|---|---|---|---|---|---|")
    for k in sets:
        for name in ("bundled", "bundled + refit", "per-word + refit"):
            r = rows[(name, k)]
            print(f"| {k} | {name} | {r['mse']:.3f} | {r['sparsity']:.4f} | {r['preact']:.4f} | {r['loss']:.3f} | "
                  f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['l0 layer 0']:.1f} |")
    if args.n:
        folder = args.out / "dictionary"
        export.save_pretrained(folder / "clt")
        if not (folder / "model").exists():
            (folder / "model").symlink_to(model_dir.resolve())
        case = run_case("rhyme", common.load_artifacts(str(folder)), True, None, args.n, args.out / "rhyme")
        suppressed = sum(rhyme.organism_judge(row["line 1 ends"], row["suppressed"].split())
                         and row["suppressed"].split()[-1] != row["line 2"].split()[-1] for row in case.rows)
        injected = sum(rhyme.organism_judge(row["line 1 ends"], row["inject other plan"].split(": ")[1].split(),
                                            family_of_end=row["inject other plan"].split(": ")[0]) for row in case.rows)
        print(f"rhyme check with the per-word dictionary: {case.passed}/{case.tried} (random-group control "
              f"{case.control_passed}/{case.tried}), {case.verdict}; suppression gives another valid word of the family in "
              f"{suppressed}/{case.tried} lines, injection moves line 2 into the other family in {injected}/{case.tried}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
