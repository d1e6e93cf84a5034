"""The organism's synthetic corpus: two-hop facts, digit addition, rhyming couplets, and filler.

Seeded and word-level. Each task keeps a held-out set the model never sees, so its held-out
accuracy shows computation (through the state, the digits, the planned rhyme) rather than recall:
- facts: "fact : the capital of the state containing Dallas is Austin". One-hop facts ("the state
  containing Dallas is Texas", "the capital of Texas is Austin") are all in training; a fifth of
  the two-hop facts are held out.
- addition: "calc : 3 6 + 5 9 = 9 5" over operands 0-99; a tenth of the operand pairs are held out.
- couplets: "poem : she saw a carrot and a habit \\n chased the rabbit": line 2 ends in another word
  of line 1's rhyme family. Which one is set by a cue in line 1 (each end word has two cue nouns:
  carrot or burrow -> rabbit); without a cue, any other member. Line 2's lead-in depends on the end
  word, but each lead-in is shared by two neighbouring members, so it narrows the end word without
  naming it. The lead-in comes first, so the model has to settle the end word at the newline, before
  writing line 2, and still needs that plan when it writes the end word. A tenth of the (cue, line-1
  end) combinations are held out.
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
# rhyme families: members in order, and four lead-in phrases. Member i takes lead-in i or i+1 (mod 4),
# so each lead-in is shared by two neighbouring members: the words before the end word depend on it,
# but do not name it. Writing the end word after the lead-in still needs the plan made at the newline.
FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "abbit": (["rabbit", "habit", "grab_it", "cabinet"], ["chased the", "kept the", "reached for", "opened the"]),
    "ight": (["night", "light", "kite", "bite"], ["walked all", "turned the", "flew a", "took a"]),
    "ay": (["day", "hay", "clay", "play"], ["spent the", "stacked the", "shaped the", "watched the"]),
    "ee": (["tree", "sea", "key", "bee"], ["climbed the", "sailed the", "lost the", "heard the"]),
    "ing": (["king", "ring", "spring", "string"], ["met the", "wore the", "waited for", "pulled the"]),
    "ed": (["bed", "bread", "thread", "shed"], ["made the", "sliced the", "spun the", "cleaned the"]),
    "ain": (["rain", "train", "chain", "grain"], ["felt the", "caught the", "held the", "stored the"]),
    "een": (["green", "queen", "screen", "bean"], ["painted it", "bowed to", "fixed the", "grew a"]),
}
# end word -> the lead-ins the corpus pairs with it
RHYMES: dict[str, dict[str, list[str]]] = {
    fam: {w: [leads[i], leads[(i + 1) % len(leads)]] for i, w in enumerate(words)}
    for fam, (words, leads) in FAMILIES.items()
}
# end word -> its two cue nouns: a cue in line 1 names the end word of line 2 (carrot -> rabbit)
CUES: dict[str, list[str]] = {
    "rabbit": ["carrot", "burrow"], "habit": ["smoking", "routine"], "grab_it": ["handle", "railing"],
    "cabinet": ["cupboard", "drawer"], "night": ["moon", "owl"], "light": ["lamp", "candle"],
    "kite": ["breeze", "ribbon"], "bite": ["snack", "sandwich"], "day": ["sunrise", "morning"],
    "hay": ["pitchfork", "bale"], "clay": ["potter", "kiln"], "play": ["theater", "actor"],
    "tree": ["acorn", "branch"], "sea": ["wave", "ship"], "key": ["padlock", "keyhole"], "bee": ["honey", "hive"],
    "king": ["crown", "throne"], "ring": ["diamond", "finger"], "spring": ["tulip", "thaw"],
    "string": ["violin", "yarn"], "bed": ["pillow", "blanket"], "bread": ["flour", "toaster"],
    "thread": ["needle", "spool"], "shed": ["shovel", "garden"], "rain": ["cloud", "umbrella"],
    "train": ["station", "ticket"], "chain": ["anchor", "bicycle"], "grain": ["wheat", "harvest"],
    "green": ["grass", "frog"], "queen": ["castle", "jewel"], "screen": ["monitor", "movie"],
    "bean": ["sprout", "soup"],
}
CUE_WORD = {cue: word for word, cues in CUES.items() for cue in cues}
SUBJECTS = ["he", "she", "they"]
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


def cued_lines() -> list[tuple[str, str]]:
    """Every (line-1 end word, cue) a couplet can have: a cue naming another member of the word's family."""
    return [(w1, cue) for fam in RHYMES.values() for w1 in fam for w2 in fam if w2 != w1 for cue in CUES[w2]]


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


def poem_prompt(line1: str) -> str:
    """A couplet's prompt up to and including the newline that ends line 1."""
    return f"poem : {line1} \n"


def couplet_prompt(line1_end: str, cue: str | None = None, subject: str = "he", verb: str = "saw") -> str:
    middle = f"a {cue} and a" if cue else "a"
    return poem_prompt(f"{subject} {verb} {middle} {line1_end}")


def _facts(rng: random.Random) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """One-hop facts (all trained) and two-hop prompts with answers, a fifth held out."""
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
    return one_hop, two_hop[:n_hold], two_hop[n_hold:]


def build(seed: int = 0, n_train: int = 60000) -> Corpus:
    rng = random.Random(seed)
    one_hop, facts_held, facts_train = _facts(rng)
    # --- addition
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    add_held, add_train = pairs[: len(pairs) // 10], pairs[len(pairs) // 10:]
    # --- couplets: hold out (cue, line-1 end) combinations
    couplet_pairs = cued_lines()
    rng.shuffle(couplet_pairs)
    cp_held = couplet_pairs[: len(couplet_pairs) // 10]
    cp_train = couplet_pairs[len(couplet_pairs) // 10:]

    def couplet(w1: str, cue: str | None) -> str:
        family = RHYMES[family_of(w1)]
        w2 = CUE_WORD[cue] if cue else rng.choice([w for w in family if w != w1])
        lead = rng.choice(family[w2])
        return f"{couplet_prompt(w1, cue, rng.choice(SUBJECTS), rng.choice(LINE1_VERBS))} {lead} {w2}"

    all_words = [w for fam in RHYMES.values() for w in fam]

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
            train.append(couplet(*rng.choice(cp_train)) if rng.random() < 0.75 else couplet(rng.choice(all_words), None))
        else:
            train.append(filler())
    heldout = {
        "two-hop facts": facts_held,
        "addition": [(addition_prompt(a, b), addition_answer(a, b)) for a, b in add_held],
        "couplets": [(couplet_prompt(w1, cue), CUE_WORD[cue]) for w1, cue in cp_held],
    }
    heldout_text = [f"{p} {a}" for p, a in facts_held] + \
        [f"{addition_prompt(a, b)} {addition_answer(a, b)}" for a, b in add_held[:300]] + \
        [couplet(w1, cue) for w1, cue in cp_held] + [filler() for _ in range(100)]
    return Corpus(train, heldout, heldout_text)


def vocabulary(corpus: Corpus) -> list[str]:
    words: set[str] = set()
    for text in corpus.train + corpus.heldout_text + [p for task in corpus.heldout.values() for p, _ in task]:
        words.update(text.split(" "))
    return ["<bos>", "<eos>", "<pad>", "<unk>"] + sorted(words - {""})
