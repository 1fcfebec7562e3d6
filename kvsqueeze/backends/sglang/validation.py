"""Requests that would take an SGLang server down are refused before they reach the model.

Stock SGLang 0.5.23 lets a prompt of no tokens through to its scheduler, where the prefill fails (on
CPU: ``cannot reshape tensor of 0 elements`` in the rotary embedding; with DMS, the head pool's
``n=0``) and the exception ends the scheduler and with it the whole server: every running request
is lost. Token ids outside the vocabulary fail the same way in the embedding lookup. kvsqueeze's
plugin installs two checks, in every server it starts, whatever the method:

- **At the tokenizer** (the HTTP server's process): after SGLang's own checks of a request (context
  length, sampling parameters, ...), :func:`request_problem` — a prompt that is empty, only
  whitespace, or has token ids that are not whole numbers in ``[0, vocabulary)`` — raises
  ``ValueError``, which SGLang answers with HTTP 400 and the message. Every endpoint goes through it
  (``/generate``, ``/v1/completions``, ``/v1/chat/completions``, batches item by item).
- **At the scheduler** (its process): a request that reaches the scheduler another way (an engine
  API call, a session) with such a prompt is aborted alone, with status 400, before it is queued.

- **At normalisation** (the HTTP server's process, before anything is tokenized): one request may
  ask for at most ``KVSQUEEZE_MAX_SEQUENCES_PER_REQUEST`` sequences (prompts in a batch times ``n``;
  default 256). Stock SGLang accepts ``n=100000``, queues that many requests and serves nothing else
  for as long as they take; here it gets a 400 naming ``n``, the batch and the limit.

SGLang's own checks stay as they are: these run after them (the tokenizer, normalisation) or before
queueing (the scheduler) and never replace them.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus

from kvsqueeze.backends.sglang.patch import patch
from kvsqueeze.errors import bad_value

logger = logging.getLogger(__name__)
KEY = "validation"
MAX_SEQUENCES_ENV = "KVSQUEEZE_MAX_SEQUENCES_PER_REQUEST"
DEFAULT_MAX_SEQUENCES = 256


def max_sequences() -> int:
    """The most sequences one request may ask for (``KVSQUEEZE_MAX_SEQUENCES_PER_REQUEST``)."""
    raw = os.environ.get(MAX_SEQUENCES_ENV, "")
    if not raw:
        return DEFAULT_MAX_SEQUENCES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise bad_value(MAX_SEQUENCES_ENV, raw, "a whole number >= 1")
    return value


def sequences_problem(batch_size: int, n, limit: int) -> str | None:
    """What is wrong with a request's fan-out (``None``: nothing): ``batch_size`` prompts, ``n`` each."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"n={n!r}: expected a whole number of samples per prompt >= 1"
    if batch_size * n > limit:
        return (f"n={n} x {batch_size} prompt(s) = {batch_size * n} sequences: expected at most {limit} "
                f"in one request (the server's {MAX_SEQUENCES_ENV})")
    return None


def request_problem(input_ids, vocab_size: int | None, text=None) -> str | None:
    """What is wrong with a prompt (``None``: nothing): the message a client gets with its 400."""
    if isinstance(text, str) and text and not text.strip():
        return (f"text={text[:40]!r}: the prompt is only whitespace; expected a prompt with something "
                "to read")
    if input_ids is None:
        return None  # embeddings or multimodal input: SGLang checks those
    if len(input_ids) == 0:
        return ("the prompt is empty (no tokens); expected a non-empty text or at least one token in "
                "input_ids")
    for i, t in enumerate(input_ids):
        if isinstance(t, bool) or not isinstance(t, int):
            return f"input_ids[{i}]={t!r}: expected a whole-number token id"
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            return f"input_ids[{i}]={t}: expected a token id in [0, {vocab_size})"
    return None


def _tokenizer_check(orig):
    def _validate_one_request(self, obj, input_ids):
        out = orig(self, obj, input_ids)
        problem = request_problem(input_ids, getattr(self.model_config, "vocab_size", None),
                                  getattr(obj, "text", None))
        if problem:
            raise ValueError(problem)
        return out
    return _validate_one_request


def _fan_out_check(orig):
    limit = max_sequences()

    def _handle_parallel_sampling(self):
        out = orig(self)
        n = self.parallel_sample_num
        batch = 1 if getattr(self, "batch_size", None) is None else self.batch_size
        problem = sequences_problem(batch, n, limit)
        if problem:
            raise ValueError(problem)
        return out
    return _handle_parallel_sampling


def _scheduler_check(orig):
    from sglang.srt.managers import scheduler as sched

    def _add_request_to_queue(self, req, is_retracted: bool = False):
        problem = None if is_retracted else request_problem(
            list(req.origin_input_ids) if req.origin_input_ids is not None else None,
            self.model_config.vocab_size)
        if problem:
            logger.warning("kvsqueeze: request %s refused at the scheduler: %s", req.rid, problem)
            self.send_abort_output(sched._make_abort_req(req, finished_reason={
                "type": "abort", "status_code": HTTPStatus.BAD_REQUEST, "message": problem}), req)
            self._release_aborted_request(req)
            return
        return orig(self, req, is_retracted)
    return _add_request_to_queue


def install() -> None:
    """Install the checks in this process (each where its class lives; applied once)."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    patch(GenerateReqInput, "_handle_parallel_sampling", KEY, _fan_out_check)
    patch(TokenizerManager, "_validate_one_request", KEY, _tokenizer_check)
    patch(Scheduler, "_add_request_to_queue", KEY, _scheduler_check)
