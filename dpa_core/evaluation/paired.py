"""Paired comparison of two models on the same questions: the difference in accuracy with a 95%
bootstrap confidence interval over questions and seeds, and the number of questions a benchmark
needs for a given CI half-width. See docs/evaluation.md ("Paired differences")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean of (a - b) over seeds and questions: the difference in accuracy
    ci_low: float
    ci_high: float
    n_questions: int
    n_seeds: int
    discordance: float  # share of (seed, question) pairs on which exactly one of a, b is right

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    @property
    def inconclusive(self) -> bool:
        return self.ci_low <= 0.0 <= self.ci_high

    def verdict(self, a: str, b: str) -> str:
        if self.inconclusive:
            return "inconclusive"
        return f"{a} better" if self.ci_low > 0 else f"{b} better"


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                     chunk: int = 100) -> PairedDifference:
    """correct_a, correct_b: [seeds, questions] arrays of 0/1 verdicts, the same question in the same
    column and the same seed in the same row for both models.

    Each resample draws seeds with replacement and, independently, questions with replacement, and
    takes the mean difference over the drawn cells: both sources of variation (which questions the
    benchmark happens to hold, which training seeds were run) widen the interval. The CI is the
    2.5th and 97.5th percentile of the resampled means."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"need two equal, non-empty [seeds, questions] arrays, got {a.shape} and {b.shape}")
    diff = a - b
    n_seeds, n_questions = diff.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        seeds = rng.integers(0, n_seeds, size=(k, n_seeds))
        questions = rng.integers(0, n_questions, size=(k, n_questions))
        stats[start:start + k] = diff[seeds[:, :, None], questions[:, None, :]].mean(axis=(1, 2))
    low, high = np.percentile(stats, [2.5, 97.5])
    return PairedDifference(mean=float(diff.mean()), ci_low=float(low), ci_high=float(high), n_questions=n_questions,
                            n_seeds=n_seeds, discordance=float((diff != 0).mean()))


def questions_needed(discordance: float, mean_difference: float = 0.0, half_width: float = 0.02) -> int:
    """Questions for a 95% CI half-width <= `half_width` on a paired difference at one seed.

    Per question the difference d_i = a_i - b_i is -1, 0 or +1; its variance is
    P(discordant) - mean^2. The mean over n questions has standard error sqrt(that / n), so the
    normal-approximation half-width is 1.96 * sqrt((discordance - mean^2) / n), and
    n >= (1.96 / half_width)^2 * (discordance - mean^2)."""
    if half_width <= 0:
        raise ValueError("half_width must be positive")
    variance = max(discordance - mean_difference ** 2, 0.0)
    return max(1, math.ceil((Z95 / half_width) ** 2 * variance))
