"""Greater-than (Hanna et al. 2023; the case study of the transcoder paper, Dunefsky et al. 2024):
"The war lasted from the year 17YY to the year 17" -> a year after YY.

Real tokenizers such as Gemma's and SmolLM2's write every digit as its own token, so the next token is
the tens digit of the end year, and "a year after YY" shows as probability on tens digits above YY's
(a digit equal to YY's is ambiguous and left out). The target is that digit's logit against the digits
below YY's. The group = features that the two YY digit tokens drive and that drive the target (from the
graph). Evidence: replacing the group with the group found the same way on the prompt for another year
YY' (at its activations there) moves the expected tens digit of the answer toward YY' by at least one
decade. Random groups of the same size and places are the control.
"""

from __future__ import annotations

from pathlib import Path

import torch

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

YEARS = list(range(11, 80, 3))  # start years 17YY; 80 and later leave no decade above to choose
SHIFT = 30                    # YY' = YY + 30 (or - 30 when that leaves the range): three decades away
MIN_MOVE = 1.0                # the expected tens digit must move at least one decade toward YY'


def prompt(yy: int) -> str:
    return f"The war lasted from the year 17{yy:02d} to the year 17"


def other_year(yy: int) -> int:
    return yy + SHIFT if yy + SHIFT < 90 else yy - SHIFT


def digit_ids(subject: Subject) -> list[int]:
    """Token ids of the digits 0-9 (each must be one token: the case needs a digit-level tokenizer)."""
    return [subject.token(str(d)) for d in range(10)]


def expected_digit(probs: torch.Tensor, digits: list[int]) -> float:
    """The mean tens digit under the model's distribution over the ten digit tokens."""
    p = probs[digits]
    return float((p / p.sum().clamp(min=1e-30) * torch.arange(10.0)).sum())


def mass_above(probs: torch.Tensor, digits: list[int], yy: int) -> tuple[float, float]:
    """Probability on tens digits above and below YY's."""
    p = probs[digits]
    return float(p[yy // 10 + 1:].sum()), float(p[: yy // 10].sum())


def real_years(subject: Subject, n: int | None = None) -> Chosen[int]:
    """Start years where the model puts more probability on later decades than on earlier ones, for the
    year and for its YY' (the check asks whether the YY features set the cut-off, not whether the model
    does greater-than), spread over the range."""
    digits = digit_ids(subject)
    later: dict[int, bool] = {}  # year -> more on later decades; most years are also another's YY'

    def does(y: int) -> bool:
        if y not in later:
            above, below = mass_above(subject.next_token_probs(prompt(y)), digits, y)
            later[y] = above > below
        return later[y]

    right = [yy for yy in YEARS if does(yy) and does(other_year(yy))]
    return Chosen(spread(right, n), len(right), len(YEARS))


def _year_positions(subject: Subject, ids: torch.Tensor) -> list[int]:
    """Positions of YY's two digits: the third and fourth digit tokens of the first "17YY"."""
    toks = [t.replace("▁", "").replace("Ġ", "") for t in subject.tokens(ids)]
    digit_pos = [i for i, t in enumerate(toks) if t.isdigit() and len(t) == 1]
    if len(digit_pos) < 4:
        raise ValueError(f"this tokenizer does not write years digit by digit ({toks}); the greater-than check "
                         "needs one token per digit")
    return digit_pos[2:4]


def check(subject: Subject, years: list[int], out: Path = OUT / "greater_than", figures: str = "first") -> CaseResult:
    result = CaseResult("greater-than (years)")
    digits = digit_ids(subject)

    def _one(n: int, yy: int) -> None:
        yy2 = other_year(yy)
        ids, ids2 = subject.ids(prompt(yy)), subject.ids(prompt(yy2))
        base, base2 = next_probs(subject, ids, []), next_probs(subject, ids2, [])
        below = [digits[d] for d in range(yy // 10)]
        below2 = [digits[d] for d in range(yy2 // 10)]
        t = trace(subject, prompt(yy), target=int(base.argmax()), rivals=below or None)
        t2 = trace(subject, prompt(yy2), target=int(base2.argmax()), rivals=below2 or None)
        group = find_group(t, sources=[t.graph.token_index(p) for p in _year_positions(subject, ids)])
        group2 = find_group(t2, sources=[t2.graph.token_index(p) for p in _year_positions(subject, ids2)])
        e0 = expected_digit(base, digits)

        def moved(g: list, g2: list) -> float:
            patched = next_probs(subject, ids, scaled(g, 0.0) + values_from(subject, ids2, g2))
            return expected_digit(patched, digits) - e0

        toward = 1.0 if yy2 > yy else -1.0
        move = moved(group, group2)
        c_move = moved(control_group(t, group, seed=n), control_group(t2, group2, seed=n))
        above, under = mass_above(base, digits, yy)
        result.record(t, {"start year": f"17{yy:02d}", "p(later decade)": f"{above:.3f}",
                          "p(earlier)": f"{under:.3f}", "group": len(group), "patch from": f"17{yy2:02d}",
                          "mean tens digit": f"{e0:.2f}", "moved": f"{move:+.2f}", "control moved": f"{c_move:+.2f}"},
                      bool(group) and toward * move >= MIN_MOVE, bool(group) and toward * c_move >= MIN_MOVE)
        if figure_wanted(n, figures):
            result.files.append(write_figure(subject, t, {f"year 17{yy:02d}": group}, figure_path(out, n, figures),
                                             f"greater-than: {prompt(yy)!r}"))

    for n, yy in enumerate(variants(years, result.case)):
        _one(n, yy)
    result.columns = ["start year", "p(later decade)", "p(earlier)", "group", "patch from", "mean tens digit", "moved",
                      "control moved", "result"]
    return result
