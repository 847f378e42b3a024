"""How sure a comparison is: the statistics behind --compare's verdicts. Two runs tested on the
same images: the accuracy difference with Newcombe's paired interval and McNemar's exact test.
Runs that differ only in --seed: a group's mean and standard deviation, and a t-interval for the
difference between two groups. The speedup: an interval from the spread of the epochs' speed.
scipy.stats gives the distributions; nothing here is a hand-written quantile."""

import math
import statistics
from typing import NamedTuple

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # McNemar's p below this: a difference, not noise
SAME, BETTER, WORSE = "same within noise", "better", "worse"


class PairedAccuracy(NamedTuple):
    """One run against the first on the same test images."""

    images: int
    only_first: int  # images the first run got right and this one wrong
    only_this: int  # images this run got right and the first one wrong
    acc_diff: float  # this run's accuracy minus the first's, in points
    ci95: tuple  # (low, high) of acc_diff, in points
    mcnemar_p: float
    verdict: str


def paired_accuracy(first_correct, this_correct):
    """PairedAccuracy of two lists of per-image correctness (bools), image by image."""
    pairs = list(zip(first_correct, this_correct, strict=True))
    n = len(pairs)
    both = sum(1 for f, t in pairs if f and t)
    only_first = sum(1 for f, t in pairs if f and not t)
    only_this = sum(1 for f, t in pairs if t and not f)
    low, high = newcombe_interval(both, only_first, only_this, n - both - only_first - only_this)
    p = mcnemar_exact_p(only_first, only_this)
    diff = 100.0 * (only_this - only_first) / n
    return PairedAccuracy(n, only_first, only_this, diff, (100.0 * low, 100.0 * high), p, verdict(p, diff))


def mcnemar_exact_p(only_first, only_this):
    """McNemar's exact test: under "no difference" each discordant image is equally likely to
    favour either run, so only_this ~ Binomial(only_first + only_this, 1/2); two-sided p."""
    discordant = only_first + only_this
    if discordant == 0:
        return 1.0
    from scipy import stats  # here, not at the top: importing scipy.stats adds ~0.5 s to every start of main.py

    return float(stats.binomtest(only_this, discordant, 0.5, alternative="two-sided").pvalue)


def verdict(p, diff):
    return SAME if p >= ALPHA else BETTER if diff > 0 else WORSE


def newcombe_interval(both, only_first, only_this, neither):
    """The 95% interval of p_this - p_first (as proportions) for paired proportions: Newcombe's
    hybrid score interval (Stat. Med. 1998;17:2635, method 10), which combines the two Wilson
    score intervals with the correlation phi of the per-image outcomes."""
    n = both + only_first + only_this + neither
    first, this = both + only_first, both + only_this  # images each run got right
    p1, p2 = first / n, this / n
    l1, u1 = wilson(first, n)
    l2, u2 = wilson(this, n)
    margins = first * (n - first) * this * (n - this)
    phi = (both * neither - only_first * only_this) / math.sqrt(margins) if margins else 0.0
    diff = p2 - p1
    below = math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    above = math.sqrt(max((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2, 0.0))
    return diff - below, diff + above


def wilson(successes, n):
    """The Wilson score interval of a proportion (scipy's)."""
    from scipy import stats

    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return interval.low, interval.high


# --------------------------------------------------------------------------- seed groups
def mean_and_sd(values):
    """(mean, sample standard deviation), the sd None for a single value."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def group_difference(first, other):
    """The difference mean(other) - mean(first) of two groups' values, given as [(seed, value)],
    with a 95% t-interval: paired by seed over the seeds both groups ran (when there are at
    least two, each once per group), else Welch's interval for unpaired groups (at least two
    values each). Returns (diff, (low, high) or None, "seed" / "none" / None: the pairing)."""
    first_by_seed, other_by_seed = dict(first), dict(other)
    common = sorted(set(first_by_seed) & set(other_by_seed))
    if len(common) >= 2 and len(first_by_seed) == len(first) and len(other_by_seed) == len(other):
        diffs = [other_by_seed[s] - first_by_seed[s] for s in common]
        mean, sd = mean_and_sd(diffs)
        return mean, t_interval(mean, sd / math.sqrt(len(diffs)), len(diffs) - 1), "seed"
    a, b = [v for _, v in first], [v for _, v in other]
    diff = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return diff, None, None
    return diff, welch_interval(a, b), "none"


def t_interval(center, standard_error, df):
    """center +- t(0.975, df) * standard_error."""
    from scipy import stats

    half = stats.t.ppf(1 - ALPHA / 2, df) * standard_error if standard_error > 0 else 0.0
    return center - half, center + half


def welch_interval(a, b):
    """The 95% interval of mean(b) - mean(a) for independent samples of unequal variance
    (Welch: the Welch-Satterthwaite degrees of freedom)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t_interval(diff, se, df)


# --------------------------------------------------------------------------- speed
def speedup_interval(first_rates, this_rates):
    """The 95% interval of the speedup (this run's images/s over the first's) from the spread of
    each run's steady epochs: Welch's interval of the difference of the logarithms of their
    images/s, taken back to a ratio. None without two steady epochs in each run. It says how
    steady this machine was during these runs, not how another machine would do."""
    if len(first_rates) < 2 or len(this_rates) < 2 or min(*first_rates, *this_rates) <= 0:
        return None
    low, high = welch_interval([math.log(r) for r in first_rates], [math.log(r) for r in this_rates])
    return math.exp(low), math.exp(high)
