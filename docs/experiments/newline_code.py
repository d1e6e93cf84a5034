"""What kind of code the CLT uses for the plan at line 1's newline: dense features shared by many
planned words, or features of one word each?

1. Per layer, over held-out text: L0 and how many features fire on more than DENSE_FRACTION of tokens.
2. Over the cued line-1s: the share of what the newline's active layer-0 features write (summed
   norms of activation x decoder into layer 0's MLP output) that comes from those dense features.
3. The 12 layer-0 features that write most at the newline over all cued lines: how their write is
   spread over the 32 planned words (share of the top 2 and top 4 words; one word alone would be 1.0).

    PYTHONPATH=. python docs/experiments/newline_code.py [DIR]   (about 1 min)

DIR holds model/ and clt/ as the organism build writes them (default: the bundled organism).
"""

from __future__ import annotations

import random
import sys

import torch

from clt_hub.attribution.interventions import intervene
from clt_hub.training.evaluate import DENSE_FRACTION
from paper_cases import common, corpus


def _acts(subject: common.Subject, text: str) -> torch.Tensor:
    """[T, layers, features] activations of the CLT on `text`."""
    return intervene(subject.model, subject.transcoder, subject.ids(text), [], mode="open").original_activations


@torch.no_grad()
def main(folder: str | None) -> None:
    subject = common.load_artifacts(folder)
    tc = subject.transcoder
    texts = random.Random(1).sample(corpus.build(0).heldout_text, 200)
    fired = torch.zeros(tc.n_layers, tc.d_sae)
    n = 0
    for text in texts:
        a = _acts(subject, text)
        fired += (a > 0).float().sum(0)
        n += a.shape[0]
    dense = fired / n > DENSE_FRACTION
    print(f"1. L0 per layer {[round(float(x), 1) for x in (fired / n).sum(-1)]}; features firing on more than "
          f"{DENSE_FRACTION:.0%} of tokens per layer {dense.sum(-1).tolist()} of {tc.d_sae}")

    words = [w for family in corpus.RHYMES.values() for w in family]
    write0 = tc.decoder_rows(0)[:, 0].norm(dim=-1)  # layer-0 features' write into layer 0's MLP output
    per_word = torch.zeros(len(words), tc.d_sae)
    shares = []
    for w1, cue in corpus.cued_lines():
        a = _acts(subject, corpus.couplet_prompt(w1, cue))[-1, 0]
        w = a.clamp(min=0) * write0
        shares.append(float(w[dense[0]].sum() / w.sum()))
        per_word[words.index(corpus.CUE_WORD[cue])] += w
    print(f"2. share of the newline's layer-0 write from dense features: {min(shares):.2f} to {max(shares):.2f} "
          f"(mean {sum(shares) / len(shares):.2f}, {len(shares)} cued line-1s)")
    print("3. the layer-0 features that write most at the newline, spread over planned words:")
    for f in per_word.sum(0).argsort(descending=True)[:12].tolist():
        spread = per_word[:, f] / per_word[:, f].sum()
        top = spread.argsort(descending=True)[:4].tolist()
        print(f"  feature {f:4d} ({'dense' if dense[0, f] else 'sparse'}): top 2 words {spread[top[:2]].sum():.2f}, "
              f"top 4 {spread[top].sum():.2f} ({', '.join(words[t] for t in top)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
