"""Does the newline's CLT features carry line 2's plan? For each rhyme prompt pair of the check, swap the
active features at line 1's newline (all layers, then one layer set at a time) for those of another
family's line 1, and print the line 2 the model then writes.

    PYTHONPATH=. python docs/experiments/newline_swap.py ARTIFACTS_DIR [N]

ARTIFACTS_DIR holds model/ and clt/ (e.g. paper_cases/artifacts, or a build's --out).
"""

from __future__ import annotations

import sys

import torch

from clt_hub.attribution.interventions import intervene
from paper_cases import common, rhyme
from paper_cases.common import Feature, continuation_ids, scaled, values_from


def active(subject: common.Subject, ids: torch.Tensor, pos: int, layers: set[int] | None) -> list[Feature]:
    acts = intervene(subject.model, subject.transcoder, ids, [], mode="open").original_activations
    return [(layer, pos, f) for layer in range(acts.shape[1]) if layers is None or layer in layers
            for f in (acts[pos, layer] > 0).nonzero().flatten().tolist()]


def main(folder: str, n: int) -> None:
    subject = common.load_artifacts(folder)
    stop = rhyme.line_break(subject)
    for prompt, other in rhyme.organism_lines(n):
        ids, oids = subject.ids(prompt), subject.ids(other)
        nl, onl = len(ids) - 1, len(oids) - 1
        row = [prompt.split()[-1], " ".join(subject.tokens(continuation_ids(subject, ids, [], 3, stop))),
               f"other: {other.split()[-1]}"]
        for layers in (None, {0}, {1}, {2}, {3}):
            mine, theirs = active(subject, ids, nl, layers), active(subject, oids, onl, layers)
            swap = scaled(mine, 0.0) + values_from(subject, oids, theirs, {onl: nl})
            line2 = subject.tokens(continuation_ids(subject, ids, swap, 3, stop))
            row.append(f"{'all' if layers is None else sorted(layers)}: {' '.join(line2)}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
