"""Addition: the ones digit of "calc : 3 6 + 5 9 = 9" -> "5" is computed from operand features that
depend on the operands' ones digits.

For each pair (a, b): the group = features the ones-digit token of a drives and that drive the
answer digit (from the graph). Steering: replace the group with the group found the same way on the
prompt for a' (a with another ones digit, same carry, so the digits already written stay right);
the answer's ones digit must become (a' + b) mod 10, as arithmetic predicts. Random groups of the
same size and places are the control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paper_cases.common import (
    OUT,
    CaseResult,
    Chosen,
    Subject,
    control_group,
    figure_path,
    figure_wanted,
    find_group,
    next_probs,
    scaled,
    spread,
    trace,
    values_from,
    variants,
    write_figure,
)


def organism_prompt(a: int, b: int) -> tuple[str, str]:
    """Prompt up to the answer's last digit, and that digit."""
    from paper_cases.corpus import addition_answer, addition_prompt

    digits = addition_answer(a, b).split(" ")
    return " ".join([addition_prompt(a, b), *digits[:-1]]), digits[-1]


def real_prompt(a: int, b: int) -> tuple[str, str]:
    """The paper's format ("calc: 36+59="). The target is the answer's first token as the model's
    tokenizer writes it (the whole number, or its first digit), so on real models this path checks
    that steering the operand's ones-digit features moves the answer as arithmetic predicts."""
    return f"calc: {a}+{b}=", str(a + b)


def real_digit_prompt(a: int, b: int) -> tuple[str, str]:
    """Single-digit sums for real models, in the paper's format up to the answer's last digit
    ("calc: 7+8=1" -> "5"), so that a carry does not make the target the same "1" for every pair."""
    answer = str(a + b)
    return f"calc: {a}+{b}={answer[:-1]}", answer[-1]


def real_pairs(subject: Subject, n: int | None = None) -> Chosen[tuple[int, int]]:
    """Single-digit pairs whose last answer digit the model gets right, for the pair and for its steered
    version (the check asks whether steering moves a correct answer, not whether the model can add), half
    with a carry, each half spread over the pairs."""
    pairs, tried = [], 0
    for a in range(1, 10):
        for b in range(1, 10):
            a2 = steered_operand(a, b)
            if a2 is None or a2 <= 0:
                continue
            tried += 1
            if all(subject.gets_right(*real_digit_prompt(x, b)) for x in (a, a2)):
                pairs.append((a, b))
    return Chosen(_carry_halves(pairs, n), len(pairs), tried)


def steered_operand(a: int, b: int) -> int | None:
    """a with another ones digit that keeps the carry (so earlier answer digits are unchanged)."""
    carry = a % 10 + b % 10 >= 10
    for d in list(range(a % 10 + 1, 10)) + list(range(a % 10)):
        if (d + b % 10 >= 10) == carry:
            return a - a % 10 + d
    return None


def organism_pairs(n: int | None = None) -> list[tuple[int, int]]:
    from paper_cases.corpus import build

    held = build(0).heldout["addition"]
    pairs = []
    for prompt, _ in held:
        a, b = (int(x.replace(" ", "")) for x in prompt.split(":")[1].split("=")[0].split("+"))
        if a >= 10 and steered_operand(a, b) is not None:
            pairs.append((a, b))
    return _carry_halves(pairs, n)


def _carry_halves(pairs: list[tuple[int, int]], n: int | None) -> list[tuple[int, int]]:
    """`n` of the pairs, half with a carry into the tens and half without, each half spread over the pairs
    (all of them when n is None), in their original order."""
    if n is None:
        return pairs
    carry = [p for p in pairs if p[0] % 10 + p[1] % 10 >= 10]
    plain = [p for p in pairs if p[0] % 10 + p[1] % 10 < 10]
    return sorted(spread(carry, n - n // 2) + spread(plain, n // 2), key=pairs.index)


def _digit_positions(subject: Subject, ids) -> tuple[int, int]:
    toks = [t.replace("Ġ", "").replace("▁", "").strip() for t in subject.tokens(ids)]
    plus = next(i for i, t in enumerate(toks) if t.endswith("+") or t == "+")
    eq = max(i for i, t in enumerate(toks) if "=" in t)
    # the operand's ones digit is the token before "+" unless "+" is glued to it
    return (plus if toks[plus] != "+" else plus - 1), eq - 1


def check(subject: Subject, pairs: list[tuple[int, int]], out: Path = OUT / "addition",
          prompt_for=organism_prompt, figures: str = "first") -> CaseResult:
    result = CaseResult("addition (ones digit)")
    def _one(n: int, a: Any, b: Any) -> None:
        a2 = steered_operand(a, b)
        if a2 is None:
            return
        prompt, answer = prompt_for(a, b)
        prompt2, answer2 = prompt_for(a2, b)
        target, expected = subject.first_token(answer), subject.first_token(answer2)
        t, t2 = trace(subject, prompt, target=target), trace(subject, prompt2, target=expected)
        pos_a, _ = _digit_positions(subject, t.ids)
        group = find_group(t, sources=[t.graph.token_index(pos_a)])
        group2 = find_group(t2, sources=[t2.graph.token_index(pos_a)])
        base = next_probs(subject, t.ids, [])

        def steer(g: list, g2: list) -> int:
            return int(next_probs(subject, t.ids, scaled(g, 0.0) + values_from(subject, t2.ids, g2)).argmax())

        got = steer(group, group2)
        ctrl = steer(control_group(t, group, seed=n), control_group(t2, group2, seed=n))
        ok = bool(group) and got == expected
        result.record(t, {"sum": f"{a}+{b}={a + b}", "carry": "yes" if a % 10 + b % 10 >= 10 else "no",
                          "p(digit)": f"{base[target]:.3f}", "group": len(group), "steer a->": a2,
                          "expected": subject.word(expected), "got": subject.word(got), "control got": subject.word(ctrl)},
                      ok, bool(group) and ctrl == expected)
        if figure_wanted(n, figures):
            result.files.append(write_figure(subject, t, {f"operand {a} ones digit": group}, figure_path(out, n, figures),
                                             f"addition: {prompt!r} -> {answer!r}"))

    for n, (a, b) in enumerate(variants(pairs, result.case)):
        _one(n, a, b)
    result.columns = ["sum", "carry", "p(digit)", "group", "steer a->", "expected", "got", "control got", "result"]
    return result
