"""Paired comparison of two models on the same questions: the difference in accuracy with a 95%
confidence interval over questions (bootstrap) and seeds (Student's t), and the number of questions a benchmark
(or of seeds a study) needs for a given CI half-width. See docs/evaluation.md ("Paired differences")."""

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
    var_questions: float = 0.0  # se_q²: the question bootstrap's variance of the mean difference
    var_seed_means: float | None = None  # s²: variance of the per-seed mean differences (None with one seed)

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

    Questions: a bootstrap. Each resample draws questions with replacement and averages the
    difference over the drawn columns and every seed. With one seed the CI is that bootstrap's 2.5th
    and 97.5th percentile.

    Seeds: with several, the training seeds are a small sample of runs, and resampling two or three
    of them with replacement under-covers where seeds move the difference (simulated: 88% and 79%
    for a nominal 95% with three seeds that move it by 5 and 10 points; docs/evaluation.md,
    tests/test_compare.py). So the CI is
    mean ± t · sqrt(se_q² + s² / S): se_q the question bootstrap's standard deviation, s² the
    variance of the S per-seed mean differences, t Student's quantile at the Welch-Satterthwaite
    degrees of freedom of the two parts (S - 1 where the seeds dominate, large where the questions
    do). s² also holds the per-cell noise that se_q counts, so the CI errs wide."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"need two equal, non-empty [seeds, questions] arrays, got {a.shape} and {b.shape}")
    diff = a - b
    n_seeds, n_questions = diff.shape
    columns = diff.mean(axis=0)  # each question's difference, averaged over seeds
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        stats[start:start + k] = columns[rng.integers(0, n_questions, size=(k, n_questions))].mean(axis=1)
    mean = float(diff.mean())
    var_questions = float(stats.var(ddof=1))
    var_seed_means = None
    if n_seeds == 1:
        low, high = np.percentile(stats, [2.5, 97.5])
    else:
        var_seed_means = float(diff.mean(axis=1).var(ddof=1))
        half = ci_half_width(var_questions, var_seed_means, n_seeds, n_questions)
        low, high = mean - half, mean + half
    return PairedDifference(mean=mean, ci_low=float(low), ci_high=float(high), n_questions=n_questions,
                            n_seeds=n_seeds, discordance=float((diff != 0).mean()), var_questions=var_questions,
                            var_seed_means=var_seed_means)


def ci_half_width(var_questions: float, var_seed_means: float, n_seeds: int, n_questions: int) -> float:
    """The several-seed half-width of paired_bootstrap: t · sqrt(se_q² + s² / S)."""
    var_seeds = var_seed_means / n_seeds
    df = welch_df(var_seeds, n_seeds - 1, var_questions, n_questions - 1)
    return float(student_t_quantile(df) * math.sqrt(var_questions + var_seeds))


def seeds_needed(d: PairedDifference, half_width: float = 0.02, max_seeds: int = 1000) -> int | None:
    """Seeds for a 95% CI half-width <= `half_width` at this benchmark's size, if new seeds spread like these.

    paired_bootstrap's several-seed CI projected to S seeds: se_q² shrinks as S_now / S (each seed adds
    its questions' verdicts) and s² / S as S. Needs two seeds or more (s² is unknown with one: None);
    None also when more than `max_seeds` would be needed. Three seeds estimate s loosely, so this is
    an order of magnitude, not a promise."""
    if half_width <= 0:
        raise ValueError("half_width must be positive")
    if d.var_seed_means is None:
        return None
    for n in range(2, max_seeds + 1):
        if ci_half_width(d.var_questions * d.n_seeds / n, d.var_seed_means, n, d.n_questions) <= half_width:
            return n
    return None


def welch_df(var_a: float, df_a: int, var_b: float, df_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of var_a + var_b (each an estimated variance of a mean)."""
    denominator = (var_a ** 2 / df_a if df_a > 0 else 0.0) + (var_b ** 2 / df_b if df_b > 0 else 0.0)
    return (var_a + var_b) ** 2 / denominator if denominator > 0 else math.inf


def student_t_quantile(df: float) -> float:
    """Two-sided 95% Student's t quantile (the normal one, Z95, for infinite df)."""
    from scipy.stats import t  # scipy is in the pinned set (constraints.txt); imported here, as only compare needs it

    return float(t.ppf(0.975, df))


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
