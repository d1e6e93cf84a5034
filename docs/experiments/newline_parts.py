"""What the model holds at the newline that ends line 1 (model only, no CLT): how much of each MLP's
output there is explained by the planned word, the cue, line 1's end word, or its rhyme family.

Over every cued line 1 of the corpus (line-1 end word x a cue naming another member of its family),
R2 of a label = 1 - (variance left after subtracting each label value's mean) / (total variance);
"a+b" fits the two labels' effects additively. If the planned word explains nearly everything and the
family little, the newline holds which word comes, not "rhymes with line 1's word" plus a choice
among the rhymes, so nothing there is left to fall back on when the plan is taken away.

    PYTHONPATH=. python docs/experiments/newline_parts.py [ARTIFACTS_DIR]

ARTIFACTS_DIR holds model/ and clt/ (default: the bundled organism).
"""

from __future__ import annotations

import sys

import torch

from clt_hub.models.hooks import mlp_io
from paper_cases import common
from paper_cases.corpus import CUE_WORD, couplet_prompt, cued_lines, family_of


def r2(x: torch.Tensor, *labels: list[str], sweeps: int = 20) -> float:
    """Share of the variance of x [n, d] explained by the labels' effects, fitted additively."""
    x = x - x.mean(0)
    effects = [torch.zeros_like(x) for _ in labels]
    for _ in range(sweeps if len(labels) > 1 else 1):  # backfitting: each label's means of what the others leave
        for lab, eff in zip(labels, effects, strict=True):
            rest = x - sum(e for e in effects if e is not eff)
            for value in set(lab):
                rows = [i for i, v in enumerate(lab) if v == value]
                eff[rows] = rest[rows].mean(0)
    residual = x - sum(effects)
    return float(1 - (residual ** 2).sum() / (x ** 2).sum())


def main(folder: str | None) -> None:
    subject = common.load_artifacts(folder)
    lines = cued_lines()
    outs = torch.stack([mlp_io(subject.model, subject.ids(couplet_prompt(w1, cue))[None])[1][0, -1]
                        for w1, cue in lines])  # [lines, layers, d_model] at the newline
    labels = {"planned word": [CUE_WORD[c] for _, c in lines], "cue": [c for _, c in lines],
              "line-1 word": [w for w, _ in lines], "family": [family_of(w) for w, _ in lines]}
    print(f"{len(lines)} cued lines; R2 of each MLP's output at the newline")
    print("layer | norm | " + " | ".join(labels) + " | planned word + line-1 word")
    for layer in range(outs.shape[1]):
        x = outs[:, layer]
        parts = [r2(x, lab) for lab in labels.values()]
        both = r2(x, labels["planned word"], labels["line-1 word"])
        print(f"{layer} | {x.norm(dim=-1).mean():.1f} | " + " | ".join(f"{p:.3f}" for p in parts) + f" | {both:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
