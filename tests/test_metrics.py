"""Evaluation metrics on closed-form cases."""

import math

import torch

from kvsqueeze.evaluate import _se, distribution_metrics, parse_ratios

import pytest
from kvsqueeze.errors import KvsqueezeError


def test_identical_distributions_give_zero_kl_and_full_agreement():
    logits = torch.randn(7, 50)
    targets = torch.randint(0, 50, (7,))
    kl, top1, nll_ref, nll = distribution_metrics(logits, logits.clone(), targets)
    assert torch.all(kl == 0)
    assert torch.all(top1 == 1)
    torch.testing.assert_close(nll_ref, nll)


def test_kl_closed_form_two_point_distribution():
    p, q = 0.8, 0.3
    ref = torch.log(torch.tensor([[p, 1 - p]]))
    other = torch.log(torch.tensor([[q, 1 - q]]))
    kl, top1, _, _ = distribution_metrics(ref, other, torch.tensor([0]))
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    assert top1.item() == 0.0  # argmax 0 vs argmax 1


def test_nll_of_targets():
    ref = torch.log(torch.tensor([[0.25, 0.75]]))
    _, _, nll_ref, _ = distribution_metrics(ref, ref, torch.tensor([1]))
    assert nll_ref.item() == pytest.approx(-math.log(0.75))


def test_standard_error():
    assert _se([1.0, 3.0]) == pytest.approx(1.0)  # sd sqrt(2), / sqrt(2)
    assert math.isnan(_se([1.0]))


def test_parse_ratios():
    assert parse_ratios("2,4x, 8") == [2.0, 4.0, 8.0]
    assert parse_ratios(None) == [None]
    with pytest.raises(KvsqueezeError, match="ratio=0.5"):
        parse_ratios("0.5")
    with pytest.raises(KvsqueezeError, match="ratio='abc'"):
        parse_ratios("abc")


def test_paired_difference_uses_segment_pairs():
    from kvsqueeze.evaluate import EvalRecord, paired_difference

    def rec(kls):
        return EvalRecord("m", 4, 4, "", sum(kls) / len(kls), 0, 1, 1, 1, 0, len(kls), 8, 8, "x",
                          kl_per_segment=kls)

    a, b = rec([0.10, 0.30, 0.50]), rec([0.08, 0.27, 0.49])
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(0.02)
    d = [0.02, 0.03, 0.01]
    assert se == pytest.approx(_se(d))  # paired SE is far below the unpaired spread of either method
    assert se < _se(a.kl_per_segment) / 10
