"""Why suppressing the rhyme check's group derails line 2: how much of the newline's state the group
writes. For each line the check tries, find the group as the check does, then compare (a) what the
group writes into each layer's MLP output, (b) what all active features write there, and (c) the
residual stream at the newline after each block. Scaling the group by -2 changes the state by three
times (a); where (a) is about as large as (c), the line is pushed off anything the model has seen.

    PYTHONPATH=. python docs/experiments/plan_norms.py [ARTIFACTS_DIR]

ARTIFACTS_DIR holds model/ and clt/ (default: the bundled organism).
"""

from __future__ import annotations

import sys

import torch

from clt_hub.attribution.interventions import intervene
from paper_cases import common, rhyme


def main(folder: str | None) -> None:
    subject = common.load_artifacts(folder)
    tc = subject.transcoder
    stop = rhyme.line_break(subject)
    print("end word | group size | group write per layer | all features' write | residual: embedding, after block 0, 1, ..")
    for prompt, _ in rhyme.organism_lines(8):
        ids = subject.ids(prompt)
        new = common.continuation_ids(subject, ids, [], 3, stop)
        _, group = rhyme.plan_group(subject, ids, new)
        nl = len(ids) - 1
        acts = intervene(subject.model, tc, ids, [], mode="open").original_activations[nl]

        def write(features: list[tuple[int, int]], acts: torch.Tensor = acts) -> list[float]:
            out = torch.zeros(tc.n_layers, tc.d_model)
            for layer, f in features:
                out[layer:] += float(acts[layer, f]) * tc.decoder_rows(layer)[f].detach()
            return [round(float(x), 1) for x in out.norm(dim=-1)]

        active = [(layer, int(f)) for layer in range(tc.n_layers) for f in (acts[layer] > 0).nonzero().flatten()]
        with torch.no_grad():
            hidden = subject.model(ids[None], output_hidden_states=True).hidden_states
        print(subject.word(int(new[-1])), len(group), write([(layer, f) for layer, _, f in group]), write(active),
              [round(float(h[0, nl].norm()), 1) for h in hidden[:-1]])  # the last one is after the final norm


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
