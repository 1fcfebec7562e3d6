"""Accuracy with uncertainty: per-sample accuracy, majority vote over W samples (maj@W), pass@W, each
with a 95% interval over questions, and a paired comparison of two methods on the same questions.

Questions are the unit of sampling: the W samples of one question are not independent (they share the
prompt), so every interval treats a question as one draw.

- ``maj@W`` and ``pass@W`` are one 0/1 outcome per question: Wilson score interval.
- Per-sample accuracy is a per-question mean of W outcomes: a percentile bootstrap over questions
  (:data:`BOOTSTRAP` resamples, fixed seed, so a report rebuilt from the same rows prints the same
  interval); with W = 1 it equals the Wilson case up to resampling noise.
- A paired comparison takes the questions both methods answered, the per-question difference of the
  outcome, and its mean with a bootstrap interval; ``wins`` and ``losses`` count the questions where only
  one of the two was right (for 0/1 outcomes: McNemar's discordant pairs).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

Z95 = 1.959963984540054
BOOTSTRAP = 2000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: list[float], resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean of ``values`` (one value per question)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    if np.all(v == v[0]):  # one question, or all alike: no spread to resample
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def majority(answers: list[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one seen first; None if there is none."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(a for a in votes if counts[a] == best)


@dataclass(frozen=True)
class QuestionOutcome:
    """One question's W samples, scored."""

    qid: str
    per_sample: float  # share of the W samples that are right
    majority: int  # 1 if the majority answer is right
    any_right: int  # 1 if at least one sample is right (pass@W)


def score_question(qid: str, extracted: list[str | None], answer: str) -> QuestionOutcome:
    right = [int(a == answer) for a in extracted]
    return QuestionOutcome(qid, sum(right) / len(right) if right else 0.0,
                           int(majority(extracted) == answer), int(any(right)))


@dataclass(frozen=True)
class Accuracy:
    """The three accuracies of one configuration with their 95% intervals (over ``questions``)."""

    questions: int
    per_sample: float
    per_sample_ci: tuple[float, float]
    majority: float
    majority_ci: tuple[float, float]
    pass_at_w: float
    pass_at_w_ci: tuple[float, float]

    def as_dict(self) -> dict:
        return {"questions": self.questions,
                "accuracy": self.per_sample, "accuracy_lo": self.per_sample_ci[0],
                "accuracy_hi": self.per_sample_ci[1],
                "accuracy_majority": self.majority, "accuracy_majority_lo": self.majority_ci[0],
                "accuracy_majority_hi": self.majority_ci[1],
                "pass_at_w": self.pass_at_w, "pass_at_w_lo": self.pass_at_w_ci[0],
                "pass_at_w_hi": self.pass_at_w_ci[1]}


def accuracy(outcomes: list[QuestionOutcome]) -> Accuracy:
    n = len(outcomes)
    if n == 0:
        nan = float("nan")
        return Accuracy(0, nan, (nan, nan), nan, (nan, nan), nan, (nan, nan))
    per = [o.per_sample for o in outcomes]
    maj = sum(o.majority for o in outcomes)
    anyr = sum(o.any_right for o in outcomes)
    return Accuracy(n, sum(per) / n, bootstrap_mean(per), maj / n, wilson(maj, n), anyr / n, wilson(anyr, n))


@dataclass(frozen=True)
class Paired:
    """``a`` minus ``b`` on the questions both answered."""

    questions: int
    diff: float
    ci: tuple[float, float]
    wins: int  # questions where a is right and b is not (0/1 outcomes) or a scores higher
    losses: int

    @property
    def separated(self) -> bool:
        """The interval excludes zero."""
        return self.questions > 0 and (self.ci[0] > 0 or self.ci[1] < 0)


def paired(a: dict[str, float], b: dict[str, float]) -> Paired:
    """Per-question outcomes of two methods (qid -> value), compared on their common questions."""
    common = sorted(set(a) & set(b))
    d = [a[q] - b[q] for q in common]
    if not d:
        return Paired(0, float("nan"), (float("nan"), float("nan")), 0, 0)
    return Paired(len(d), sum(d) / len(d), bootstrap_mean(d), sum(x > 0 for x in d), sum(x < 0 for x in d))
