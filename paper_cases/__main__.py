"""Run the case studies: `python -m paper_cases [CASE] [--prompt ...] [--model M --transcoder T]`.

Without a case, all three run on the bundled organism: 8 prompt variants each by default, chosen to
cover the states, carries and rhyme families (about half a minute on 2 cores); `--all` runs every variant
(two-hop 20, addition 893, rhyme 16; about 20 minutes). `--prompt` runs one case on one prompt.

`--model/--transcoder` run the real-model checks (12 variants each by default, among those the model gets
right): one-hop factual recall, single-digit addition, greater-than on years, rhyme planning on couplets
the model rhymes; then the paper's own prompts (two-hop, 36+59, the rabbit couplet), reported as they
come out.

Exit status: 0 when every check passes, 3 when the checks ran and one failed (1 is an error, 2 a usage error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from paper_cases import addition, common, greater_than, rhyme, two_hop

CASES = ("two_hop", "addition", "rhyme")                                 # on the organism
REAL_CASES = ("recall", "addition", "greater_than", "rhyme", "paper")   # on a real model
CASE_FOLDERS = {"two-hop factual recall": "two_hop", "addition (ones digit)": "addition", "rhyme planning": "rhyme",
                "factual recall (one hop)": "recall", "greater-than (years)": "greater_than"}
CHECK_FAILED = 3  # the exit status of a run that finished with a failed check (1 and 2: Python's and argparse's)
PAPER = "paper's prompt: "  # the case names of the paper's own prompts on a real model
REAL_FOR = {"two_hop": "recall", "addition": "addition", "rhyme": "rhyme"}  # organism case -> real-model check


def run_real(case: str, subject: common.Subject, n: int | None, out: Path, figures: str) -> list[common.CaseResult]:
    """One real-model check over variants the model gets right, or ("paper") the paper's own prompts."""
    if case == "recall":
        prompts = two_hop.real_one_hop_prompts(subject, n)
        return [_selected(two_hop.check(subject, prompts, out / "recall", figures=figures,
                                        case="factual recall (one hop)"), prompts)]
    if case == "addition":
        pairs = addition.real_pairs(subject, n)
        return [_selected(addition.check(subject, pairs, out / "addition", prompt_for=addition.real_digit_prompt,
                                         figures=figures), pairs)]
    if case == "greater_than":
        years = greater_than.real_years(subject, n)
        return [_selected(greater_than.check(subject, years, out / "greater_than", figures=figures), years)]
    if case == "rhyme":
        lines = rhyme.real_lines(subject, n)
        return [_selected(rhyme.check(subject, lines, out / "rhyme", judge=rhyme.real_judge, new_tokens=6,
                                      rivals=rhyme.real_rivals, figures=figures, away_counts=True), lines)]
    results = [two_hop.check(subject, two_hop.REAL_PROMPTS, out / "paper" / "two_hop", figures=figures),
               addition.check(subject, [(36, 59)], out / "paper" / "addition", prompt_for=addition.real_prompt,
                              figures=figures),
               rhyme.check(subject, rhyme.REAL_LINES, out / "paper" / "rhyme", judge=rhyme.real_judge,
                           new_tokens=12, rivals=rhyme.real_rivals, figures=figures)]
    for r in results:
        r.case = PAPER + r.case
    return results


def _selected(result: common.CaseResult, chosen: common.Chosen) -> common.CaseResult:
    result.selection = chosen.describe()
    return result


def run_case(case: str, subject: common.Subject, organism: bool, prompt: str | None, n: int | None,
             out: Path, figures: str = "first", console: Console | None = None) -> common.CaseResult:
    """Run one check and show its evidence table (long tables go to out/<case>/evidence.txt, listed in
    the result's files)."""
    return _shown(_run(case, subject, organism, prompt, n, out, figures), out, console or Console(width=200))


def _shown(result: common.CaseResult, out: Path, console: Console) -> common.CaseResult:
    """The result, its evidence table shown (or written to a file listed in its files)."""
    written = report(result, out, console)
    if written:
        result.files.append(written)
    return result


def _run(case: str, subject: common.Subject, organism: bool, prompt: str | None, n: int | None,
         out: Path, figures: str) -> common.CaseResult:
    if not organism:  # an organism case name on a real model: its real-model check
        if prompt:
            raise SystemExit("--prompt runs on the organism; real-model checks choose the variants the model gets right")
        return run_real(REAL_FOR[case], subject, n, out, figures)[0]
    if case == "two_hop":
        if prompt:
            raise SystemExit("two_hop --prompt needs an answer and a patch prompt; use the Python API "
                             "(paper_cases.two_hop.check) for custom prompts")
        return two_hop.check(subject, two_hop.organism_prompts(n), out / "two_hop", figures=figures)
    if case == "addition":
        if prompt:
            a, b = (int(x) for x in prompt.replace(" ", "").rstrip("=").split("+"))
            pairs = [(a, b)]
        else:
            pairs = addition.organism_pairs(n)
        return addition.check(subject, pairs, out / "addition", prompt_for=addition.organism_prompt, figures=figures)
    if prompt:
        from paper_cases.corpus import family_of, poem_prompt

        try:
            family = family_of(prompt.split()[-1])
        except (KeyError, IndexError):
            raise SystemExit(f"rhyme --prompt is line 1 of a couplet ending in a rhyme word of the organism "
                             f"(e.g. 'he saw a carrot and a habit'), got {prompt!r}") from None
        lines = [(poem_prompt(prompt.strip()), rhyme.organism_line(rhyme.next_family(family), 0))]
    else:
        lines = rhyme.organism_lines(n)
    return rhyme.check(subject, lines, out / "rhyme", figures=figures)


PRINTED_ROWS = 16  # longer evidence tables go to a file, not the screen


def report(result: common.CaseResult, out: Path, console: Console) -> str:
    """Print the case's evidence table, or write it to out/<case>/evidence.txt when it is long."""
    if len(result.rows) <= PRINTED_ROWS:
        common.print_table(result, console)
        return ""
    folder = CASE_FOLDERS[result.case.removeprefix(PAPER)]
    path = out / ("paper/" + folder if result.case.startswith(PAPER) else folder) / "evidence.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        common.print_table(result, Console(file=fh, width=220))
    return str(path)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m paper_cases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?", choices=sorted(set(CASES + REAL_CASES)),
                    help=f"one case (default: all). Organism: {', '.join(CASES)}; real model: {', '.join(REAL_CASES)}")
    ap.add_argument("--prompt", help="addition: 'A+B'; rhyme: line 1, e.g. 'he saw a carrot and a habit'")
    ap.add_argument("--model", help="transformers model id or folder (default: the bundled organism)")
    ap.add_argument("--transcoder", help="transcoder repo id, registry name or folder")
    ap.add_argument("-n", type=int, default=None, help="prompt variants per case, spread over the cases' range "
                                                       "(default: 8 on the organism, 12 on a real model)")
    ap.add_argument("--all", action="store_true", help="every variant (two-hop 20, addition 893, rhyme 16 on the "
                                                       "organism; about 20 minutes on 2 cores)")
    ap.add_argument("--figures", choices=common.FIGURES, default="first",
                    help="graph figures (PNG + graph JSON) for the first variant of each case, all, or none")
    ap.add_argument("--out", type=Path, default=common.OUT, help="where graphs, figures and long tables go")
    return ap


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot run, before anything is loaded."""
    if (args.model is None) != (args.transcoder is None):
        ap.error("--model and --transcoder go together")
    if args.n is not None and args.n < 1:
        ap.error("-n must be at least 1")
    organism = args.model is None
    if args.case and args.case not in (CASES if organism else REAL_CASES):
        ap.error(f"{args.case} runs on " + ("a real model (--model/--transcoder)" if organism else
                                           f"the bundled organism; on a real model: {', '.join(REAL_CASES)}"))
    if args.prompt and not organism:
        ap.error("--prompt runs on the organism; real-model checks choose the variants the model gets right")


def _summary(results: list[common.CaseResult], organism: bool, name: str, console: Console) -> int:
    """The one table of every case's outcome; the exit status (CHECK_FAILED when any check failed)."""
    table = Table("case", "passed", "control (random groups)", "replacement", "completeness", "verdict",
                  "figures and tables", title=f"paper_cases on {name}")
    if not organism:
        table.add_column("variants the model gets right")

    def mean(v: list[float]) -> str:
        return f"{sum(v) / len(v):.3f}" if v else "-"

    for r in results:
        cells = [r.case, f"{r.passed}/{r.tried}", f"{r.control_passed}/{r.tried}", mean(r.replacement),
                 mean(r.completeness), r.verdict, ", ".join(r.files)]
        table.add_row(*cells, *([] if organism else [r.selection or "the paper's own"]))
    console.print(table)
    failed = [r.case for r in results if r.verdict != "PASS"]
    if failed:
        known = " (known on the bundled organism: docs/research/rhyme_planning.md)" if organism and failed == [
            "rhyme planning"] else ""
        console.print(f"FAIL: {', '.join(failed)}{known}; exit status {CHECK_FAILED} because a check failed",
                      highlight=False)
    return CHECK_FAILED if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check(ap, args)
    organism = args.model is None
    subject = common.load_subject(args.model, args.transcoder)
    console = Console(width=200)
    n = None if args.all else (args.n or (8 if organism else 12))
    if organism:
        results = [run_case(case, subject, organism, args.prompt, n, args.out, args.figures, console)
                   for case in ([args.case] if args.case else CASES)]
    else:
        results = [_shown(r, args.out, console) for case in ([args.case] if args.case else REAL_CASES)
                   for r in run_real(case, subject, n, args.out, args.figures)]
    return _summary(results, organism, subject.name, console)


if __name__ == "__main__":
    sys.exit(main())
