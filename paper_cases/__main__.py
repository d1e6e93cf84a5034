"""Run the case studies: `python -m paper_cases [two_hop|addition|rhyme] [--prompt ...] [--model M --transcoder T]`.

Without a case, all three run on the bundled organism and a summary table is printed. `--prompt`
runs one case on one prompt. `--model/--transcoder` run the paper's own prompts on a real model
whose weights are available locally (or on any model + transcoder pair).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from paper_cases import addition, common, rhyme, two_hop

CASES = ("two_hop", "addition", "rhyme")


def run_case(case: str, subject: common.Subject, organism: bool, prompt: str | None, n: int | None,
             out: Path) -> common.CaseResult:
    if case == "two_hop":
        if prompt:
            raise SystemExit("two_hop --prompt needs an answer and a patch prompt; use the Python API "
                             "(paper_cases.two_hop.check) for custom prompts")
        prompts = two_hop.organism_prompts(n) if organism else two_hop.REAL_PROMPTS[:n]
        return two_hop.check(subject, prompts, out / "two_hop")
    if case == "addition":
        if prompt:
            a, b = (int(x) for x in prompt.replace(" ", "").rstrip("=").split("+"))
            pairs = [(a, b)]
        else:
            pairs = addition.organism_pairs(n) if organism else [(36, 59), (47, 28), (23, 19)][:n]
        return addition.check(subject, pairs, out / "addition",
                              prompt_for=addition.organism_prompt if organism else addition.real_prompt)
    if prompt:
        from paper_cases.corpus import family_of, poem_prompt

        try:
            family = family_of(prompt.split()[-1])
        except (KeyError, IndexError):
            raise SystemExit(f"rhyme --prompt is line 1 of a couplet ending in a rhyme word of the organism "
                             f"(e.g. 'he saw a carrot and a habit'), got {prompt!r}") from None
        lines = [(poem_prompt(prompt.strip()), rhyme.organism_line(rhyme.next_family(family), 0))]
    elif organism:
        lines = rhyme.organism_lines(n)
    else:
        return rhyme.check(subject, rhyme.REAL_LINES[:n], out / "rhyme", judge=rhyme.spelling_judge, new_tokens=12,
                           rivals=rhyme.real_rivals)
    return rhyme.check(subject, lines, out / "rhyme")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_cases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?", choices=CASES, help="one case (default: all three)")
    ap.add_argument("--prompt", help="addition: 'A+B'; rhyme: line 1, e.g. 'he saw a carrot and a habit'")
    ap.add_argument("--model", help="transformers model id or folder (default: the bundled organism)")
    ap.add_argument("--transcoder", help="transcoder repo id, registry name or folder")
    ap.add_argument("-n", type=int, default=None, help="at most this many prompt variants per case")
    ap.add_argument("--out", type=Path, default=common.OUT, help="where graphs and figures go")
    args = ap.parse_args(argv)
    if (args.model is None) != (args.transcoder is None):
        ap.error("--model and --transcoder go together")
    subject = common.load_subject(args.model, args.transcoder)
    organism = args.model is None
    results = [run_case(c, subject, organism, args.prompt, args.n, args.out) for c in ([args.case] if args.case else CASES)]
    table = Table("case", "passed", "control (random groups)", "replacement", "completeness", "verdict", "figure",
                  title=f"paper_cases on {subject.name}")
    for r in results:
        mean = lambda v: f"{sum(v) / len(v):.3f}" if v else "-"  # noqa: E731
        table.add_row(r.case, f"{r.passed}/{r.tried}", f"{r.control_passed}/{r.tried}", mean(r.replacement),
                      mean(r.completeness), r.verdict, ", ".join(r.files))
    Console(width=200).print(table)
    return 0 if all(r.verdict == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
