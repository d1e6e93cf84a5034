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

from clt_hub.models.loading import load_model
from paper_cases import corpus, organism, rhyme

SCALES = (1.0, 0.0, -1.0, -2.0)


def main(model_dir: str) -> None:
    model, tok = load_model(model_dir, local_files_only=True)
    switched = dict.fromkeys(SCALES, 0)
    tried = 0
    for family, words in corpus.RHYMES.items():
        members = list(words)
        for j in range(2):
            w1, planned = members[j], members[j + 1]
            cued = rhyme.organism_line(family, j)  # line 1 ends in w1, its cue names `planned`
            plain = organism.newline_state(model, tok, corpus.couplet_prompt(w1), "mlp0")[0]
            full = organism.newline_state(model, tok, cued, "mlp0")[0]
            delta = full - plain
            row = [f"norms: no cue {plain.norm():.0f}, cued {full.norm():.0f}, cue adds {delta.norm():.0f}"]
            for s in SCALES:
                line2 = organism.line2_with_newline_state(model, tok, cued, {0: plain + s * delta}, "mlp0")
                switched[s] += organism.couplet_ok(line2, w1) and line2[-1] != planned
                row.append(f"{s:+.0f}: {' '.join(line2)}")
            tried += 1
            print(f"{w1} (cue -> {planned}) | " + " | ".join(row), flush=True)
    print(f"line 2 ends in another word of the family, of {tried}: "
          + ", ".join(f"s={s:+.0f}: {n}" for s, n in switched.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(organism.MODEL_DIR))
