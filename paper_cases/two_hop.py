"""Two-hop factual recall: "the capital of the state containing Dallas is" -> "Austin" goes through
features that carry the state (Texas).

For each prompt: the group = features at the city position or later that the city token drives and
that drive the answer (from the graph). Evidence: scaling it by -2 cuts the answer's
probability at least in half; swapping it (the group x -1, plus the group found the same way on a
prompt about a city in another state, at its activations there) makes that state's answer the top
prediction. The same interventions with random
groups of the same size and places are the control.
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

# (prompt, answer, city, other prompt, other answer): the paper's prompts, for real models
REAL_PROMPTS = [
    ("Fact: the capital of the state containing Dallas is", " Austin", "Dallas",
     "Fact: the capital of the state containing Oakland is", " Sacramento"),
    ("Fact: the capital of the state containing Savannah is", " Atlanta", "Savannah",
     "Fact: the capital of the state containing Dallas is", " Austin"),
    ("Fact: the capital of the city containing Shanghai is", " Beijing", "Shanghai",
     "Fact: the capital of the state containing Oakland is", " Sacramento"),
]


# one-hop recall for real models ("<city> is a city in the state of" -> state): cities that are one token
# for common tokenizers, two or three per state, so every prompt has a city from another state to swap in
CITIES = {
    "Texas": ["Dallas", "Houston", "Austin"], "California": ["Oakland", "Sacramento", "Fresno"],
    "Florida": ["Miami", "Tampa", "Orlando"], "Ohio": ["Cleveland", "Cincinnati", "Columbus"],
    "Georgia": ["Atlanta", "Savannah"], "Illinois": ["Chicago", "Springfield"], "Washington": ["Seattle", "Spokane"],
    "Arizona": ["Phoenix", "Tucson"], "Michigan": ["Detroit", "Lansing"], "Colorado": ["Denver", "Boulder"],
    "Tennessee": ["Nashville", "Memphis"], "Oregon": ["Portland", "Eugene"],
    "Pennsylvania": ["Philadelphia", "Pittsburgh"], "Massachusetts": ["Boston", "Worcester"],
}


def one_hop_prompt(city: str) -> str:
    return f"{city} is a city in the state of"


def real_one_hop_prompts(subject: Subject, n: int | None = None) -> Chosen[tuple[str, str, str, str, str]]:
    """(prompt, state, city, other state's prompt, other state) for the cities whose state the model names
    first, on both prompts (the check asks how it does, not whether), spread over the states; each city
    is paired with a city of the state three places on."""
    states = list(CITIES)
    out, tried = [], 0
    for i, state in enumerate(states):
        other = states[(i + 3) % len(states)]
        for j, city in enumerate(CITIES[state]):
            o_city = CITIES[other][j % len(CITIES[other])]
            row = (one_hop_prompt(city), " " + state, city, one_hop_prompt(o_city), " " + other)
            tried += 1
            if subject.gets_right(row[0], row[1]) and subject.gets_right(row[3], row[4]):
                out.append(row)
    return Chosen(spread(out, n), len(out), tried)


def organism_prompts(n: int | None = None) -> list[tuple[str, str, str, str, str]]:
    from paper_cases.corpus import ATTRIBUTES, STATES, fact_prompt

    states = list(STATES)
    out = []
    for i, state in enumerate(states):
        other = states[(i + 3) % len(states)]
        for j, city in enumerate(STATES[state][:2]):
            o_city = STATES[other][j]
            out.append((fact_prompt(city, "capital"), ATTRIBUTES["capital"][i], city,
                        fact_prompt(o_city, "capital"), ATTRIBUTES["capital"][states.index(other)]))
    return spread(out, n)  # evenly over the states, not the first few


def _position(subject: Subject, ids, word: str) -> int:
    """The last position of `word` in the prompt: its own token, or the last of the tokens that spell it
    (a city at the start of a sentence is often split: "Oak", "land")."""
    toks = [t.lower().replace("ġ", "").replace("▁", "") for t in subject.tokens(ids)]
    for i in range(len(toks) - 1, -1, -1):
        text = ""
        for j in range(i, -1, -1):
            text = toks[j] + text
            if word.lower() in text:
                return i
            if len(text) > len(word) or not word.lower().endswith(text):
                break
    raise ValueError(f"{word!r} is not in the prompt ({subject.tokens(ids)})")


def _other_city(prompt: str, other_prompt: str) -> str:
    """The word of the other prompt that this prompt lacks: its city, whatever the prompt's wording."""
    words = set(prompt.split())
    return next(w for w in other_prompt.split() if w not in words)


def check(subject: Subject, prompts: list[tuple[str, str, str, str, str]], out: Path = OUT / "two_hop",
          figures: str = "first", case: str = "two-hop factual recall") -> CaseResult:
    result = CaseResult(case)
    def _one(n: int, prompt: Any, answer: Any, city: Any, other_prompt: Any, other_answer: Any) -> None:
        # multi-token answers (common on real tokenizers) are judged by their first token, as in the paper
        a, b = subject.first_token(answer), subject.first_token(other_answer)
        t = trace(subject, prompt, target=a)
        t_other = trace(subject, other_prompt, target=b)
        ids, oids = t.ids, t_other.ids
        pos = _position(subject, ids, city)
        opos = _position(subject, oids, _other_city(prompt, other_prompt))
        group = find_group(t, sources=[t.graph.token_index(pos)], positions=set(range(pos, len(ids))))
        ogroup = find_group(t_other, sources=[t_other.graph.token_index(opos)], positions=set(range(opos, len(oids))))
        # the other prompt's positions, counted from its end, onto this prompt (its city may take more tokens)
        shift = {p: max(0, p + len(ids) - len(oids)) for p in range(len(oids))}
        base = next_probs(subject, ids, [])
        row = {"prompt": prompt.replace("\n", "\\n"), "answer": answer.strip(), "group": len(group),
               "p(answer)": f"{base[a]:.3f}"}

        def run(g: list, og: list) -> tuple[float, int, float]:
            suppressed = next_probs(subject, ids, scaled(g, -2.0))
            # swap: inhibit the group (x -1) and add the other state's group at its activations
            patched = next_probs(subject, ids, scaled(g, -1.0) + values_from(subject, oids, og, shift))
            return float(suppressed[a]), int(patched.argmax()), float(patched[b])

        p_sup, top_patch, p_b = run(group, ogroup)
        ctrl = control_group(t, group, seed=n)
        octrl = control_group(t_other, ogroup, seed=n)
        c_sup, c_top, c_b = run(ctrl, octrl)
        ok = bool(group) and p_sup <= 0.5 * float(base[a]) and top_patch == b
        c_ok = bool(ctrl) and c_sup <= 0.5 * float(base[a]) and c_top == b
        row.update({"suppress x-2": f"{p_sup:.3f}", "patch -> top": subject.word(top_patch),
                    "p(other)": f"{p_b:.3f}", "control sup.": f"{c_sup:.3f}",
                    "control patch": subject.word(c_top)})
        result.record(t, row, ok, c_ok)
        if figure_wanted(n, figures):
            result.files.append(write_figure(subject, t, {"state features": group}, figure_path(out, n, figures),
                                             f"{case}: {prompt!r} -> {answer!r}"))

    for n, (prompt, answer, city, other_prompt, other_answer) in enumerate(variants(prompts, result.case)):
        _one(n, prompt, answer, city, other_prompt, other_answer)
    result.columns = ["prompt", "answer", "group", "p(answer)", "suppress x-2", "control sup.", "patch -> top",
                         "p(other)", "control patch", "result"]
    return result
