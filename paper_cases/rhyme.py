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
    Chosen,
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


EMPTY_LINE = "(empty: line break or end at once)"  # how the tables show a line 2 with no words

REAL_LINES = [  # the paper's couplet, and one whose plan ("green") is injected into it
    ("A rhyming couplet:\nHe saw a carrot and had to grab it,\n",
     "A rhyming couplet:\nThe grass outside was fresh and green,\n"),
]
REAL_RIVALS = {"rabbit": ["habit"], "habit": ["rabbit"], "green": ["seen", "clean", "scene"]}


# (line 1, the start of line 2) for real models: a small model rhymes when line 2 is under way (Gemma-3-270M:
# "...mat,\nAnd wore a funny" -> " hat"), not when it writes line 2 from the newline; the check keeps the couplets
# the model ends with a rhyme and asks about the plan at line 1's newline, as the paper does
REAL_COUPLETS = [
    ("The cat sat on a mat,", "And wore a funny"), ("I saw a bird up in a tree,", "It sang a happy song for"),
    ("Twinkle, twinkle, little star,", "How I wonder what you"), ("The sun went down behind the hill,",
                                                                   "The night was dark and very"),
    ("I had a dog, his name was Ben,", "He liked to play now and"),
    ("The rain came down upon the town,", "And all the leaves came tumbling"),
    ("I lost my hat out in the snow,", "And where it went I do not"),
    ("The moon was shining bright and clear,", "I knew that spring was almost"),
    ("The boat went sailing on the sea,", "And all the fish swam after"),
    ("My friend and I went out to play,", "We had such fun that sunny"),
    ("The king sat down upon his throne,", "And there he sat, all on his"),
    ("I found a penny on the ground,", "And then I heard a funny"),
    ("The baker made a loaf of bread,", "And then he went straight off to"),
    ("The frog jumped high into the air,", "And landed on a wooden"),
    ("The wind was blowing through the trees,", "It made me cough and made me"),
    ("We walked along the sandy shore,", "And then we walked a little"),
    ("The night was cold, the sky was gray,", "We stayed inside the house all"),
    ("She wore a dress of brightest blue,", "And shoes that were all shiny"),
    ("The clock upon the wall struck one,", "The mouse ran down, the day was"),
    ("I read a book beside the fire,", "Until my eyes began to"),
    ("Humpty Dumpty sat on a wall,", "Humpty Dumpty had a great"),
    ("Hickory dickory dock,", "The mouse ran up the"),
    ("Roses are red, violets are blue,", "Sugar is sweet, and so are"),
    ("Jack be nimble, Jack be quick,", "Jack jump over the candle"),
    ("The fish swam in the deep blue sea,", "As happy as a fish can"),
    ("I like to eat a juicy pear,", "I eat it sitting in my"),
    ("The dog was barking at the door,", "And then he lay down on the"),
    ("I saw a pig in a wig,", "It was dancing a little"),
    ("The little boy went out to fish,", "And caught a big one for his"),
    ("I have a coat that's big and red,", "I wear it when I go to"),
    ("The stars came out to light the night,", "They twinkled and they shone so"),
    ("The bee was buzzing round the flower,", "It worked for many an"),
]


def couplet(line1: str, lead_in: str = "") -> str:
    return f"A rhyming couplet:\n{line1}\n{lead_in}"


def real_lines(subject: Subject, n: int | None = None, new_tokens: int = 6) -> Chosen[tuple[str, str]]:
    """(couplet through line 2's lead-in, another kept couplet with a different end sound) for the couplets the
    model, writing greedily after the lead-in, ends with a rhyme of line 1 (by real_judge) other than line 1's
    own last word: the check asks where the model plans a rhyme it makes, so the others are left out (and
    counted by the caller)."""
    stop = line_break(subject)
    kept = []
    for line1, lead in REAL_COUPLETS:
        text = couplet(line1, lead)
        end = subject.tokens(continuation_ids(subject, subject.ids(text), [], new_tokens, stop))
        line2 = [lead, *end]
        if end and real_judge(_last_word(line1), line2) and _last_word(" ".join(line2)) != _last_word(line1):
            kept.append(text)
    pairs = []
    for i, text in enumerate(kept):
        others = [o for o in kept[i + 1:] + kept[:i] if not rhymes(_line1_end(o), _line1_end(text))]
        if others:
            pairs.append((text, others[0]))
    return Chosen(spread(pairs, n), len(kept), len(REAL_COUPLETS))


def _line1_end(text: str) -> str:
    """The last word of line 1 in a couplet prompt (which ends with line 1's newline, or goes on into line 2)."""
    return _last_word(text.rsplit("\n", 1)[0])


def _newline(ids: torch.Tensor, stop: set[int]) -> int:
    """The position of the line break that ends line 1: the prompt's last line break (a prompt ending there, as
    the organism's do, has it last)."""
    at = [i for i, t in enumerate(ids.tolist()) if t in stop]
    return at[-1] if at else len(ids) - 1


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


def rhymes(a: str, b: str) -> bool:
    """Perfect rhyme by the CMU Pronouncing Dictionary: some pronunciation of each, from its last stressed vowel
    on, is the same (tree/me, star/are, which spelling misses). A word the dictionary lacks (a name, a
    fragment) rhymes by spelling: the same last two letters."""
    try:
        import pronouncing
    except ImportError as e:  # an optional dependency: only the real-model rhyme check needs it
        raise ImportError('the real-model rhyme check judges rhymes with the CMU dictionary: pip install -e '
                          '".[cases]" in the clt_hub checkout (or pip install pronouncing)') from e
    parts = [{pronouncing.rhyming_part(p) for p in pronouncing.phones_for_word(w)} for w in (a, b)]
    if all(parts):
        return bool(parts[0] & parts[1])
    return len(a) >= 2 and len(b) >= 2 and a[-2:] == b[-2:]


def real_judge(line1_end: str, line2: list[str], family_of_end: str | None = None) -> bool:
    """For real models: line 2's last word rhymes (`rhymes`) with line 1's (or with `family_of_end`)."""
    end = _last_word(" ".join(line2))
    return bool(end) and rhymes(end, _last_word(family_of_end or line1_end))


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
          rivals: Callable[[str], list[str]] = organism_rivals, figures: str = "first",
          away_counts: bool = False) -> CaseResult:
    """`lines`: (text ending with line 1's newline or going on into line 2, another family's such text);
    `rivals`: end word -> the words it is contrasted with (none: its plain logit). Suppression passes when
    line 2 ends in another word of line 1's rhyme (the paper's result), or, with `away_counts` (real models,
    whose line 2 is under way), in any other word."""
    result = CaseResult("rhyme planning")
    stop = line_break(subject)
    traced: dict[tuple, tuple[Traced, list[Feature]]] = {}  # a couplet is traced once, as main and as other

    def plan(ids: torch.Tensor, nl: int, line: torch.Tensor) -> tuple[Traced, list[Feature]]:
        key = (tuple(ids[: nl + 1].tolist()), tuple(line.tolist()))
        if key not in traced:
            traced[key] = plan_group(subject, ids[: nl + 1], line, rivals)
        return traced[key]

    def line2(ids: torch.Tensor, nl: int, ivs: list) -> torch.Tensor:
        """Line 2 (its lead-in and what the model writes after it with `ivs` held on), without the line break."""
        new = continuation_ids(subject, ids, ivs, new_tokens, stop)
        if len(new) and int(new[-1]) in stop:
            new = new[:-1]
        return torch.cat([ids[nl + 1:], new])

    def _one(n: int, prompt: Any, other_prompt: Any) -> None:
        ids, oids = subject.ids(prompt), subject.ids(other_prompt)
        nl, onl = _newline(ids, stop), _newline(oids, stop)
        written, other_written = line2(ids, nl, []), line2(oids, onl, [])
        if not len(written) or not len(other_written):  # the model ends the poem after line 1: nothing to trace
            result.tried += 1
            result.rows.append({"line 1 ends": _line1_end(prompt), "line 2": "(none: the model stops after line 1)",
                                "result": "FAIL"})
            return
        words = subject.tokens(written)
        end1, oend1 = _line1_end(prompt), _line1_end(other_prompt)
        t, group = plan(ids, nl, written)
        t_other, ogroup = plan(oids, onl, other_written)
        position_map = {onl: nl}

        def run(g: list, og: list) -> tuple[list[str], list[str]]:
            suppressed = subject.tokens(line2(ids, nl, scaled(g, -2.0)))
            injected = subject.tokens(line2(ids, nl, scaled(g, 0.0) + values_from(subject, oids, og, position_map)))
            return suppressed, injected

        sup, inj = run(group, ogroup)
        c_sup, c_inj = run(control_group(t, group, seed=n), control_group(t_other, ogroup, seed=n))

        def passes(s: list[str], i: list[str]) -> bool:
            moved = bool(s) and _last_word(" ".join(s)) != _last_word(" ".join(words))
            return moved and (away_counts or judge(end1, s)) and judge(end1, i, family_of_end=oend1)

        ok = bool(group) and passes(sup, inj)
        # an empty line 2: the first token written under the intervention is a line break or the end of text
        show = lambda w: " ".join(w).replace("\n", "\\n") or EMPTY_LINE  # noqa: E731
        result.record(t, {"line 1 ends": end1, "line 2": show(words), "group": len(group),
                          "suppressed": show(sup), "inject other plan": f"{oend1}: {show(inj)}",
                          "control sup.": show(c_sup), "control inj.": show(c_inj)},
                      ok, bool(group) and passes(c_sup, c_inj))
        if figure_wanted(n, figures):
            result.files.append(write_figure(subject, t, {f"plan: {words[-1]}": group}, figure_path(out, n, figures),
                                             f"rhyme: {prompt!r} -> {words[-1]!r}"))

    for n, (prompt, other_prompt) in enumerate(variants(lines, result.case)):
        _one(n, prompt, other_prompt)
    result.columns = ["line 1 ends", "line 2", "group", "suppressed", "control sup.", "inject other plan",
                      "control inj.", "result"]
    return result
