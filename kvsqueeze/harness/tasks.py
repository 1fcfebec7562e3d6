"""Accuracy tasks for the load harness: generated, deterministic, scored per sample and by majority vote.

Three tasks the embedded 135M model can partly solve (so that accuracy moves with compression):

- ``passkey``: a 5-digit key hidden at a random depth in ~1k tokens of filler (the prompt of
  ``kvsqueeze eval --task passkey``); the answer is the key.
- ``lookup``: an in-context table of ``name: number`` pairs (~250 tokens), then a question about one
  name; exact match on the number.
- ``arithmetic``: few-shot two-number addition; exact match on the sum.
- ``needle``: a 5-digit pass key hidden at a random depth of the middle half of ~650 tokens of held-out
  prose (Python's documentation, a random excerpt per question); the answer is the key. What a cache
  evicts from the middle of the context decides it.
- ``facts``: three ``(NAME's locker number is NNN.)`` notes at random places of the middle half of ~650
  tokens of held-out prose, then a question about one of them; exact match on the number. Retrieval
  with distractors: the wrong notes are plausible answers.
- ``neardup``: near-duplicate traffic (what block fusion and prefix caching are for): every question is
  the same held-out document (~1k tokens of Python's documentation) with 4 word substitutions at random
  places and a 5-digit key at a random depth; the answer is the key.

``needle`` and ``facts`` take their context length as a setting, ``needle:CHARS`` (characters of held-out
prose; default 2500, ~650 tokens): on this CPU the prompt's prefill is most of a sweep's cost.
``needle`` and ``facts`` are the tasks of the hyper-scaling reproduction: on the embedded model at
temperature 0.7 a single sample is right about a quarter to a half of the time and the majority of 8
samples markedly more often (``benchmarks/harness_tasks.py``, results/harness/tasks.md, measured on the
``dev`` split). Questions come from two disjoint seed ranges: ``dev`` (for choosing settings) and
``eval`` (what ``kvsqueeze bench`` runs; never used to choose anything).

Every question is plain completion text (the same text goes to ``/generate``, ``/v1/completions``, and
as the user message to ``/v1/chat/completions``). The extracted answer of a completion is its first
run of digits; majority vote takes the most frequent extracted answer over the W samples (ties go to
the answer seen first), and is correct when that answer equals the reference.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import asdict, dataclass

from kvsqueeze.corpus import heldout_documents, passkey_text
from kvsqueeze.errors import bad_value
from kvsqueeze.harness.stats import majority  # noqa: F401  (where the harness has always found it)

TASKS = ("passkey", "lookup", "arithmetic", "neardup", "needle", "facts")
SPLITS = ("eval", "dev")
DEFAULT_TASKS = ("needle", "facts")

_NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jonas",
          "Kemal", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tomas",
          "Uma", "Viktor", "Wen", "Yara", "Zofia")


@dataclass(frozen=True)
class Question:
    qid: str
    task: str
    prompt: str
    answer: str

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_question(rng: random.Random, qid: str, filler_reps: int = 48) -> Question:
    """~1k tokens with the embedded tokenizer at the default 48 filler repetitions."""
    key = rng.randint(10000, 99999)
    before = rng.randint(0, filler_reps)
    text = passkey_text(key, before, filler_reps - before)
    return Question(qid, "passkey", text, str(key))


def lookup_question(rng: random.Random, qid: str, entries: int = 16) -> Question:
    names = rng.sample(_NAMES, entries)
    values = {n: rng.randint(100, 999) for n in names}
    table = "\n".join(f"{n}: {values[n]}" for n in names)
    asked = rng.choice(names)
    text = (f"Each person below has a locker number.\n{table}\n\n"
            f"Question: What is {asked}'s locker number?\nAnswer: {asked}'s locker number is")
    return Question(qid, "lookup", text, str(values[asked]))


def arithmetic_question(rng: random.Random, qid: str, shots: int = 4) -> Question:
    lines = []
    for _ in range(shots):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        lines.append(f"Q: What is {a} + {b}?\nA: {a + b}")
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    text = "\n".join(lines) + f"\nQ: What is {a} + {b}?\nA:"
    return Question(qid, "arithmetic", text, str(a + b))


_EDIT_WORDS = ("the", "a", "this", "that", "new", "old", "first", "last", "small", "large", "other")


@functools.lru_cache(maxsize=1)
def _prose() -> str:
    return heldout_documents()[0].text


@functools.lru_cache(maxsize=1)
def _neardup_base(chars: int = 3600) -> tuple[str, ...]:
    """The held-out excerpt every neardup question edits (read once per process)."""
    text = _prose()
    start = text.find("\n\n", len(text) // 3) + 2
    return tuple(text[start:start + chars].split(" "))


def neardup_question(rng: random.Random, qid: str) -> Question:
    words = list(_neardup_base())
    for i in rng.sample(range(len(words)), 4):
        words[i] = rng.choice(_EDIT_WORDS)
    key = rng.randint(10000, 99999)
    at = rng.randint(len(words) // 10, len(words) - 1)
    words.insert(at, f"The pass key is {key}. Remember it.")
    text = ("Read the document below. A pass key is hidden in it.\n\n" + " ".join(words)
            + "\n\nWhat is the pass key? The pass key is")
    return Question(qid, "neardup", text, str(key))


def _excerpt_words(rng: random.Random, chars: int) -> list[str]:
    """A random excerpt of held-out prose, from a paragraph start, split on spaces."""
    text = _prose()
    start = text.find("\n\n", rng.randint(0, len(text) - 2 * chars)) + 2
    return text[start:start + chars].split(" ")


def needle_question(rng: random.Random, qid: str, chars: int = 2500) -> Question:
    """~650 tokens with the embedded tokenizer at the default 2500 characters."""
    words = _excerpt_words(rng, chars)
    key = rng.randint(10000, 99999)
    words.insert(rng.randint(len(words) // 4, 3 * len(words) // 4), f"The pass key is {key}. Remember it.")
    text = ("Read the text below. A pass key is hidden in it.\n\n" + " ".join(words)
            + "\n\nWhat is the pass key? The pass key is")
    return Question(qid, "needle", text, str(key))


def facts_question(rng: random.Random, qid: str, facts: int = 3, chars: int = 2500) -> Question:
    words = _excerpt_words(rng, chars)
    names = rng.sample(_NAMES, facts)
    values = {n: rng.randint(100, 999) for n in names}
    places = sorted(rng.sample(range(len(words) // 4, 3 * len(words) // 4), facts), reverse=True)
    for at, name in zip(places, names):  # from the back, so earlier places stay where they were
        words.insert(at, f"({name}'s locker number is {values[name]}.)")
    asked = rng.choice(names)
    text = ("Read the text below. Some locker numbers are hidden in it.\n\n" + " ".join(words)
            + f"\n\nQuestion: What is {asked}'s locker number?\nAnswer: {asked}'s locker number is")
    return Question(qid, "facts", text, str(values[asked]))


_BUILDERS = {"passkey": passkey_question, "lookup": lookup_question,
             "arithmetic": arithmetic_question, "neardup": neardup_question,
             "needle": needle_question, "facts": facts_question}


SIZED = ("needle", "facts")  # tasks whose context length is a setting: TASK:CHARS
MIN_CHARS, MAX_CHARS = 400, 20000  # characters of held-out prose a sized task's context may take


def task_setting(spec: str) -> tuple[str, int | None]:
    """``needle`` -> ("needle", None); ``needle:1250`` -> ("needle", 1250): the context's characters of
    held-out prose (default 2500, ~650 tokens with the embedded tokenizer; ~0.26 tokens a character)."""
    name, _, chars = spec.partition(":")
    if name not in TASKS:
        raise bad_value("tasks", spec, f"one of {', '.join(TASKS)} (or {'/'.join(SIZED)}:CHARS)")
    if not chars:
        return name, None
    if name not in SIZED:
        raise bad_value("tasks", spec, f"{name} without a size (only {', '.join(SIZED)} take :CHARS)")
    if not chars.isdigit() or not MIN_CHARS <= int(chars) <= MAX_CHARS:
        raise bad_value("tasks", spec, f"{name}:CHARS with CHARS a whole number of characters of context "
                        f"in [{MIN_CHARS}, {MAX_CHARS}]")
    return name, int(chars)


def parse_tasks(text: str | list[str]) -> list[str]:
    """``needle,facts:1250`` -> the task specs (each checked by :func:`task_setting`)."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise bad_value("tasks", text, f"a comma-separated list of {', '.join(TASKS)}")
    for t in names:
        task_setting(t)
    return names


def make_questions(tasks: list[str], per_task: int, seed: int = 0, split: str = "eval") -> list[Question]:
    """``per_task`` questions of each task, interleaved (so a truncated run still covers each task).

    ``split`` picks the seed range: ``eval`` (what benchmarks report; seed 0 of ``eval`` is the
    question set every earlier release generated) or ``dev`` (for choosing settings: disjoint from
    every ``eval`` seed)."""
    if per_task < 1:
        raise bad_value("questions", per_task, "a number of questions per task >= 1")
    if split not in SPLITS:
        raise bad_value("split", split, f"one of {', '.join(SPLITS)}")
    rng = random.Random(seed if split == "eval" else f"dev:{seed}")
    by_task = {}
    for t in tasks:
        name, chars = task_setting(t)
        build = _BUILDERS[name] if chars is None else functools.partial(_BUILDERS[name], chars=chars)
        by_task[t] = [_sized(build(rng, f"{t}-{i}"), t) for i in range(per_task)]
    return [by_task[t][i] for i in range(per_task) for t in tasks]


def _sized(q: Question, spec: str) -> Question:
    """The question under its task's spec (``facts:1250``), so that reports tell the sizes apart."""
    return q if q.task == spec else Question(q.qid, spec, q.prompt, q.answer)


_NUMBER = re.compile(r"\d+")


def extract_answer(completion: str) -> str | None:
    """The first run of digits in the completion, or None."""
    m = _NUMBER.search(completion or "")
    return m.group(0) if m else None
