"""Traffic for load campaigns: every workload yields *conversations* of one or more turns.

A single-turn workload (``sharegpt``, ``random``, ``shared-prefix``, ``jsonl``, ``questions``) yields
conversations of one turn; ``sharegpt-multiturn`` replays whole conversations turn by turn. A
:class:`Turn` holds the user's text, the tokens the reply may take, optionally the reply recorded in
the data set and a reference answer; a :class:`Conversation` holds its turns in order, an optional
system prompt, and whether its prompt is chat messages (formatted with the model's chat template
where an endpoint takes text) or plain text sent as it is (what SGLang's and vLLM's benchmark
clients send for ShareGPT by default).

A workload is a frozen dataclass whose fields are its options, spelled
``NAME[:KEY=VALUE[,KEY=VALUE...]]`` on the command line (``sharegpt:max_output=128``,
``random:input=128..512,output=64``); :func:`parse_workload` checks every option. Its
``conversations(count, ctx)`` returns ``count`` conversations, deterministic for ``ctx.seed``, or
raises a clear error when its data holds fewer.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import ClassVar

from kvsqueeze.errors import bad_value


@dataclass(frozen=True)
class Turn:
    user: str  # this turn's user message, or the whole prompt of a plain-text conversation
    max_tokens: int
    reply: str | None = None  # the reply recorded in the data set, where there is one
    answer: str | None = None  # a reference answer to score the reply against
    prompt_tokens: int | None = None  # the prompt's tokens by the served model's tokenizer, where known


@dataclass(frozen=True)
class Conversation:
    cid: str
    turns: tuple[Turn, ...]
    system: str | None = None
    chat: bool = False  # True: chat messages; False: one plain-text prompt per turn
    group: str = ""  # requests that share context (shared-prefix groups)
    history: tuple[dict, ...] = ()  # given messages before the first turn (a JSONL line's messages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Conversation":
        return cls(d["cid"], tuple(Turn(**t) for t in d["turns"]), d.get("system"), d.get("chat", False),
                   d.get("group", ""), tuple(d.get("history", ())))


def messages_for(conv: Conversation, k: int, replies: list[str]) -> list[dict]:
    """The chat messages of turn ``k``: the system prompt, every earlier turn with its reply
    (``replies[j]`` for turn j: the server's own, or the recorded one), and turn ``k``'s user text."""
    out = [{"role": "system", "content": conv.system}] if conv.system else []
    out += [dict(m) for m in conv.history]
    for j in range(k):
        out += [{"role": "user", "content": conv.turns[j].user},
                {"role": "assistant", "content": replies[j]}]
    out.append({"role": "user", "content": conv.turns[k].user})
    return out


def chat_text(tokenizer, messages: list[dict]) -> str:
    """Chat messages as the text a model reads: its chat template with the generation prompt. A leading
    BOS token is removed where the tokenizer adds one itself when the server encodes the text (it
    would be there twice); SGLang's benchmark client removes every occurrence of the BOS text, which
    breaks templates whose BOS is also their turn marker (SmolLM2's ``<|im_start|>``)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer.encode("x")[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


@dataclass
class WorkloadContext:
    """What a workload needs from the campaign: the served model's tokenizer (lengths are counted with
    it), the most tokens one request may take (prompt and reply: the model's context, or less), and
    the seed."""

    tokenizer: object
    context_tokens: int = 2048
    seed: int = 0

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def rng(self, *salt) -> random.Random:
        return random.Random(":".join(str(s) for s in (self.seed,) + salt))


class Workload:
    """Base of every workload: a frozen dataclass of options (subclasses add fields and a name)."""

    name: ClassVar[str] = ""
    multi_turn: ClassVar[bool] = False

    def conversations(self, count: int, ctx: WorkloadContext) -> list[Conversation]:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """The spelling that makes this workload again (its non-default options)."""
        opts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(opts) if opts else "")


def too_few(name: str, have: int, asked: int, what: str = "conversations") -> Exception:
    return bad_value("requests", asked, f"at most {have}: workload {name} holds {have} {what} that pass "
                     "its filters (ask for fewer requests or a shorter duration, or loosen its options)")


# ---- option spelling ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lengths:
    """A length distribution: ``256`` (fixed), ``128..512`` (uniform, both ends included),
    ``256+-64`` (normal: mean, standard deviation; rounded, at least 1)."""

    kind: str
    a: int
    b: int = 0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.randint(self.a, self.b)
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        return {"fixed": self.a, "uniform": (self.a + self.b) / 2}.get(self.kind, self.a)

    @property
    def upper(self) -> int:
        """Largest length it gives (normal: mean + 4 standard deviations)."""
        return {"fixed": self.a, "uniform": self.b}.get(self.kind, self.a + 4 * self.b)

    def __str__(self) -> str:
        return {"fixed": f"{self.a}", "uniform": f"{self.a}..{self.b}"}.get(self.kind, f"{self.a}+-{self.b}")


def parse_lengths(field_name: str, text: str) -> Lengths:
    t = str(text).strip()
    if m := re.fullmatch(r"(\d+)", t):
        out = Lengths("fixed", int(m.group(1)))
    elif m := re.fullmatch(r"(\d+)\.\.(\d+)", t):
        out = Lengths("uniform", int(m.group(1)), int(m.group(2)))
        if out.b < out.a:
            raise bad_value(field_name, text, "LOW..HIGH with LOW <= HIGH")
    elif m := re.fullmatch(r"(\d+)\+-(\d+)", t):
        out = Lengths("normal", int(m.group(1)), int(m.group(2)))
    else:
        raise bad_value(field_name, text, "a length N, a uniform range LOW..HIGH, or a normal MEAN+-STD (tokens)")
    if out.a < 1:
        raise bad_value(field_name, text, "lengths of at least 1 token")
    return out


def _coerce(name: str, f: dataclasses.Field, text: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "Lengths":
            return parse_lengths(f"{name} {f.name}", text)
    except ValueError:
        raise bad_value(f"{name} {f.name}", text, f"a value of type {kind}") from None
    return text


def registry() -> dict[str, type[Workload]]:
    from kvsqueeze.harness.workloads import jsonl, questions, sharegpt, shared_prefix, synthetic

    return {w.name: w for w in (sharegpt.ShareGPT, sharegpt.ShareGPTMultiTurn, shared_prefix.SharedPrefix,
                                synthetic.Synthetic, jsonl.JSONL, questions.Questions)}


def parse_workload(text: str) -> Workload:
    """``NAME[:KEY=VALUE[,KEY=VALUE...]]`` -> the workload, every option checked."""
    kinds = registry()
    name, _, opts = str(text or "").strip().partition(":")
    if name not in kinds:
        raise bad_value("workload", text, f"NAME[:KEY=VALUE,...] with NAME one of {', '.join(kinds)}")
    cls = kinds[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for part in [p for p in opts.split(",") if p.strip()] if opts else []:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise bad_value(f"workload {name}", part, "KEY=VALUE with KEY one of "
                            + (", ".join(fields) if fields else "(no options)"))
        values[key] = _coerce(name, fields[key], value.strip())
    return cls(**values)


def positive(name: str, **values) -> None:
    """Check that each option is a number >= 1 (or > 0 for floats)."""
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (isinstance(v, int) and v < 1):
            raise bad_value(f"{name} {k}", v, "a number > 0")


__all__ = ["Conversation", "Turn", "Workload", "WorkloadContext", "Lengths", "messages_for", "parse_workload",
           "parse_lengths", "registry", "positive", "too_few", "field"]
