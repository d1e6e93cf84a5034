"""Tasks: clean and corrupted prompts with their answers, generated (IOI, greater-than) or read from JSON lines.

An example is a clean prompt, a corrupted prompt of the same token length (the interchange run), the correct
next tokens and the wrong ones (each a single token for the model's tokenizer). Metrics: logit difference =
mean logit of the answers - mean logit of the wrong tokens, at the prompt's last token.

JSON lines format (one example per line; `split` is optional, without it a seeded held-out split is drawn):

    {"clean": "When Mary and John went to the store, John gave a drink to", "corrupted": "When Anna and Paul went
     to the store, Paul gave a drink to", "answer": " Mary", "wrong": [" John"], "split": "train"}

`answer` and `wrong` take a string or a list of strings.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clt_hub.config import load_json
from clt_hub.errors import ConfigError

MAX_TASK_FILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Example:
    clean: str
    corrupted: str
    answers: tuple[str, ...]
    wrong: tuple[str, ...]
    where: str = ""  # file:line, for error messages

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("where")
        d["answer"], d["wrong"] = list(d.pop("answers")), list(d["wrong"])
        return d


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    def save_jsonl(self, path: str | Path) -> None:
        lines = [json.dumps({**e.to_json(), "split": split})
                 for split, part in (("train", self.train), ("test", self.test)) for e in part]
        Path(path).write_text("\n".join(lines) + "\n")


@dataclass
class Batch:
    """Token ids of a batch (right-padded; clean and corrupted rows have the same length)."""

    clean: torch.Tensor     # [B, T]
    corrupted: torch.Tensor  # [B, T]
    last: torch.Tensor      # [B] the position whose next token is predicted
    answers: torch.Tensor   # [B, A] token ids (padded with the first answer)
    answer_mask: torch.Tensor  # [B, A] bool
    wrong: torch.Tensor     # [B, W]
    wrong_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.clean.shape[1])


# --- reading and checking -----------------------------------------------------------------------------------

def _strings(value: Any, field: str, where: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{where}: {field!r} must be a non-empty string or a list of non-empty strings, got "
                          f"{json.dumps(value)[:80]}")
    return tuple(values)


def parse_example(obj: Any, where: str) -> tuple[Example, str | None]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: each line must be a JSON object with clean, corrupted, answer, wrong")
    missing = [k for k in ("clean", "corrupted", "answer", "wrong") if k not in obj]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}; each line needs clean, corrupted, answer, wrong")
    unknown = sorted(set(obj) - {"clean", "corrupted", "answer", "wrong", "split"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: clean, corrupted, answer, "
                          "wrong, split")
    for k in ("clean", "corrupted"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise ConfigError(f"{where}: {k!r} must be a non-empty string")
    split = obj.get("split")
    if split not in (None, "train", "test"):
        raise ConfigError(f"{where}: split must be 'train' or 'test', got {split!r}")
    answers, wrong = _strings(obj["answer"], "answer", where), _strings(obj["wrong"], "wrong", where)
    both = set(answers) & set(wrong)
    if both:
        raise ConfigError(f"{where}: {sorted(both)} is both an answer and a wrong answer")
    return Example(obj["clean"], obj["corrupted"], answers, wrong, where), split


def load_jsonl(path: str | Path, test_fraction: float = 0.5, seed: int = 0) -> Task:
    """A task file (JSON lines). Lines with a `split` go there; the rest are split train/test by `seed`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist; give a .jsonl file or a built-in task (ioi, "
                          "greater-than)")
    if path.stat().st_size > MAX_TASK_FILE_BYTES:
        raise ConfigError(f"task file {path} is over {MAX_TASK_FILE_BYTES >> 20} MB; a task needs a few hundred "
                          "examples at most")
    fixed: dict[str, list[Example]] = {"train": [], "test": []}
    free: list[Example] = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{n}"
        obj = load_json(line, source=where, what="task line", max_bytes=MAX_TASK_FILE_BYTES,
                        fix="write one JSON object per line, with clean, corrupted, answer and wrong")
        ex, split = parse_example(obj, where)
        (fixed[split] if split else free).append(ex)
    if not (fixed["train"] or fixed["test"] or free):
        raise ConfigError(f"task file {path} has no examples")
    random.Random(seed).shuffle(free)
    n_test = round(len(free) * test_fraction)
    train, test = fixed["train"] + free[n_test:], fixed["test"] + free[:n_test]
    if not train or not test:
        raise ConfigError(f"task file {path} gives {len(train)} training and {len(test)} held-out examples; "
                          "both need at least one (add examples, or mark some with \"split\": \"test\")")
    return Task(path.stem, tuple(train), tuple(test))


def single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _encode(tokenizer: Any, prompt: str) -> list[int]:
    from clt_hub.models.loading import encode_prompt  # refuses words the tokenizer does not know

    return encode_prompt(tokenizer, prompt).tolist()


def check_example(tokenizer: Any, ex: Example, context: int | None = None) -> tuple[list[int], list[int], list[int],
                                                                                   list[int]]:
    """Token ids (clean, corrupted, answers, wrong), or a ConfigError naming the example and the fix."""
    where = f"{ex.where}: " if ex.where else ""
    clean, corrupted = _encode(tokenizer, ex.clean), _encode(tokenizer, ex.corrupted)
    if len(clean) != len(corrupted):
        raise ConfigError(f"{where}the clean prompt is {len(clean)} tokens and the corrupted one {len(corrupted)}; "
                          "they must have the same length (positions are patched one for one); change the "
                          "corrupted words for ones of the same token length")
    if context is not None and len(clean) > context:
        raise ConfigError(f"{where}the prompt is {len(clean)} tokens but the model's context is {context}; shorten it")
    ids: list[list[int]] = []
    for field_name, texts in (("answer", ex.answers), ("wrong", ex.wrong)):
        found = []
        for t in texts:
            tid = single_token(tokenizer, t)
            if tid is None:
                pieces = tokenizer.convert_ids_to_tokens(tokenizer(t, add_special_tokens=False)["input_ids"])
                raise ConfigError(f"{where}{field_name} {t!r} is {len(pieces)} tokens for this tokenizer ({pieces}); "
                                  "answers must be single tokens (try a leading space, or another word)")
            found.append(tid)
        ids.append(found)
    return clean, corrupted, ids[0], ids[1]


def batches(tokenizer: Any, examples: Sequence[Example], batch_size: int, context: int | None = None,
            pad_id: int = 0) -> list[Batch]:
    """Tokenised batches in the given order (every example checked first: one error names the bad one)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    rows = [check_example(tokenizer, ex, context) for ex in examples]
    out = []
    for i in range(0, len(rows), batch_size):
        part = rows[i: i + batch_size]
        T = max(len(r[0]) for r in part)
        A = max(len(r[2]) for r in part)
        W = max(len(r[3]) for r in part)

        def pad(seq: list[int], n: int, value: int) -> list[int]:
            return seq + [value] * (n - len(seq))
        out.append(Batch(
            clean=torch.tensor([pad(r[0], T, pad_id) for r in part]),
            corrupted=torch.tensor([pad(r[1], T, pad_id) for r in part]),
            last=torch.tensor([len(r[0]) - 1 for r in part]),
            answers=torch.tensor([pad(r[2], A, r[2][0]) for r in part]),
            answer_mask=torch.tensor([[j < len(r[2]) for j in range(A)] for r in part]),
            wrong=torch.tensor([pad(r[3], W, r[3][0]) for r in part]),
            wrong_mask=torch.tensor([[j < len(r[3]) for j in range(W)] for r in part]),
        ))
    return out


def logit_diff(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B]: mean logit of the answers - mean logit of the wrong tokens."""
    def mean(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        vals = logits.gather(1, ids.to(logits.device)) * mask.to(logits.dtype)
        return vals.sum(1) / mask.sum(1).to(logits.dtype)
    return mean(batch.answers, batch.answer_mask) - mean(batch.wrong, batch.wrong_mask)


def correct(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B] bool: the best answer beats the best wrong token."""
    neg = torch.finfo(logits.dtype).min
    best = logits.gather(1, batch.answers).masked_fill(~batch.answer_mask, neg).max(1).values
    worst = logits.gather(1, batch.wrong).masked_fill(~batch.wrong_mask, neg).max(1).values
    return best > worst


# --- built-in tasks -------------------------------------------------------------------------------------------

NAMES = ("Mary", "John", "Alice", "Bob", "James", "Michael", "David", "Sarah", "Laura", "Thomas", "Daniel", "Emma",
         "Anna", "Paul", "Mark", "Peter", "Kevin", "Jessica", "Lisa", "Karen", "Steven", "Rachel", "Jennifer", "Tom",
         "Richard", "Robert", "William", "Susan", "Linda", "George", "Edward", "Helen", "Jack", "Kate", "Sam",
         "Eric", "Amy", "Adam", "Andrew", "Brian", "Charles", "Chris", "Emily", "Frank", "Grace", "Henry", "Jane",
         "Joe", "Julia", "Lucy", "Martin", "Matt", "Nancy", "Oliver", "Patrick", "Ryan", "Sophie", "Victoria")
IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {B} gave a drink to",
    "When {A} and {B} went to the park, {B} gave a ball to",
    "After {A} and {B} went to the school, {B} gave a book to",
    "Then, {A} and {B} had a long argument. Afterwards {B} said to",
    "While {A} and {B} were working at the office, {B} gave a report to",
    "Friends {A} and {B} found a bag at the beach. {B} gave it to",
)
GT_NOUNS = ("war", "expedition", "project", "dynasty", "reign", "drought", "strike", "occupation", "famine",
            "voyage", "journey", "contract", "trial", "campaign", "conflict", "siege")
GT_TEMPLATE = "The {noun} lasted from the year {century}{yy:02d} to the year {century}"


def _names(tokenizer: Any) -> list[str]:
    return [n for n in NAMES if single_token(tokenizer, " " + n) is not None]


def ioi(tokenizer: Any, n: int = 64, seed: int = 0, test_fraction: float = 0.5) -> Task:
    """Indirect object identification (Wang et al. 2022): "When Mary and John ..., John gave a drink to" ->
    " Mary" (wrong: " John"). Corrupted: the same template with two other names (another name set). Both orders
    (ABB and BAB); names that are one token with a leading space for this tokenizer."""
    names = _names(tokenizer)
    if len(names) < 4:
        raise ConfigError(f"only {len(names)} of the built-in names are single tokens for this tokenizer; write the "
                          "task as a JSON lines file instead")
    rng = random.Random(seed)

    def draw() -> Example:
        a, b, c, d = rng.sample(names, 4)
        template = rng.choice(IOI_TEMPLATES)
        if rng.random() < 0.5:  # BAB order: the subject comes first
            template = template.replace("{A} and {B}", "{B} and {A}", 1)
        return Example(template.format(A=a, B=b), template.format(A=c, B=d), (" " + a,), (" " + b,))

    return _split("ioi", _generated("ioi", draw, tokenizer, n), test_fraction)


def _year_tokens(tokenizer: Any, century: int) -> str:
    """How the tokenizer continues "... the year {century}": 'pairs' (one token per two digits, as GPT-2's "32")
    or 'digits' (one digit per token, as Gemma's and SmolLM2's)."""
    prefix = _encode(tokenizer, f"the year {century}")
    full = _encode(tokenizer, f"the year {century}32")
    if full[: len(prefix)] == prefix and len(full) == len(prefix) + 1:
        return "pairs"
    if full[: len(prefix)] == prefix and len(full) == len(prefix) + 2:
        return "digits"
    raise ConfigError("this tokenizer splits years in a way the greater-than task does not handle (neither two "
                      "digits nor one digit per token); write the task as a JSON lines file")


def greater_than(tokenizer: Any, n: int = 64, seed: int = 0, test_fraction: float = 0.5) -> Task:
    """Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year after 32.
    Corrupted: start year ..01. Tokenizers with two-digit tokens: answers are the pairs > YY, wrong the pairs
    <= YY. One digit per token: the next token is the tens digit; answers are the digits > YY's tens digit,
    wrong the digits below it (the tens digit itself can go either way and is in neither)."""
    rng = random.Random(seed)
    mode = _year_tokens(tokenizer, 17)

    def draw() -> Example:
        noun, century = rng.choice(GT_NOUNS), rng.randint(11, 17)
        if mode == "pairs":
            yy = rng.randint(2, 98)
            answers = tuple(f"{y:02d}" for y in range(yy + 1, 100))
            wrong = tuple(f"{y:02d}" for y in range(0, yy + 1))
        else:
            yy = rng.randint(10, 89)
            answers = tuple(str(t) for t in range(yy // 10 + 1, 10))
            wrong = tuple(str(t) for t in range(0, yy // 10))
        return Example(GT_TEMPLATE.format(noun=noun, century=century, yy=yy),
                       GT_TEMPLATE.format(noun=noun, century=century, yy=1), answers, wrong)

    return _split("greater-than", _generated("greater-than", draw, tokenizer, n), test_fraction)


def _generated(name: str, draw: Callable[[], Example], tokenizer: Any, n: int) -> list[Example]:
    """`n` drawn examples this tokenizer can run (single-token answers, equal lengths), from a bounded number of
    draws: a tokenizer that rejects nearly all of them is an error naming the last reason, not an endless loop."""
    examples: list[Example] = []
    reason = ""
    for _ in range(max(200, 50 * n)):
        ex = draw()
        try:
            check_example(tokenizer, ex)
        except ConfigError as exc:
            reason = str(exc)
            continue
        examples.append(ex)
        if len(examples) == n:
            return examples
    raise ConfigError(f"only {len(examples)} of {n} {name} examples could be built for this tokenizer in "
                      f"{max(200, 50 * n)} tries (last refusal: {reason[:200]}); write the task as a JSON lines "
                      "file instead")


def _split(name: str, examples: list[Example], test_fraction: float) -> Task:
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, round(len(examples) * test_fraction))
    return Task(name, tuple(examples[n_test:]), tuple(examples[:n_test]))


BUILT_IN = {"ioi": ioi, "greater-than": greater_than, "gt": greater_than}


def get_task(name_or_path: str, tokenizer: Any, n: int = 64, seed: int = 0, test_fraction: float = 0.5) -> Task:
    """A built-in task by name (ioi, greater-than) or a JSON lines file."""
    if name_or_path in BUILT_IN:
        return BUILT_IN[name_or_path](tokenizer, n=n, seed=seed, test_fraction=test_fraction)
    if name_or_path.endswith((".jsonl", ".json")) or Path(name_or_path).exists():
        return load_jsonl(name_or_path, test_fraction=test_fraction, seed=seed)
    raise ConfigError(f"unknown task {name_or_path!r}; built-in tasks: ioi, greater-than, or a .jsonl file "
                      "(see clt_hub.circuits.tasks for the format)")
