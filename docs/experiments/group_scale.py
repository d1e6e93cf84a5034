"""Is the rhyme check's group where the plan is? For each line the check tries, find the group as the
check does, then write line 2 with the group held at s times its activations, for s from 1 (unchanged)
through 0 (ablated) to -2 (the check's suppression). If the group carried the plan, s = 0 would already
move the end word or weaken it; if the end word survives s = 0, the rest of the newline's features
still hold the plan, and only pushing the group below zero changes anything (by derailing the line).

    PYTHONPATH=. python docs/experiments/group_scale.py [ARTIFACTS_DIR]

ARTIFACTS_DIR holds model/ and clt/ (default: the bundled organism). Prints one row per line and, per
scale, how many lines keep their end word and how many end in another valid word of the family.
"""

from __future__ import annotations

import sys

from paper_cases import common, rhyme

SCALES = (1.0, 0.5, 0.0, -0.5, -1.0, -2.0)


def main(folder: str | None) -> None:
    subject = common.load_artifacts(folder)
    stop = rhyme.line_break(subject)
    same = dict.fromkeys(SCALES, 0)
    switched = dict.fromkeys(SCALES, 0)
    lines = rhyme.organism_lines(8)
    for prompt, _ in lines:
        ids = subject.ids(prompt)
        new = common.continuation_ids(subject, ids, [], 3, stop)
        _, group = rhyme.plan_group(subject, ids, new)
        end1, planned = prompt.split()[-1], subject.word(int(new[-1]))
        row = []
        for s in SCALES:
            line2 = subject.tokens(common.continuation_ids(subject, ids, common.scaled(group, s), 3, stop))
            same[s] += bool(line2) and line2[-1] == planned
            switched[s] += bool(line2) and line2[-1] != planned and rhyme.organism_judge(end1, line2)
            row.append(f"{s:+.1f}: {' '.join(line2)}")
        print(planned, len(group), " | ".join(row), flush=True)
    print(f"of {len(lines)} lines, per scale: keeps the planned word / another valid word of the family")
    print("  ".join(f"{s:+.1f}: {same[s]}/{switched[s]}" for s in SCALES))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
