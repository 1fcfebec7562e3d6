"""The requests every kvsqueeze server refuses before they reach the model, checked against the rules
written out case by case; the fan-out limit installed on SGLang's own request class (a real server
receiving these requests: tests/test_sglang_e2e.py and benchmarks/faults.py)."""

from __future__ import annotations

import pytest

import kvsqueeze  # noqa: F401  (its torchvision shim precedes the first SGLang import)
from kvsqueeze.backends.sglang.validation import (DEFAULT_MAX_SEQUENCES, MAX_SEQUENCES_ENV, max_sequences,
                                                  request_problem, sequences_problem)
from kvsqueeze.errors import KvsqueezeError


@pytest.mark.parametrize("ids,text,expected", [
    ([5, 6, 7], "a b", None),
    ([0], None, None),
    ([99], None, None),  # the last id of a 100-token vocabulary
    ([], None, "the prompt is empty"),
    ([], "", "the prompt is empty"),
    ([1, 2], " \n\t", "only whitespace"),
    ([1, 100], None, r"input_ids[1]=100: expected a token id in [0, 100)"),
    ([-1, 2], None, r"input_ids[0]=-1: expected a token id in [0, 100)"),
    ([1, 2.5], None, "input_ids[1]=2.5: expected a whole-number token id"),
    ([True], None, "input_ids[0]=True: expected a whole-number token id"),
    (["3"], None, "input_ids[0]='3': expected a whole-number token id"),
    (None, "hello", None),  # embeddings or multimodal input: left to SGLang
])
def test_request_problem(ids, text, expected):
    got = request_problem(ids, 100, text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got, got


def test_without_a_known_vocabulary_only_negative_ids_are_refused():
    assert request_problem([10 ** 9], None) is None
    assert "expected a token id" in request_problem([-5], None)


@pytest.mark.parametrize("batch,n,limit,expected", [
    (1, 1, 4, None), (1, 4, 4, None), (2, 2, 4, None),
    (1, 5, 4, "n=5 x 1 prompt(s) = 5 sequences: expected at most 4"),
    (3, 2, 4, "n=2 x 3 prompt(s) = 6 sequences: expected at most 4"),
    (5, 1, 4, "n=1 x 5 prompt(s) = 5 sequences"),
    (1, 0, 4, "n=0: expected a whole number of samples per prompt >= 1"),
    (1, -3, 4, "n=-3: expected"), (1, 2.0, 4, "n=2.0: expected"), (1, True, 4, "n=True: expected"),
])
def test_sequences_problem(batch, n, limit, expected):
    got = sequences_problem(batch, n, limit)
    assert (got is None) if expected is None else (got is not None and expected in got), got


def test_the_fan_out_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_SEQUENCES_ENV, raising=False)
    assert max_sequences() == DEFAULT_MAX_SEQUENCES
    monkeypatch.setenv(MAX_SEQUENCES_ENV, "1024")
    assert max_sequences() == 1024
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(MAX_SEQUENCES_ENV, bad)
        with pytest.raises(KvsqueezeError, match=f"{MAX_SEQUENCES_ENV}={bad!r}: expected a whole number >= 1"):
            max_sequences()


def test_sglang_refuses_a_huge_fan_out_while_normalising_and_expands_a_small_one(monkeypatch):
    """Installed on SGLang's GenerateReqInput: n=100000 (stock SGLang queues 100000 requests) raises
    the ValueError that SGLang answers with a 400, before any tokenization; n=4 and a batch of two
    still expand as SGLang's own normalisation does."""
    pytest.importorskip("sglang")
    from sglang.srt.managers.io_struct import GenerateReqInput

    from kvsqueeze.backends.sglang import patch, validation

    monkeypatch.delenv(MAX_SEQUENCES_ENV, raising=False)
    validation.install()
    assert patch.is_applied(GenerateReqInput, "_handle_parallel_sampling", validation.KEY)
    huge = GenerateReqInput(text="Hello", sampling_params={"n": 100000, "max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"n=100000 x 1 prompt\(s\) = 100000 sequences: expected at most 256"):
        huge.normalize_batch_and_arguments()
    many = GenerateReqInput(text=["a"] * 300, sampling_params={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"n=1 x 300 prompt\(s\)"):
        many.normalize_batch_and_arguments()
    for bad_n in (0, -3):
        with pytest.raises(ValueError, match=f"n={bad_n}: expected a whole number"):
            GenerateReqInput(text="Hi", sampling_params={"n": bad_n}).normalize_batch_and_arguments()
    ok = GenerateReqInput(text="Hello", sampling_params={"n": 4, "max_new_tokens": 2})
    ok.normalize_batch_and_arguments()
    assert ok.parallel_sample_num == 4 and ok.text == ["Hello"] * 4 and len(set(ok.rid)) == 4
    two = GenerateReqInput(text=["a", "b"], sampling_params={"n": 2, "max_new_tokens": 2})
    two.normalize_batch_and_arguments()
    assert two.text == ["a", "b", "a", "b"]  # SGLang repeats the batch n times
