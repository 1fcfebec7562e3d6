"""Evaluation on the real embedded model, against the dense cache."""

import pytest
import torch

from kvsqueeze.corpus import heldout_documents, token_segments
from kvsqueeze.evaluate import (
    build_methods,
    continue_with,
    dense_prefill,
    evaluate_kl,
    evaluate_passkey,
    passkey_prompt,
)
from kvsqueeze.methods import CompressedPrefix

P, C = 256, 64


@pytest.fixture(scope="module")
def segments(embedded):
    _, tok, _ = embedded
    return [ids for _, ids in token_segments(heldout_documents(), tok, P + C + 1, 2)]


def test_prefix_then_continuation_equals_one_full_pass(embedded, segments):
    """The evaluator's two-step path reproduces a single teacher-forced pass of the whole text."""
    _, _, model = embedded
    ids = torch.tensor(segments[0])
    with torch.inference_mode():
        full = model(ids[None]).logits[0, P:-1]
    cache, _ = dense_prefill(model, ids[:P])
    dense = CompressedPrefix(cache.keys, cache.values, None, 1, 1)
    torch.testing.assert_close(continue_with(model, dense, ids[P:-1]), full, rtol=1e-4, atol=1e-4)


def test_dense_is_exact_and_window_loses_quality(embedded, segments):
    _, _, model = embedded
    methods = build_methods(["dense", "window"], [4.0], recent=32)
    dense, window = evaluate_kl(model, segments, methods, P, C, "embedded")
    assert dense.kl_mean == 0.0 and dense.top1 == 1.0 and dense.ppl_delta_pct == 0.0
    assert dense.ratio_achieved == 1.0
    assert window.kl_mean > 0.0
    assert window.top1 < 1.0
    assert window.ratio_achieved == pytest.approx(4.0, rel=0.01)
    assert window.segments == 2 and window.prefix_tokens == P and window.scored_tokens == C


def test_passkey_prompt_hides_the_key_at_the_requested_depth(embedded):
    _, tok, _ = embedded
    ids = passkey_prompt(tok, 12345, 0.25, 1024)
    text = tok.decode(ids)
    assert 900 <= len(ids) <= 1100
    pos = text.index("12345")
    assert 0.15 < pos / len(text) < 0.35
    assert text.rstrip().endswith("The pass key is")


def test_passkey_dense_vs_tiny_window(embedded):
    """A window too small to reach the needle cannot answer; dense sees the whole prompt."""
    _, tok, model = embedded
    methods = build_methods(["dense", "window"], [16.0], sinks=4, recent=32)
    dense, window = evaluate_passkey(model, tok, methods, trials=2, context_tokens=1024,
                                     model_name="embedded")
    assert window.accuracy == 0.0  # needles sit at depths 0.25 and 0.75, far outside 64 tokens
    assert dense.trials == 2 and window.ratio_achieved == pytest.approx(16.0, rel=0.05)
