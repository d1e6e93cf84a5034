"""How many CLT features hold the rhyme plan at the newline? For line-1 pairs that differ only in the
cue (same line-1 word, cues naming two other members of its family), set layer-0 features at the
newline to their values on the other-cue line: all of them, then only the k whose value changes most
(times decoder norm). Counts how often line 2 then ends in the other cue's word.

    PYTHONPATH=. python docs/experiments/plan_features.py ARTIFACTS_DIR

ARTIFACTS_DIR holds model/ and clt/ (e.g. paper_cases/artifacts, or a build's --out).
"""

from __future__ import annotations

import itertools
import sys

from clt_hub.attribution.interventions import Intervention, intervene
from paper_cases import common, rhyme
from paper_cases.corpus import CUES, RHYMES, couplet_prompt

KS = (5, 10, 20, 40)


def main(folder: str) -> None:
    subject = common.load_artifacts(folder)
    tc = subject.transcoder
    stop = rhyme.line_break(subject)
    norms = tc.decoder_rows(0).flatten(1).norm(dim=-1)  # each layer-0 feature's decoder, over every layer it writes
    hits = {"all": 0, **{str(k): 0 for k in KS}}
    tried = 0
    for words in RHYMES.values():
        w1 = list(words)[1]
        for a, b in list(itertools.permutations([w for w in words if w != w1], 2))[:3]:
            ids, other = subject.ids(couplet_prompt(w1, CUES[a][0])), subject.ids(couplet_prompt(w1, CUES[b][0]))
            nl = len(ids) - 1
            mine, theirs = (intervene(subject.model, tc, x, [], mode="open").original_activations[nl, 0]
                            for x in (ids, other))
            order = ((theirs - mine).abs() * norms).argsort(descending=True)
            changed = [f for f in order.tolist() if mine[f] != 0 or theirs[f] != 0]
            row = []
            for name, feats in [("all", changed)] + [(str(k), order[:k].tolist()) for k in KS]:
                ivs = [Intervention(0, f, nl, value=float(theirs[f])) for f in feats]
                line2 = subject.tokens(common.continuation_ids(subject, ids, ivs, 3, stop))
                hits[name] += bool(line2) and line2[-1] == b
                row.append(f"{name}: {' '.join(line2)}")
            tried += 1
            print(f"{w1} {a} -> {b} ({len(changed)} active) | " + " | ".join(row), flush=True)
    print(f"line 2 ends in the other cue's word, of {tried}: " + ", ".join(f"{k}: {v}" for k, v in hits.items()))


if __name__ == "__main__":
    main(sys.argv[1])
