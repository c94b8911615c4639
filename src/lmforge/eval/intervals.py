"""Bootstrap 95% intervals for held-out metrics and their before/after differences (scipy's bootstrap,
percentile method, resampling examples, or batches for token-level losses).

A difference counts as real only when its interval excludes zero: with a few hundred held-out examples
an accuracy moves by a few points from sampling alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import bootstrap
from scipy.stats import t as t_dist
from sklearn.metrics import f1_score

RESAMPLES = 1000


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic: Callable, seed: int = 0) -> list[float] | None:
    if len(data[0]) < 2:
        return None
    result = bootstrap(data, statistic, paired=True, vectorized=False, n_resamples=RESAMPLES,
                       confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return [float(low), float(high)]


def _ppl(loss_sums: np.ndarray, counts: np.ndarray) -> float:
    return math.exp(min(float(loss_sums.sum()) / max(float(counts.sum()), 1.0), 50.0))


def perplexity_interval(parts: Sequence[tuple[float, int]]) -> list[float] | None:
    """Interval of the perplexity over batches of (loss sum, tokens)."""
    sums, counts = (np.array(x, dtype=float) for x in zip(*parts, strict=True)) if parts else (np.array([]),) * 2
    return bootstrap_interval((sums, counts), _ppl)


def perplexity_change(before: Sequence[tuple[float, int]], after: Sequence[tuple[float, int]]) -> dict:
    """Relative perplexity change after/before - 1 on the same batches, with its paired interval."""
    if len(before) != len(after) or not before:
        return {}
    b_sum, b_n = (np.array(x, dtype=float) for x in zip(*before, strict=True))
    a_sum, a_n = (np.array(x, dtype=float) for x in zip(*after, strict=True))

    def change(bs, bn, as_, an):
        return _ppl(as_, an) / _ppl(bs, bn) - 1.0
    return {"relative_change": change(b_sum, b_n, a_sum, a_n), "ci": bootstrap_interval((b_sum, b_n, a_sum, a_n), change)}


def bits_per_byte(parts: Sequence[tuple[float, int]], byte_counts: Sequence[int]) -> float:
    """Bits per byte of text: the summed loss (nats) over the bytes the batches' tokens spell. Unlike
    perplexity per token it compares models whose tokenizers differ."""
    return sum(p[0] for p in parts) / math.log(2) / max(sum(byte_counts), 1)


def bits_per_byte_change(before: Sequence[tuple[float, int]], before_bytes: Sequence[int],
                         after: Sequence[tuple[float, int]], after_bytes: Sequence[int]) -> dict:
    """Relative change of bits per byte, after/before - 1, between two measurements that do not share
    batches (another tokenizer cuts the same text into other tokens): an unpaired bootstrap over each
    one's batches."""
    if len(before) < 2 or len(after) < 2:
        return {}
    b_loss, a_loss = (np.array([p[0] for p in x], dtype=float) for x in (before, after))
    b_bytes, a_bytes = np.array(before_bytes, dtype=float), np.array(after_bytes, dtype=float)

    def change(bi, ai):
        return (a_loss[ai].sum() / a_bytes[ai].sum()) / (b_loss[bi].sum() / b_bytes[bi].sum()) - 1.0

    result = bootstrap((np.arange(len(before)), np.arange(len(after))), change, paired=False, vectorized=False,
                       n_resamples=RESAMPLES, confidence_level=0.95, method="percentile", rng=np.random.default_rng(0))
    low, high = result.confidence_interval
    return {"relative_change": float(change(np.arange(len(before)), np.arange(len(after)))),
            "ci": [float(low), float(high)], "measure": "bits per byte (the tokenizers differ)"}


def classification_intervals(actual: Sequence[int], predicted: Sequence[int], classes: list[int]) -> dict:
    """Intervals of accuracy and macro-F1 over the held-out examples."""
    y, p = np.asarray(actual), np.asarray(predicted)
    return {"accuracy_ci": bootstrap_interval((y, p), lambda a, b: float(np.mean(a == b))),
            "macro_f1_ci": bootstrap_interval((y, p), lambda a, b: float(f1_score(a, b, labels=classes, average="macro",
                                                                         zero_division=0)))}


def accuracy_change(correct_before: Sequence[int], correct_after: Sequence[int]) -> dict:
    """after - before accuracy on the same examples, with its paired interval."""
    b, a = np.asarray(correct_before, dtype=float), np.asarray(correct_after, dtype=float)
    if len(a) != len(b) or not len(a):
        return {}
    return {"change": float(a.mean() - b.mean()), "ci": bootstrap_interval((b, a), lambda x, y: float(y.mean() - x.mean()))}


def two_level_interval(scores: Sequence[Sequence[float]], seed: int = 0) -> list[float]:
    """95% interval of the mean of per-example scores over seeds (one row per seed, the same examples):
    the examples and the seeds both resampled, as paired_branch_difference does for a difference."""
    x = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    n = x.shape[1]
    draws = [x[rng.integers(0, len(x), len(x))][:, rng.integers(0, n, n)].mean() for _ in range(RESAMPLES)]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def separated(a: list[float], b: list[float]) -> int:
    """+1 when interval `a` lies wholly above `b`, -1 wholly below, 0 when they overlap."""
    return 1 if a[0] > b[1] else -1 if a[1] < b[0] else 0


def excludes_zero(ci: list[float] | None) -> bool:
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


def paired_branch_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], seed: int = 0) -> dict:
    """Branch B minus branch A on the same held-out rows: `a` and `b` hold one row of per-example scores
    (1/0 for right/wrong) per seed, every row of the same examples in the same order.

    Two intervals: a paired two-level bootstrap (the examples resampled once for both branches, so their
    shared difficulty cancels; each branch's seeds resampled within it), which counts both the test set's
    and the seeds' noise; and, with as many seeds on both sides, a paired t-interval over the seeds'
    differences (seed k of A with seed k of B), which counts the seeds' alone. With 3 seeds either is wide."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not x.size or not y.size:
        raise ValueError("paired_branch_difference: per-seed scores of both branches on the same examples")
    rng = np.random.default_rng(seed)
    n = x.shape[1]
    out: dict = {"difference": float(y.mean() - x.mean()), "seeds": [len(x), len(y)], "examples": n,
                 "method": "paired two-level bootstrap (examples shared, seeds within each branch)"}
    draws = np.empty(RESAMPLES)
    for i in range(RESAMPLES):
        rows = rng.integers(0, n, n)
        draws[i] = (y[rng.integers(0, len(y), len(y))][:, rows].mean()
                    - x[rng.integers(0, len(x), len(x))][:, rows].mean())
    out["ci"] = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
    if len(x) == len(y) >= 2:
        per_seed = y.mean(axis=1) - x.mean(axis=1)
        half = float(t_dist.ppf(0.975, len(per_seed) - 1) * per_seed.std(ddof=1) / math.sqrt(len(per_seed)))
        out["t_ci"] = [float(per_seed.mean() - half), float(per_seed.mean() + half)]
    return out
