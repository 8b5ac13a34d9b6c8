"""Paired statistics over prompts: a model's mean score with a 95% interval, and its win rate against a baseline
with a bootstrap interval.

Every model samples every prompt from the same noises (N seeds per prompt), so images of one prompt are not
independent: both intervals treat the prompt as the unit. The mean's is Student's t over per-prompt means
(every prompt has the same N, so their mean is the mean over images); the win rate's is the percentile
bootstrap that resamples prompts with their N paired comparisons. A win is a higher score (lower for scorers
where lower is better), a tie counts half.
"""

import dataclasses

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def per_prompt(scores_PxN: np.ndarray) -> np.ndarray:
    """[P] mean over each prompt's N seeds."""
    return np.asarray(scores_PxN, np.float64).reshape(len(scores_PxN), -1).mean(axis=1)


def mean_interval(scores_PxN: np.ndarray, level: float = LEVEL) -> Interval:
    """Mean score and its t interval over prompts (a single prompt: the interval is the mean itself)."""
    m_P = per_prompt(scores_PxN)
    mean = float(m_P.mean())
    if len(m_P) < 2:
        return Interval(mean, mean, mean)
    half = scipy_stats.t.ppf(0.5 + level / 2, len(m_P) - 1) * m_P.std(ddof=1) / np.sqrt(len(m_P))
    return Interval(mean, float(mean - half), float(mean + half))


def wins(model_PxN: np.ndarray, baseline_PxN: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """[P, N] 1 where the model beats the baseline on the same prompt and noise, 0.5 on a tie, else 0."""
    a, b = np.asarray(model_PxN, np.float64), np.asarray(baseline_PxN, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in shape: {a.shape} vs {b.shape}")
    if not higher_is_better:
        a, b = -a, -b
    return (a > b) + 0.5 * (a == b)


def win_rate(model_PxN: np.ndarray, baseline_PxN: np.ndarray, higher_is_better: bool = True,
             level: float = LEVEL, n_resamples: int = 2000, seed: int = 0) -> Interval:
    """Paired win rate and its percentile bootstrap interval, prompts resampled with replacement."""
    w_P = per_prompt(wins(model_PxN, baseline_PxN, higher_is_better))
    rng = np.random.default_rng(seed)
    boot = w_P[rng.integers(0, len(w_P), (n_resamples, len(w_P)))].mean(axis=1)
    low, high = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(float(w_P.mean()), float(low), float(high))
