"""Is the organism's plan a direction the model reads linearly, and do the CLT's features line up with it?

1. Model only. Over the 192 cued line-1s, the plan direction of end word w is the mean of layer 0's
   MLP output at the newline over lines that plan w, minus the mean over its rhyme family's words.
   Suppress: subtract s times the planned word's direction. Inject: add s times (another family's
   planned word's mean minus this one's). Judged as the rhyme check judges (another valid word of
   the family; a valid line ending in the other family).
2. Model only. Is "plans w" linearly separable at layer 0's MLP input at the newline (over all
   2880 cued line-1s, every subject and verb)? One-vs-rest logistic fit, margin > 0 = separable;
   if so, one ReLU feature per planned word could detect it.
3. The CLT. For the check's lines: how much of the state's component along the plan direction the
   check's group writes, how much it writes off that direction, and how many of the newline's
   active layer-0 features hold 80% of what all of them write along it.
4. The CLT, by activation statistics instead of the graph: features of a planned word (active at the
   newline on at least 90% of the lines that plan it, on at most 10% of those that plan any other).
   Ablating or reversing (x -2) a planned word's features, and swapping in another family's word's
   features at their mean value, each counted as in 1.

    PYTHONPATH=. python docs/experiments/plan_direction.py [DIR]   (about 1 min)

DIR holds model/ and clt/ as the organism build writes them (default: the bundled organism).
"""

from __future__ import annotations

import sys

import torch

from clt_hub.attribution.interventions import Intervention, intervene
from paper_cases import common, corpus, organism, rhyme

SCALES = (1.0, 1.5, 2.0)
N_LINES = 16


def _mlp0(subject: common.Subject, text: str) -> torch.Tensor:
    """Layer 0's MLP output at the newline that ends `text`."""
    return organism.newline_state(subject.model, subject.tokenizer, text, "mlp0")[0][0]


def _means(subject: common.Subject) -> dict[str, torch.Tensor]:
    states: dict[str, list[torch.Tensor]] = {}
    for w1, cue in corpus.cued_lines():
        states.setdefault(corpus.CUE_WORD[cue], []).append(_mlp0(subject, corpus.couplet_prompt(w1, cue)))
    return {w: torch.stack(v).mean(0) for w, v in states.items()}


def _direction(means: dict[str, torch.Tensor], word: str) -> torch.Tensor:
    family = [word, *rhyme.organism_rivals(word)]
    return means[word] - torch.stack([means[w] for w in family]).mean(0)


def steer(subject: common.Subject, means: dict[str, torch.Tensor]) -> None:
    model, tok = subject.model, subject.tokenizer
    for s in SCALES:
        sup = inj = both = 0
        for prompt, other in rhyme.organism_lines(N_LINES):
            w1, ow1 = prompt.split()[-1], other.split()[-1]
            state = organism.newline_state(model, tok, prompt, "mlp0")[0]
            planned = organism.line2_with_newline_state(model, tok, prompt, {0: state}, "mlp0")[-1]
            other_planned = organism.line2_with_newline_state(
                model, tok, other, organism.newline_state(model, tok, other, "mlp0"), "mlp0")[-1]
            down = organism.line2_with_newline_state(
                model, tok, prompt, {0: state - s * _direction(means, planned)}, "mlp0")
            swap = organism.line2_with_newline_state(
                model, tok, prompt, {0: state + s * (means[other_planned] - means[planned])}, "mlp0")
            ok_sup = organism.couplet_ok(down, w1) and down[-1] != planned
            ok_inj = rhyme.organism_judge(w1, swap, family_of_end=ow1)
            sup, inj, both = sup + ok_sup, inj + ok_inj, both + (ok_sup and ok_inj)
            if s == SCALES[-1]:
                print(f"  {w1} -> {planned}: suppressed '{' '.join(down)}', injected {other_planned}: '{' '.join(swap)}'")
        print(f"s = {s}: suppression gives another valid word of the family {sup}/{N_LINES}, "
              f"injection moves line 2 into the other family {inj}/{N_LINES}, both {both}/{N_LINES}")


def separability(subject: common.Subject) -> None:
    model, tok = subject.model, subject.tokenizer
    words = list(corpus.CUES)
    seen: dict[str, torch.Tensor] = {}
    hook = model.transformer.h[0].mlp.register_forward_pre_hook(
        lambda _m, a: seen.__setitem__("x", a[0][0, -1].detach()))
    xs, ys = [], []
    try:
        with torch.no_grad():
            for w1, cue in corpus.cued_lines():
                for subj in corpus.SUBJECTS:
                    for verb in corpus.LINE1_VERBS:
                        model(torch.tensor([tok(corpus.couplet_prompt(w1, cue, subj, verb))["input_ids"]]))
                        xs.append(seen["x"])
                        ys.append(words.index(corpus.CUE_WORD[cue]))
    finally:
        hook.remove()
    x = torch.stack(xs)
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    labels = torch.tensor(ys)
    margins = []
    torch.manual_seed(0)
    for k in range(len(words)):
        y = (labels == k).float() * 2 - 1
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(400):
            loss = torch.nn.functional.softplus(-y * (x @ w + b)).mean() + 1e-4 * w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = (x @ w + b) / w.norm()
            margins.append(float(score[y > 0].min() - score[y < 0].max()))
    print(f"'plans w' separable at layer 0's MLP input for {sum(m > 0 for m in margins)}/{len(words)} words "
          f"({len(xs)} lines; margins {min(margins):.2f} to {max(margins):.2f} in standardised units)")


@torch.no_grad()
def clt_alignment(subject: common.Subject, means: dict[str, torch.Tensor]) -> None:
    model, tc = subject.model, subject.transcoder
    write0 = tc.decoder_rows(0)[:, 0]  # layer-0 features' writes into layer 0's MLP output
    stop = rhyme.line_break(subject)
    for prompt, _ in rhyme.organism_lines(N_LINES):
        ids = subject.ids(prompt)
        nl = len(ids) - 1
        new = common.continuation_ids(subject, ids, [], 3, stop)
        planned = subject.word(int(new[-1]))
        d = _direction(means, planned)
        unit = d / d.norm()
        _, group = rhyme.plan_group(subject, ids, new)
        acts = intervene(model, tc, ids, [], mode="open").original_activations[nl, 0]
        state = _mlp0(subject, prompt)
        g = torch.zeros_like(d)
        for layer, _, f in group:
            if layer == 0:
                g = g + acts[f] * write0[f]
        along = acts * (write0 @ unit)
        cum = along.sort(descending=True).values.cumsum(0) / along.sum()  # of what all of them write along it
        print(f"  {planned:8s} |direction| {d.norm():4.1f}, state along it {state @ unit:4.1f}; group ({len(group)}) "
              f"writes {g @ unit:4.1f} along, {(g - (g @ unit) * unit).norm():4.1f} off it; 80% of what the features "
              f"write along it needs {int((cum < 0.8).sum()) + 1} of {int((acts > 0).sum())} active layer-0 features")


@torch.no_grad()
def word_features(subject: common.Subject, means: dict[str, torch.Tensor]) -> None:
    tc = subject.transcoder
    write0 = tc.decoder_rows(0)[:, 0]
    shares = []
    acts: dict[str, list[torch.Tensor]] = {}
    at_newline: dict[str, torch.Tensor] = {}  # cued line 1 -> its activations at the newline
    for w1, cue in corpus.cued_lines():
        prompt = corpus.couplet_prompt(w1, cue)
        ids = subject.ids(prompt)
        at_newline[prompt] = intervene(subject.model, tc, ids, [], mode="open").original_activations[len(ids) - 1]
        acts.setdefault(corpus.CUE_WORD[cue], []).append(at_newline[prompt])
    words = list(acts)
    freq = torch.stack([(torch.stack(acts[w]) > 0).float().mean(0) for w in words])  # [word, layer, feature]
    mean = {w: torch.stack(acts[w]).mean(0) for w in words}
    own = {}
    for i, w in enumerate(words):
        others = torch.cat([freq[:i], freq[i + 1:]]).max(0).values
        own[w] = [tuple(x) for x in ((freq[i] >= 0.9) & (others <= 0.1)).nonzero().tolist()]
    by_layer = [sum(1 for v in own.values() for layer, _ in v if layer == k) for k in range(tc.n_layers)]
    print(f"{sum(bool(v) for v in own.values())}/{len(words)} planned words have features of their own "
          f"({sum(by_layer)} in all; by layer {by_layer})")
    stop = rhyme.line_break(subject)
    counts = {"ablated": 0, "x -2": 0, "injected": 0}
    for prompt, other in rhyme.organism_lines(N_LINES):
        ids = subject.ids(prompt)
        nl = len(ids) - 1
        w1, ow1 = prompt.split()[-1], other.split()[-1]
        planned = subject.word(int(common.continuation_ids(subject, ids, [], 3, stop)[-1]))
        other_planned = subject.word(int(common.continuation_ids(subject, subject.ids(other), [], 3, stop)[-1]))
        off = [Intervention(l, f, nl, value=0.0) for l, f in own[planned]]
        d = _direction(means, planned)
        unit = d / d.norm()
        a0 = at_newline[prompt][0]
        state = _mlp0(subject, prompt)
        shares.append(sum(float(a0[f] * (write0[f] @ unit)) for l, f in own[planned] if l == 0) / float(state @ unit))
        runs = {"ablated": off, "x -2": [Intervention(l, f, nl, scale=-2.0) for l, f in own[planned]],
                "injected": off + [Intervention(l, f, nl, value=float(mean[other_planned][l, f]))
                                   for l, f in own[other_planned]]}
        for name, ivs in runs.items():
            line2 = [w for w in subject.tokens(common.continuation_ids(subject, ids, ivs, 3, stop)) if w != "\n"]
            if name == "injected":
                counts[name] += rhyme.organism_judge(w1, line2, family_of_end=ow1)
            else:
                counts[name] += organism.couplet_ok(line2, w1) and line2[-1] != planned
    print(f"in layer 0 they write {min(shares):.0%} to {max(shares):.0%} of the state's component along the plan direction (layer 0's MLP output); "
          + ", ".join(f"{k}: {v}/{N_LINES}" for k, v in counts.items()))


def main(folder: str | None) -> None:
    subject = common.load_artifacts(folder)
    means = _means(subject)
    print("1. steering the model along the plan direction (layer 0's MLP output at the newline)")
    steer(subject, means)
    print("2. is the plan linearly readable where layer 0's MLP reads?")
    separability(subject)
    print("3. the CLT: the check's group against the plan direction")
    clt_alignment(subject, means)
    print("4. the CLT: features of one planned word, found from activations")
    word_features(subject, means)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
