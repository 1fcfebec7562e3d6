"""Near-duplicate traffic: the workload that block fusion (and prefix caching) is measured on.

Three kinds, each a list of *groups* of requests that are near-duplicates of one another:

- ``edits``: one held-out document window per group; each request is that window with ``edits``
  single-token word substitutions at random places (typo fixes, renamed variables, changed words), so
  requests share an exact prefix only up to their first edit and stay token-aligned after it;
- ``fewshot``: one system prompt with few-shot examples whose fillers (names, numbers, places,
  items) differ per request; fillers are single tokens or fixed-width numbers, so examples stay
  token-aligned across requests;
- ``chat``: multi-turn chats that diverge in the first user turn (who asks, about what), then paste
  the same long document: an exact prefix cache shares only the system prompt.

Every request carries ``prompt_ids`` (the prefix that is cached), ``scored_ids`` (tokens that follow,
teacher-forced to measure quality) and ``text`` (the decoded prompt, for HTTP load). Built from text on
disk only (held-out text: ``kvsqueeze.corpus.heldout_documents``), deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvsqueeze.errors import bad_value

KINDS = ("edits", "fewshot", "chat")

_WORDS = (" the", " a", " this", " that", " new", " old", " first", " last", " small", " large",
          " good", " bad", " simple", " common", " other", " same", " main", " next", " some",
          " each", " every", " many", " few", " more", " less", " long", " short", " high", " low")
_NAMES = (" Alice", " Bob", " Carol", " David", " Emma", " Frank", " Grace", " Henry", " Ivy",
          " Jack", " Kate", " Leo", " Mia", " Nina", " Oscar", " Paul", " Rosa", " Sam", " Tom",
          " Victor", " Wendy", " Anna", " Ben", " Chris", " Diana", " Eric", " Lisa", " Mark")
_PLACES = (" Paris", " London", " Berlin", " Madrid", " Rome", " Tokyo", " Boston", " Dublin",
           " Vienna", " Oslo", " Lisbon", " Prague", " Chicago", " Seattle", " Denver", " Miami")
_ITEMS = (" apples", " boxes", " chairs", " books", " tables", " lamps", " shoes", " bottles",
          " cables", " phones", " pens", " bags", " cups", " plates", " tools", " bikes")
_TOPICS = (" taxes", " travel", " cooking", " code", " music", " sports", " health", " money",
           " school", " work", " games", " art")


@dataclass(frozen=True)
class WorkloadRequest:
    kind: str
    group: int
    index: int
    prompt_ids: tuple[int, ...]
    scored_ids: tuple[int, ...]
    text: str


def _single_tokens(tok, words) -> list[tuple[str, int]]:
    out = []
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out.append((w, ids[0]))
    return out


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _edits_group(tok, rng, base: list[int], n_prompt: int, n: int, edits: int, words):
    word_ids = {i for _, i in words}
    # word-start tokens of the prompt part (after the first 32), the places an edit may hit
    spots = [p for p in range(32, n_prompt) if base[p] in word_ids
             or tok.decode([base[p]]).startswith(" ") and tok.decode([base[p]]).strip().isalpha()]
    out = []
    for r in range(n):
        ids = list(base)
        if r > 0:  # request 0 is the original
            for p in rng.sample(spots, min(edits, len(spots))):
                choices = [i for _, i in words if i != ids[p]]
                ids[p] = rng.choice(choices)
        out.append(ids)
    return out


def _fewshot_prompt(tok, rng, vocab, examples: int) -> list[int]:
    names, places, items = vocab
    parts = [_ids(tok, "You are an assistant that turns shipping notes into one-line summaries. "
                       "Keep the customer, the count, the item and the city, in that order.\n\n")]
    for _ in range(examples + 1):
        name, place, item = rng.choice(names), rng.choice(places), rng.choice(items)
        order, count, day = rng.randint(1000, 9999), rng.randint(2, 9), rng.randint(10, 28)
        parts.append(_ids(tok, f"Note: order {order} from") + [name[1]]
                     + _ids(tok, f" was packed with {count}") + [item[1]]
                     + _ids(tok, " and shipped to") + [place[1]]
                     + _ids(tok, f" on day {day}.\nSummary:") + [name[1]]
                     + _ids(tok, f", {count}") + [item[1]] + _ids(tok, ",") + [place[1]]
                     + _ids(tok, "\n\n"))
    return [t for p in parts for t in p]


def _chat_prompt(tok, rng, vocab, doc: list[int]) -> list[int]:
    names, topics = vocab
    name, topic = rng.choice(names), rng.choice(topics)
    head = (_ids(tok, "System: You are a careful assistant. Answer from the document the user "
                      "pastes.\n\nUser: Hi, I am") + [name[1]] + _ids(tok, " and I have a question about")
            + [topic[1]] + _ids(tok, ". Can you read a document for me?\n\nAssistant: Of course,")
            + [name[1]] + _ids(tok, ". Please paste it.\n\nUser: Here it is:\n"))
    return head + doc


def near_duplicate_workload(tokenizer, kind: str = "edits", groups: int = 2, per_group: int = 8,
                            prefix_tokens: int = 512, scored_tokens: int = 64, edits: int = 4,
                            seed: int = 0, docs=None) -> list[WorkloadRequest]:
    """``groups`` x ``per_group`` requests of one kind (see the module docstring)."""
    from kvsqueeze import corpus

    if kind not in KINDS:
        raise bad_value("kind", kind, f"one of {', '.join(KINDS)}")
    for name, v, lo in (("groups", groups, 1), ("per_group", per_group, 2),
                        ("prefix_tokens", prefix_tokens, 64), ("scored_tokens", scored_tokens, 1),
                        ("edits", edits, 0)):
        if not isinstance(v, int) or v < lo:
            raise bad_value(name, v, f"a whole number >= {lo}")
    rng = random.Random(seed)
    docs = docs or corpus.heldout_documents()
    windows = corpus.token_segments(docs, tokenizer, prefix_tokens + scored_tokens,
                                    groups * 2, what="held-out text")
    windows = [list(w) for _, w in windows]
    out: list[WorkloadRequest] = []
    for g in range(groups):
        base = windows[g]
        if kind == "edits":
            seqs = _edits_group(tokenizer, rng, base, prefix_tokens, per_group, edits,
                                _single_tokens(tokenizer, _WORDS))
            pairs = [(s[:prefix_tokens], s[prefix_tokens:]) for s in seqs]
        elif kind == "fewshot":
            vocab = (_single_tokens(tokenizer, _NAMES), _single_tokens(tokenizer, _PLACES),
                     _single_tokens(tokenizer, _ITEMS))
            probe = _fewshot_prompt(tokenizer, random.Random(0), vocab, 1)
            per_example = max(1, len(probe) // 3)
            examples = max(2, prefix_tokens // per_example)
            seqs = [_fewshot_prompt(tokenizer, rng, vocab, examples) for _ in range(per_group)]
            n = min(len(s) for s in seqs)
            cut = min(prefix_tokens, n - scored_tokens)
            pairs = [(s[:cut], s[cut:cut + scored_tokens]) for s in seqs]
        else:
            vocab = (_single_tokens(tokenizer, _NAMES), _single_tokens(tokenizer, _TOPICS))
            doc = windows[groups + g]
            seqs = [_chat_prompt(tokenizer, rng, vocab, doc) for _ in range(per_group)]
            cut = min(prefix_tokens, min(len(s) for s in seqs) - scored_tokens)
            pairs = [(s[:cut], s[cut:cut + scored_tokens]) for s in seqs]
        for i, (p, sc) in enumerate(pairs):
            out.append(WorkloadRequest(kind, g, i, tuple(p), tuple(sc), tokenizer.decode(p)))
    return out
