"""Is the rhyme check's group what the cue adds? For each line the check tries, compare the group's
write into layer 0's MLP output at the newline with what the cue adds there in the model itself
(the cued line's MLP output minus that of the same line without its cue). cue_delta.py shows that
pushing down exactly the cue's part gives another word of the family; a group that wrote that part
would do the same, so a low cosine says the CLT's features mix the cue's part with the rest.

    PYTHONPATH=. python docs/experiments/group_vs_cue.py [ARTIFACTS_DIR]

ARTIFACTS_DIR holds model/ and clt/ (default: the bundled organism).
"""

from __future__ import annotations

import sys

import torch

from clt_hub.attribution.interventions import intervene
from paper_cases import common, corpus, organism, rhyme


def main(folder: str | None) -> None:
    subject = common.load_artifacts(folder)
    tc, model, tok = subject.transcoder, subject.model, subject.tokenizer
    stop = rhyme.line_break(subject)

    def mlp0_at_newline(text: str) -> torch.Tensor:
        return organism.newline_state(model, tok, text, "mlp0")[0][0]

    print("line 1 | planned | group size | |group write| | |cue's part| | |whole output| | cosine")
    for family, words in corpus.RHYMES.items():
        for j in range(2):
            w1 = list(words)[j]
            prompt = rhyme.organism_line(family, j)  # line 1 ends in w1, its cue names the next member
            ids = subject.ids(prompt)
            new = common.continuation_ids(subject, ids, [], 3, stop)
            _, group = rhyme.plan_group(subject, ids, new)
            acts = intervene(model, tc, ids, [], mode="open").original_activations[len(ids) - 1]
            write = torch.zeros(tc.d_model)
            for layer, _, f in group:
                if layer == 0:
                    write += float(acts[0, f]) * tc.decoder_rows(0)[f][0].detach()
            cued = mlp0_at_newline(prompt)
            part = cued - mlp0_at_newline(corpus.couplet_prompt(w1))
            cosine = float(write @ part / (write.norm() * part.norm()).clamp(min=1e-9))
            print(f"{w1} | {subject.word(int(new[-1]))} | {len(group)} | {write.norm():.1f} | "
                  f"{part.norm():.1f} | {cued.norm():.1f} | {cosine:.2f}")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
