"""Does the organism hold its plan the way the paper's model does, as something that can be pushed down
while the rhyme stays? Measured on the model alone, without a transcoder: at the newline, layer 0's
MLP output (where the plan lives) is set to the same line without its cue, plus s times what the cue
adds (s = 1: unchanged; 0: no cue; -1, -2: the cue's contribution reversed). Counts how often line 2
is then still a valid line of line 1's family ending in another word than the planned one.

    PYTHONPATH=. python docs/experiments/cue_delta.py [MODEL_DIR]

The rhyme check's interventions act on CLT features of the cued line alone; this shows what a group
that held exactly the cue's contribution could do.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from clt_hub.trace import load_model
from paper_cases import corpus, organism

SCALES = (1.0, 0.0, -1.0, -2.0)


@torch.no_grad()
def mlp0_at_newline(model: Any, tok: Any, prompt: str) -> torch.Tensor:
    got: dict[str, torch.Tensor] = {}
    hook = model.transformer.h[0].mlp.register_forward_hook(lambda _m, _i, o: got.__setitem__("out", o[0, -1].clone()))
    try:
        model(torch.tensor([tok(prompt)["input_ids"]]))
    finally:
        hook.remove()
    return got["out"]


def line2_with_mlp0(model: Any, tok: Any, prompt: str, value: torch.Tensor) -> list[str]:
    nl = len(tok(prompt)["input_ids"]) - 1

    def put(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] > nl:  # the prompt pass; later tokens reuse its cache
            out[:, nl] = value
        return out

    hook = model.transformer.h[0].mlp.register_forward_hook(put)
    try:
        return organism.greedy(model, tok, prompt, max_new=4)
    finally:
        hook.remove()


def main(model_dir: str) -> None:
    model, tok = load_model(model_dir, local_files_only=True)
    switched = dict.fromkeys(SCALES, 0)
    tried = 0
    for words in corpus.RHYMES.values():
        members = list(words)
        for j in range(2):
            w1, planned = members[j], members[j + 1]
            cued = corpus.couplet_prompt(w1, corpus.CUES[planned][0])
            plain = mlp0_at_newline(model, tok, corpus.couplet_prompt(w1))
            full = mlp0_at_newline(model, tok, cued)
            delta = full - plain
            row = [f"norms: no cue {plain.norm():.0f}, cued {full.norm():.0f}, cue adds {delta.norm():.0f}"]
            for s in SCALES:
                line2 = line2_with_mlp0(model, tok, cued, plain + s * delta)
                switched[s] += organism.couplet_ok(line2, w1) and line2[-1] != planned
                row.append(f"{s:+.0f}: {' '.join(line2)}")
            tried += 1
            print(f"{w1} (cue -> {planned}) | " + " | ".join(row), flush=True)
    print(f"line 2 ends in another word of the family, of {tried}: "
          + ", ".join(f"s={s:+.0f}: {n}" for s, n in switched.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(organism.MODEL_DIR))
