"""How sure a comparison is: the statistics behind --compare's verdicts. Two runs tested on the
same images: the accuracy difference, McNemar's exact test and the interval that inverts that
same test (Clopper-Pearson's, of the discordant images' split), so the verdict and the interval
never disagree: a conservative test beside a liberal interval (Newcombe's, which this replaced)
printed "same within noise" next to a 95% interval that excluded 0.
Runs that differ only in --seed: a group's mean and standard deviation, and a t-interval for the
difference between two groups. The speedup: the ratio of the runs' time-weighted training rates,
its interval from the same estimator.
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


# Why a comparison has no figure, said where it is printed (report.py), from here alone.
NO_IMAGES = "no test images to compare the runs on"
FEW_EPOCHS = "fewer than 2 steady epochs"
NO_SPREAD = "every steady epoch at the same rate: no spread to tell how sure it is"


def paired_accuracy(first_correct, this_correct):
    """PairedAccuracy of two lists of per-image correctness (bools), image by image; None for no
    images (NO_IMAGES: nothing was compared, so no verdict, not even "same within noise")."""
    pairs = list(zip(first_correct, this_correct, strict=True))
    n = len(pairs)
    if n == 0:
        return None
    only_first = sum(1 for f, t in pairs if f and not t)
    only_this = sum(1 for f, t in pairs if t and not f)
    p = mcnemar_exact_p(only_first, only_this)
    diff = 100.0 * (only_this - only_first) / n
    return PairedAccuracy(
        n, only_first, only_this, diff, discordant_interval(only_first, only_this, n), p, verdict(p, diff)
    )


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


def discordant_interval(only_first, only_this, images):
    """The 95% interval of this run's accuracy minus the first's (in points), the one that
    inverts McNemar's exact test: the exact Clopper-Pearson interval [q_low, q_high] of q, the
    share of the d = only_first + only_this discordant images that this run got right, taken to
    the difference (only_this - only_first) / images = d / images * (2q - 1). It holds 0 exactly
    when q = 1/2 is inside [q_low, q_high], i.e. when neither binomial tail at 1/2 is below 2.5%,
    i.e. when the exact two-sided p (twice the smaller tail: Binomial(d, 1/2) is symmetric) is at
    least 0.05: "same within noise" exactly when the interval holds 0. (Twice a tail of
    Binomial(d, 1/2) is a multiple of 2^-d, never exactly 0.05.) Like the test, it is conditional
    on d: it says how sure the split of the discordant images is, not how many there would be on
    other images; with none it is [0, 0] (both runs right and wrong on the same images)."""
    discordant = only_first + only_this
    if discordant == 0:
        return 0.0, 0.0
    from scipy import stats

    share = stats.binomtest(only_this, discordant).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    # (Computed as the difference itself is, so share 0 or 1 gives exactly -/+ 100 d / images.)
    return tuple(100.0 * (discordant * (2 * q) - discordant) / images for q in (share.low, share.high))


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
def training_rate(epochs):
    """Images per second over `epochs`, given as [(images, seconds)]: all their images over all
    their seconds (each epoch weighted by its duration), or None without a second timed."""
    seconds = sum(s for _, s in epochs)
    return sum(i for i, _ in epochs) / seconds if seconds > 0 else None


def speedup(first_epochs, this_epochs):
    """(this run's training_rate over the first's, its 95% interval or None, why there is none
    or None), each run's epochs given as [(images, seconds)]. One estimator for both: the
    interval is centred (on a log scale) on the speedup itself. Each rate is a ratio estimator,
    total images over total seconds; its standard error comes from the spread of the epochs'
    residuals images - rate * seconds (the linearization of a ratio estimator), that of
    log(speedup) from both runs' relative errors, with Welch-Satterthwaite's degrees of freedom.
    No interval without two timed epochs in each run (FEW_EPOCHS), nor where every epoch ran at
    the same rate (NO_SPREAD: a zero-width interval would claim certainty that one steady run of
    epochs cannot give). It says how steady this machine was during these runs, not how another
    machine would do."""
    first, this = training_rate(first_epochs), training_rate(this_epochs)
    if not first or not this:
        return None, None, FEW_EPOCHS
    point = this / first
    if len(first_epochs) < 2 or len(this_epochs) < 2:
        return point, None, FEW_EPOCHS
    a, b = log_rate_variance(first_epochs, first), log_rate_variance(this_epochs, this)
    se = math.sqrt(a + b)
    if se == 0:
        return point, None, NO_SPREAD
    df = (a + b) ** 2 / (a**2 / (len(first_epochs) - 1) + b**2 / (len(this_epochs) - 1))
    low, high = t_interval(math.log(point), se, df)
    return point, (math.exp(low), math.exp(high)), None


def log_rate_variance(epochs, rate):
    """The squared standard error of log(rate), rate = total images / total seconds of `epochs`:
    var(rate) ~ sum((images - rate * seconds)^2) / (n (n - 1) mean_seconds^2), over rate^2."""
    n = len(epochs)
    mean_seconds = sum(s for _, s in epochs) / n
    residuals = sum((i - rate * s) ** 2 for i, s in epochs)
    return residuals / (n * (n - 1) * mean_seconds**2) / rate**2
