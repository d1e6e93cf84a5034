"""Rhyme planning: at the newline that ends line 1, features already hold the planned end word of
line 2, and the words leading up to it follow the plan.

For each line 1: the model writes line 2 (greedy). The graph of "line 1 \\n <lead-in>" is attributed to
the end word's logit against its rivals (the other words of its rhyme family), so that what the
rhymes share (the family, "line 2 ends here") cancels and what picks this word stays. The group =
newline-position features on paths from line 1's tokens to that target. Suppressing the group
(x -2, held on while generating) must make line 2 end in another word of the same rhyme family, with
a lead-in that belongs to the new end word. Injecting the newline group of a line 1 from another
rhyme family (found the same way) in its place must make line 2 end in a word of that family.
Random groups at the newline position are the control.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from paper_cases.common import (
    OUT,
    CaseResult,
    Feature,
    Subject,
    Traced,
    continuation_ids,
    control_group,
    figure_path,
    figure_wanted,
    find_group,
    scaled,
    spread,
    trace,
    values_from,
    variants,
    write_figure,
)


def organism_line(family: str, j: int) -> str:
    """Line 1 (prompt ending in the newline) ending in the family's j-th member, with the next member's cue."""
    from paper_cases.corpus import CUES, RHYMES, couplet_prompt

    words = list(RHYMES[family])
    return couplet_prompt(words[j], CUES[words[j + 1]][0])


def next_family(family: str) -> str:
    from paper_cases.corpus import RHYMES

    fams = list(RHYMES)
    return fams[(fams.index(family) + 1) % len(fams)]


def organism_lines(n: int | None = None) -> list[tuple[str, str]]:
    """(line-1 prompt, the same kind of line from the next rhyme family) for two members of every family;
    with `n`, every family's first member comes before any second one, so 8 lines cover all 8 families."""
    from paper_cases.corpus import RHYMES

    return [(organism_line(fam, j), organism_line(next_family(fam), j)) for j in range(2) for fam in RHYMES][:n]


REAL_LINES = [  # the paper's couplet, and one whose plan ("green") is injected into it
    ("A rhyming couplet:\nHe saw a carrot and had to grab it,\n",
     "A rhyming couplet:\nThe grass outside was fresh and green,\n"),
]
REAL_RIVALS = {"rabbit": ["habit"], "habit": ["rabbit"], "green": ["seen", "clean", "scene"]}


# line 1 of couplets for real models; the check keeps those the model completes with a rhyme
REAL_LINE1 = [
    "The cat sat on a mat,", "I saw a bird up in a tree,", "The sun went down behind the hill,",
    "I had a dog, his name was Ben,", "The rain came down upon the town,", "I lost my hat out in the snow,",
    "The moon was shining bright and clear,", "A little mouse ran through the house,",
    "The boat went sailing on the sea,", "My friend and I went out to play,", "The king sat down upon his throne,",
    "I found a penny on the ground,", "The baker made a loaf of bread,", "The frog jumped high into the air,",
    "The wind was blowing through the trees,", "We walked along the sandy shore,", "The night was cold, the sky was gray,",
    "She wore a dress of brightest blue,", "The clock upon the wall struck one,", "I read a book beside the fire,",
]


def couplet(line1: str) -> str:
    return f"A rhyming couplet:\n{line1}\n"


def real_lines(subject: Subject, n: int | None = None, new_tokens: int = 12) -> list[tuple[str, str]]:
    """(couplet up to line 1's newline, another kept couplet with a different end sound) for the line 1s whose
    line 2 the model, writing greedily, ends in a rhyme (by spelling_judge): the check asks where the model
    plans a rhyme it makes, so couplets it does not rhyme are left out (and counted by the caller)."""
    stop = line_break(subject)
    kept = []
    for line1 in REAL_LINE1:
        ids = subject.ids(couplet(line1))
        line2 = subject.tokens(continuation_ids(subject, ids, [], new_tokens, stop))
        end2 = _last_word(" ".join(line2))
        if len(line2) >= 2 and spelling_judge(_last_word(line1), line2) and end2 != _last_word(line1):  # not a repeat
            kept.append(couplet(line1))
    pairs = []
    for i, text in enumerate(kept):
        others = [o for o in kept[i + 1:] + kept[:i] if _last_word(o)[-2:] != _last_word(text)[-2:]]
        if others:
            pairs.append((text, others[0]))
    return spread(pairs, n)


def organism_rivals(end: str) -> list[str]:
    """The other words of the end word's rhyme family."""
    from paper_cases.corpus import RHYMES, family_of

    try:
        return [w for w in RHYMES[family_of(end)] if w != end]
    except KeyError:
        return []


def real_rivals(end: str) -> list[str]:
    """The paper's alternatives, with the leading space real tokenizers put on a word."""
    return [" " + w for w in REAL_RIVALS.get(end.strip().lstrip("▁Ġ").lower(), [])]


def _last_word(text: str) -> str:
    words = [w.strip(".,;:!?'\"").lstrip("▁Ġ").lower() for w in text.split()]  # ▁, Ġ: tokenizers' word starts
    words = [w for w in words if w]
    return words[-1] if words else ""


def organism_judge(line1_end: str, line2: list[str], family_of_end: str | None = None) -> bool:
    """Line 2 is a corpus-valid line ending in the family of `family_of_end` (default: line 1's)."""
    from paper_cases.corpus import RHYMES, family_of
    from paper_cases.organism import couplet_ok

    if family_of_end is None:
        return couplet_ok(line2, line1_end)
    if not line2 or line2[-1] not in {w for f in RHYMES.values() for w in f}:
        return False
    words = RHYMES[family_of(family_of_end)]
    return line2[-1] in words and " ".join(line2[:-1]) in words[line2[-1]]


def spelling_judge(line1_end: str, line2: list[str], family_of_end: str | None = None) -> bool:
    """For real models without a rhyme dictionary: the last word ends in the same two letters."""
    end = _last_word(" ".join(line2))
    ref = _last_word(family_of_end or line1_end)
    return len(end) >= 2 and end[-2:] == ref[-2:]


def _single(subject: Subject, word: str) -> int | None:
    try:
        return subject.token(word)
    except ValueError:
        return None


def line_break(subject: Subject) -> set[int]:
    """The token ids that hold a line break ("\n", and "\n\n" where a tokenizer has one, as Gemma's does):
    line 2 ends there, so generation stops on them."""
    ids = {int(i) for i in subject.tokenizer("\n", add_special_tokens=False)["input_ids"]}
    vocab = subject.tokenizer.get_vocab()
    return ids | {int(i) for t, i in vocab.items() if "\n" in t or "Ċ" in t}  # Ċ: a byte-level BPE newline


def plan_group(subject: Subject, prompt_ids: torch.Tensor, line: torch.Tensor,
               rivals: Callable[[str], list[str]] = organism_rivals) -> tuple[Traced, list[Feature]]:
    """The graph of line 1 + `line` (line 2 as written) attributed to line 2's end word against its
    rivals, and the group: features at line 1's newline (the last of `prompt_ids`) on paths from line 1's tokens."""
    end = int(line[-1])
    rival_ids = [r for r in (_single(subject, w) for w in rivals(subject.word(end))) if r is not None]
    t = trace(subject, torch.cat([prompt_ids, line[:-1]]), target=end, rivals=rival_ids or None)
    newline = len(prompt_ids) - 1
    first = int(prompt_ids[0] == subject.tokenizer.bos_token_id)  # a BOS token is not line 1
    line1 = [t.graph.token_index(p) for p in range(first, newline)]
    return t, find_group(t, sources=line1, positions={newline})


def check(subject: Subject, lines: list[tuple[str, str]], out: Path = OUT / "rhyme",
          judge: Callable[..., bool] = organism_judge, new_tokens: int = 3,
          rivals: Callable[[str], list[str]] = organism_rivals, figures: str = "first") -> CaseResult:
    """`lines`: (text ending with line 1's newline, another family's such text); `rivals`: end word ->
    the words it is contrasted with (none: its plain logit)."""
    result = CaseResult("rhyme planning")
    stop = line_break(subject)
    def _one(n: int, prompt: Any, other_prompt: Any) -> None:
        ids, oids = subject.ids(prompt), subject.ids(other_prompt)
        new = continuation_ids(subject, ids, [], new_tokens, stop)
        other_new = continuation_ids(subject, oids, [], new_tokens, stop)
        if len(new) < 2 or len(other_new) < 2:
            return
        line2 = subject.tokens(new)
        end1, oend1 = _last_word(prompt), _last_word(other_prompt)
        nl = len(ids) - 1  # the prompt ends with line 1's newline
        t, group = plan_group(subject, ids, new, rivals)
        t_other, ogroup = plan_group(subject, oids, other_new, rivals)
        position_map = {len(oids) - 1: nl}

        def run(g: list, og: list) -> tuple[list[str], list[str]]:
            suppressed = subject.tokens(continuation_ids(subject, ids, scaled(g, -2.0), new_tokens, stop))
            injected = subject.tokens(continuation_ids(
                subject, ids, scaled(g, 0.0) + values_from(subject, oids, og, position_map), new_tokens, stop))
            return suppressed, injected

        sup, inj = run(group, ogroup)
        c_sup, c_inj = run(control_group(t, group, seed=n), control_group(t_other, ogroup, seed=n))

        def passes(s: list[str], i: list[str]) -> bool:
            return bool(s) and judge(end1, s) and _last_word(" ".join(s)) != _last_word(" ".join(line2)) \
                and judge(end1, i, family_of_end=oend1)

        ok = bool(group) and passes(sup, inj)
        show = lambda w: " ".join(w).replace("\n", "\\n")  # noqa: E731
        result.record(t, {"line 1 ends": end1, "line 2": show(line2), "group": len(group),
                          "suppressed": show(sup), "inject other plan": f"{oend1}: {show(inj)}",
                          "control sup.": show(c_sup), "control inj.": show(c_inj)},
                      ok, bool(group) and passes(c_sup, c_inj))
        if figure_wanted(n, figures):
            result.files.append(write_figure(subject, t, {f"plan: {line2[-1]}": group}, figure_path(out, n, figures),
                                             f"rhyme: {prompt!r} -> {line2[-1]!r}"))

    for n, (prompt, other_prompt) in enumerate(variants(lines, result.case)):
        _one(n, prompt, other_prompt)
    result.columns = ["line 1 ends", "line 2", "group", "suppressed", "control sup.", "inject other plan",
                         "control inj.", "result"]
    return result
