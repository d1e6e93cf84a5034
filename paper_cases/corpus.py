"""The organism's synthetic corpus: two-hop facts, digit addition, rhyming couplets, and filler.

Seeded and word-level. Each task keeps a held-out set the model never sees, so its held-out
accuracy shows computation (through the state, the digits, the planned rhyme) rather than recall:
- facts: "fact : the capital of the state containing Dallas is Austin". One-hop facts ("the state
  containing Dallas is Texas", "the capital of Texas is Austin") are all in training; a fifth of
  the two-hop facts are held out.
- addition: "calc : 3 6 + 5 9 = 9 5" over operands 0-99; a tenth of the operand pairs are held out.
- couplets: "poem : he saw a rabbit \\n fed the habit": line 2 ends in another word of line 1's
  rhyme family, which one set by line 1 (the subject names the member: he the 1st, she the 2nd,
  they the 3rd; the 4th if that is line 1's own word), and line 2's lead-in words belong to that end word. The lead-in comes first, so
  the model has to settle the end word at the newline, before writing line 2: planning is required
  by the data. A tenth of the (line-1 end, subject) combinations are held out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

STATES: dict[str, list[str]] = {
    "Texas": ["Dallas", "Houston", "Lubbock", "Waco"],
    "California": ["Oakland", "Fresno", "Irvine", "Modesto"],
    "Georgia": ["Savannah", "Macon", "Augusta", "Athens"],
    "Illinois": ["Chicago", "Peoria", "Joliet", "Elgin"],
    "Ohio": ["Cleveland", "Dayton", "Toledo", "Akron"],
    "Florida": ["Miami", "Tampa", "Orlando", "Naples"],
    "Nevada": ["Reno", "Henderson", "Elko", "Sparks"],
    "Oregon": ["Portland", "Eugene", "Bend", "Medford"],
    "Michigan": ["Detroit", "Flint", "Warren", "Novi"],
    "Arizona": ["Phoenix", "Tucson", "Mesa", "Yuma"],
}
ATTRIBUTES: dict[str, list[str]] = {
    "capital": ["Austin", "Sacramento", "Atlanta", "Springfield", "Columbus", "Tallahassee", "Carson",
                "Salem", "Lansing", "Prescott"],
    "bird": ["mockingbird", "quail", "thrasher", "cardinal", "robin", "heron", "bluebird", "meadowlark",
             "warbler", "wren"],
    "flower": ["bluebonnet", "poppy", "azalea", "violet", "carnation", "blossom", "sagebrush", "grape",
               "apple", "cactus"],
    "river": ["Brazos", "Merced", "Chattahoochee", "Kaskaskia", "Scioto", "Suwannee", "Truckee", "Willamette",
              "Huron", "Gila"],
}
# rhyme families: end word -> its own lead-in words (line 2 = lead-in pair + end word)
RHYMES: dict[str, dict[str, list[str]]] = {
    "abbit": {"rabbit": ["chased the", "fed the"], "habit": ["broke the", "kept the"],
              "grab_it": ["reached to", "leaned to"], "cabinet": ["opened the", "painted the"]},
    "ight": {"night": ["walked all", "slept all"], "light": ["turned the", "saw the"],
             "kite": ["flew a", "built a"], "bite": ["took a", "ate a"]},
    "ay": {"day": ["spent the", "loved the"], "hay": ["stacked the", "cut the"],
           "clay": ["shaped the", "baked the"], "play": ["watched the", "wrote a"]},
    "ee": {"tree": ["climbed the", "planted a"], "sea": ["sailed the", "crossed the"],
           "key": ["lost the", "found the"], "bee": ["heard the", "followed the"]},
    "ing": {"king": ["met the", "served the"], "ring": ["wore the", "sold the"],
            "spring": ["waited for", "hoped for"], "string": ["pulled the", "tied the"]},
    "ed": {"bed": ["made the", "left the"], "bread": ["baked the", "sliced the"],
           "thread": ["spun the", "cut the"], "shed": ["built a", "cleaned the"]},
    "ain": {"rain": ["felt the", "heard the"], "train": ["caught the", "missed the"],
            "chain": ["broke the", "held the"], "grain": ["sold the", "stored the"]},
    "een": {"green": ["painted it", "dyed it"], "queen": ["bowed to", "wrote to"],
            "screen": ["fixed the", "cleaned the"], "bean": ["grew a", "planted a"]},
}
SUBJECTS = ["he", "she", "they"]  # which member of line 1's rhyme family ends line 2
LINE1_VERBS = ["saw", "found", "wanted", "remembered", "dreamed of"]
FILLER_NOUNS = ["cat", "dog", "farmer", "child", "teacher", "bird", "horse", "baker", "sailor", "miner"]
FILLER_VERBS = ["sat", "slept", "waited", "sang", "worked", "rested", "stood", "ran"]
FILLER_PLACES = ["on the mat", "by the door", "in the barn", "near the road", "under the bridge", "at the market",
                 "in the field", "by the river"]


def family_of(word: str) -> str:
    for fam, words in RHYMES.items():
        if word in words:
            return fam
    raise KeyError(word)


@dataclass
class Corpus:
    train: list[str]
    heldout: dict[str, list[tuple[str, str]]]          # task -> [(prompt, expected completion)]
    heldout_text: list[str] = field(default_factory=list)  # for transcoder evaluation


def fact_prompt(city: str, attribute: str) -> str:
    return f"fact : the {attribute} of the state containing {city} is"


def addition_prompt(a: int, b: int) -> str:
    return "calc : " + " ".join(str(a)) + " + " + " ".join(str(b)) + " ="


def addition_answer(a: int, b: int) -> str:
    return " ".join(str(a + b))


def couplet_prompt(line1_end: str, subject: str = "he", verb: str = "saw") -> str:
    return f"poem : {subject} {verb} a {line1_end} \n"


def planned_end(line1_end: str, subject: str) -> str:
    """The end word line 2 must have: the family member the subject names (he: 1st, she: 2nd,
    they: 3rd), or the family's 4th word when that is line 1's own end word."""
    words = list(RHYMES[family_of(line1_end)])
    chosen = words[SUBJECTS.index(subject)]
    return words[3] if chosen == line1_end else chosen


def build(seed: int = 0, n_train: int = 60000) -> Corpus:
    rng = random.Random(seed)
    # --- facts
    one_hop, two_hop = [], []
    for s_i, (state, cities) in enumerate(STATES.items()):
        for attr, values in ATTRIBUTES.items():
            one_hop.append(f"fact : the {attr} of {state} is {values[s_i]}")
        for city in cities:
            one_hop.append(f"fact : the state containing {city} is {state}")
            for attr, values in ATTRIBUTES.items():
                two_hop.append((fact_prompt(city, attr), values[s_i]))
    rng.shuffle(two_hop)
    n_hold = len(two_hop) // 5
    facts_held, facts_train = two_hop[:n_hold], two_hop[n_hold:]
    # --- addition
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    add_held, add_train = pairs[: len(pairs) // 10], pairs[len(pairs) // 10:]
    # --- couplets: hold out (line-1 end, subject) combinations
    couplet_pairs = [(w1, subj) for fam in RHYMES.values() for w1 in fam for subj in SUBJECTS]
    rng.shuffle(couplet_pairs)
    cp_held = couplet_pairs[: len(couplet_pairs) // 10]
    cp_train = couplet_pairs[len(couplet_pairs) // 10:]

    def couplet(w1: str, subj: str) -> str:
        w2 = planned_end(w1, subj)
        lead = rng.choice(RHYMES[family_of(w2)][w2])
        return f"{couplet_prompt(w1, subj, rng.choice(LINE1_VERBS))} {lead} {w2}"

    def filler() -> str:
        n, v, p = rng.choice(FILLER_NOUNS), rng.choice(FILLER_VERBS), rng.choice(FILLER_PLACES)
        return f"the {n} {v} {p}"

    train: list[str] = []
    for _ in range(n_train):
        r = rng.random()
        if r < 0.10:
            train.append(rng.choice(one_hop))
        elif r < 0.30:
            question, answer = rng.choice(facts_train)
            train.append(f"{question} {answer}")
        elif r < 0.62:
            a, b = rng.choice(add_train)
            train.append(f"{addition_prompt(a, b)} {addition_answer(a, b)}")
        elif r < 0.92:
            train.append(couplet(*rng.choice(cp_train)))
        else:
            train.append(filler())
    heldout = {
        "two-hop facts": facts_held,
        "addition": [(addition_prompt(a, b), addition_answer(a, b)) for a, b in add_held],
        "couplets": [(couplet_prompt(w1, subj), planned_end(w1, subj)) for w1, subj in cp_held],
    }
    heldout_text = [f"{p} {a}" for p, a in facts_held] + \
        [f"{addition_prompt(a, b)} {addition_answer(a, b)}" for a, b in add_held[:300]] + \
        [couplet(w1, subj) for w1, subj in cp_held] + [filler() for _ in range(100)]
    return Corpus(train, heldout, heldout_text)


def vocabulary(corpus: Corpus) -> list[str]:
    words: set[str] = set()
    for text in corpus.train + corpus.heldout_text + [p for task in corpus.heldout.values() for p, _ in task]:
        words.update(text.split(" "))
    return ["<bos>", "<eos>", "<pad>", "<unk>"] + sorted(words - {""})
