"""--compare's error bars, on hand-made run folders (no training): the paired accuracy difference
with the interval that inverts McNemar's exact test (Clopper-Pearson's), McNemar's exact p and the
verdict words from per-image predictions with known discordant counts, and that verdict and interval
never disagree; a seed group's mean, sd and t-interval against hand-computed values; the
speedup's interval from the steady epochs; older runs without predictions; the outputs' names."""

import csv
import json
import math

import pytest

from report import compare_runs, comparison_figure, comparison_report, load_finished_run
from verdicts import group_difference, paired_accuracy

T_975_DF2 = 4.302652729749462  # Student's t, 97.5%, 2 degrees of freedom (tables: 4.303)
T_975_DF1 = 12.706204736174694  # ... 1 degree of freedom (tables: 12.706)
CLASSES = ("cat", "dog")
SETTINGS = dict(
    data_dir="/data/pets",
    image_size=64,
    batch_size=32,
    epochs=4,
    learning_rate=1e-4,
    amp=False,
    model="resnet18",
    device="cpu",
)


def write_run(root, name, correct=None, seed=42, precision="FP32", rates=(100.0, 50.0, 50.0, 50.0), test_acc=None):
    """A finished run folder: results.json (epochs of 1000 images at `rates` images/s), config.json,
    and with `correct` (one bool per test image) a test_predictions.csv."""
    folder = root / name
    folder.mkdir(parents=True)
    if correct is not None:
        with open(folder / "test_predictions.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("file", "true_label", "predicted_label", "confidence"))
            for i, right in enumerate(correct):
                true = CLASSES[i % 2]
                writer.writerow((f"{true}/{i:03d}.jpg", true, true if right else CLASSES[1 - i % 2], "0.9000"))
        test_acc = 100.0 * sum(correct) / len(correct) if correct else test_acc
    epochs = [
        {"epoch": i + 1, "seconds": 1000 / rate, "images_per_sec": rate, "peak_mem_mb": None, "val_acc": 50.0}
        for i, rate in enumerate(rates)
    ]
    results = {
        "run": name,
        "finished": True,
        "test_acc": test_acc,
        "device": "Test CPU",
        "precision": precision,
        "amp": precision != "FP32",
        "total_train_seconds": sum(e["seconds"] for e in epochs),
        "epochs": epochs,
        "device_capability": "AVX512 (avx512_bf16)",
        "amp_dtype_native": True if precision != "FP32" else None,
    }
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config.json").write_text(
        json.dumps({**SETTINGS, "checkpoint_name": name, "seed": seed, "amp": precision != "FP32"})
    )
    return load_finished_run(str(root), name)


def paired(both, only_first, only_this, neither):
    """(first run's per-image correctness, the other's) with these counts, the images interleaved."""
    pattern = [(1, 1)] * both + [(1, 0)] * only_first + [(0, 1)] * only_this + [(0, 0)] * neither
    pattern = pattern[::2] + pattern[1::2]  # not sorted by outcome
    return [bool(a) for a, _ in pattern], [bool(b) for _, b in pattern]


def binomial_tail(k, n, q, upper):
    """P(X >= k) (upper) or P(X <= k) of X ~ Binomial(n, q), summed term by term."""
    terms = range(k, n + 1) if upper else range(k + 1)
    return sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in terms)


def clopper_pearson_by_hand(k, n):
    """The exact 95% interval of a proportion k / n: the q whose upper (lower) tail at k is 2.5%,
    by bisection (both tails are monotone in q)."""

    def solve(upper):
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            tail = binomial_tail(k, n, mid, upper)
            # The upper tail grows with q, the lower one shrinks.
            if (tail < 0.025) == upper:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    return (0.0 if k == 0 else solve(True)), (1.0 if k == n else solve(False))


def paired_interval_by_hand(a, b, c, d):
    """The accuracy difference's interval in points: the split c / (b + c) of the discordant
    images, its exact interval taken to points by (b + c) / n * (2q - 1)."""
    n = a + b + c + d
    low, high = clopper_pearson_by_hand(c, b + c)
    return 100 * (b + c) / n * (2 * low - 1), 100 * (b + c) / n * (2 * high - 1)


def exact_two_sided(k, n):
    """McNemar's exact p: twice the smaller binomial tail (n discordant images, p = 1/2), at most 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(
    "counts,verdict",
    [
        ((25, 5, 9, 1), "same within noise"),  # 5 vs 9 discordant images: p = 0.424
        ((20, 1, 12, 7), "better"),  # 1 vs 12: p = 0.0034
        ((20, 12, 1, 7), "worse"),
        ((30, 0, 0, 10), "same within noise"),  # no discordant image: p = 1
    ],
)
def test_paired_difference_interval_mcnemar_and_verdict(tmp_path, counts, verdict):
    first_correct, other_correct = paired(*counts)
    runs = [write_run(tmp_path, "fp32", first_correct), write_run(tmp_path, "amp", other_correct, precision="AMP bf16")]
    vs_first = compare_runs(runs)["runs"][1]["vs_first"]
    both, only_first, only_this, neither = counts
    n = sum(counts)
    assert (vs_first["images"], vs_first["only_first_right"], vs_first["only_this_right"]) == (n, only_first, only_this)
    assert vs_first["acc_diff"] == pytest.approx(100 * (only_this - only_first) / n)
    assert vs_first["mcnemar_p"] == pytest.approx(exact_two_sided(only_this, only_first + only_this), rel=1e-12)
    expected = [0.0, 0.0] if only_first + only_this == 0 else list(paired_interval_by_hand(*counts))
    assert vs_first["acc_diff_ci95"] == pytest.approx(expected, rel=1e-6)
    assert vs_first["verdict"] == verdict
    # compare.md says it in words, and the interval with it.
    row = [line for line in comparison_report(runs).splitlines() if line.startswith("| amp | ")][-1]  # (against fp32)
    low, high = vs_first["acc_diff_ci95"]
    assert f"| {low:+.2f} to {high:+.2f} | {only_first} | {only_this} |" in row and f"| {verdict} |" in row


def test_the_example_values_by_hand(tmp_path):
    """The first case above, the numbers written out: 40 images, 5 and 9 discordant."""
    runs = [write_run(tmp_path, "a", paired(25, 5, 9, 1)[0]), write_run(tmp_path, "b", paired(25, 5, 9, 1)[1])]
    vs_first = compare_runs(runs)["runs"][1]["vs_first"]
    assert vs_first["mcnemar_p"] == pytest.approx(2 * (1 + 14 + 91 + 364 + 1001 + 2002) / 2**14)  # 0.42395
    assert vs_first["acc_diff"] == pytest.approx(10.0)
    # 9 of the 14 discordant images favour b: q = 0.643 in [0.351, 0.872] (exact), so the
    # difference is 14/40 * (2q - 1) = 10.00 points in [-10.40, +26.07].
    assert vs_first["acc_diff_ci95"] == pytest.approx([-10.40, 26.07], abs=0.005)


@pytest.mark.parametrize(
    "images,only_first,only_this",
    [(216, 5, 0), (216, 7, 1), (216, 9, 2), (216, 14, 5), (216, 19, 8), (216, 22, 10), (1000, 5, 0)],
)
def test_same_within_noise_is_never_printed_beside_an_interval_without_zero(tmp_path, images, only_first, only_this):
    # (review) these splits gave p 0.0625 or so, "same within noise", beside Newcombe's interval
    # [+0.32, +4.30] points (216 images, 0 vs 5) or [+0.02, +1.00] (1000 images): both excluded 0.
    counts = (images // 2, only_first, only_this, images - images // 2 - only_first - only_this)
    runs = [write_run(tmp_path, "a", paired(*counts)[0]), write_run(tmp_path, "b", paired(*counts)[1])]
    vs_first = compare_runs(runs)["runs"][1]["vs_first"]
    low, high = vs_first["acc_diff_ci95"]
    assert vs_first["mcnemar_p"] >= 0.05 and vs_first["verdict"] == "same within noise"
    assert low < 0 < high
    assert f"| {low:+.2f} to {high:+.2f} |" in comparison_report(runs)


@pytest.mark.parametrize("images", [40, 216, 1000])
def test_verdict_and_interval_agree_for_every_split_of_up_to_60_discordant_images(images):
    """Every (only_first, only_this) with at most 60 discordant images: "same within noise"
    exactly when the 95% interval holds 0, "better" exactly when it is above 0, "worse" below."""
    disagreements = []
    for discordant in range(min(60, images) + 1):
        for only_this in range(discordant + 1):
            only_first = discordant - only_this
            rest = images - discordant
            first = [True] * only_first + [False] * only_this + [True] * (rest // 2) + [False] * (rest - rest // 2)
            this = [False] * only_first + [True] * only_this + [True] * (rest // 2) + [False] * (rest - rest // 2)
            result = paired_accuracy(first, this)
            low, high = result.ci95
            expected = "same within noise" if low <= 0 <= high else "better" if low > 0 else "worse"
            if result.verdict != expected or not low <= result.acc_diff <= high:
                disagreements.append((only_first, only_this, result.verdict, result.ci95, result.mcnemar_p))
    assert disagreements == []


def test_seed_groups_mean_sd_and_paired_t_interval(tmp_path):
    fp32 = [
        write_run(tmp_path, f"fp32_s{s}", seed=s, test_acc=acc, rates=(9.0, r, r, r))
        for s, acc, r in ((1, 80.0, 100.0), (2, 82.0, 110.0), (3, 84.0, 90.0))
    ]
    amp = [
        write_run(tmp_path, f"amp_s{s}", seed=s, precision="AMP bf16", test_acc=acc, rates=(9.0, r, r, r))
        for s, acc, r in ((1, 81.0, 200.0), (2, 85.0, 210.0), (3, 84.0, 190.0))
    ]
    first, second = compare_runs(fp32 + amp)["groups"]
    assert (first["runs"], first["n"], first["seeds"]) == (["fp32_s1", "fp32_s2", "fp32_s3"], 3, [1, 2, 3])
    assert (first["test_acc_mean"], first["test_acc_sd"]) == pytest.approx((82.0, 2.0))
    assert (first["images_per_sec_mean"], first["images_per_sec_sd"]) == pytest.approx(
        (100.0, 10.0)
    )  # epoch 1 left out
    assert (second["test_acc_mean"], second["test_acc_sd"]) == pytest.approx((83 + 1 / 3, math.sqrt(13 / 3)))
    assert first["vs_first"] is None
    # Paired by seed: differences 1, 3, 0; mean 4/3, sd sqrt(7/3), t(0.975, 2) * sd / sqrt(3).
    half = T_975_DF2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert second["vs_first"]["pairing"] == "seed"
    assert second["vs_first"]["acc_diff"] == pytest.approx(4 / 3)
    assert second["vs_first"]["acc_diff_ci95"] == pytest.approx([4 / 3 - half, 4 / 3 + half])
    assert second["vs_first"]["images_per_sec_diff"] == pytest.approx(100.0)
    report = comparison_report(fp32 + amp)
    assert "| amp_s1, amp_s2, amp_s3 | AMP bf16 | 3 | 1 2 3 | 83.33 ± 2.08 | 200 ± 10.0 | +1.33 |" in report
    assert f"{4 / 3 - half:+.2f} to {4 / 3 + half:+.2f}" in report
    assert "note: the runs differ in --seed" in report and "warning" not in report
    # The chart's group row is labelled as what it is: a difference from the first group.
    labels = [label.get_text() for ax in comparison_figure(fp32 + amp).axes for label in ax.get_yticklabels()]
    assert "group amp_s1, amp_s2, amp_s3 (n=3) vs the first group" in labels


def test_seed_groups_without_matching_seeds_get_welchs_interval():
    # Seeds 1, 2, 3 against 4, 5: unpaired. Welch: variances 4/3 and 1 of the means, df = (7/3)^2 / ((4/3)^2/2 + 1).
    diff, interval, pairing = group_difference([(1, 80.0), (2, 82.0), (3, 84.0)], [(4, 86.0), (5, 88.0)])
    assert (diff, pairing) == (pytest.approx(5.0), "none")
    df = (7 / 3) ** 2 / ((4 / 3) ** 2 / 2 + 1)
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(7 / 3)
    assert df == pytest.approx(2.882, abs=1e-3) and interval == pytest.approx((5 - half, 5 + half))
    # Two seeds in common: paired over those (diffs 1 and 3: mean 2, sd sqrt(2)); one alone: no interval.
    diff, interval, pairing = group_difference([(1, 80.0), (2, 82.0), (3, 84.0)], [(1, 81.0), (2, 85.0)])
    assert (diff, pairing) == (2.0, "seed")
    assert interval == pytest.approx((2 - T_975_DF1 * math.sqrt(2) / math.sqrt(2), 2 + T_975_DF1))
    assert group_difference([(1, 80.0)], [(1, 81.0)]) == (1.0, None, None)


def test_speedup_interval_from_the_steady_epochs(tmp_path):
    # Epoch 1 (start-up) is left out: its 5 images/s would halve nothing here.
    runs = [
        write_run(tmp_path, "fp32", paired(30, 0, 0, 10)[0], rates=(5.0, 50.0, 52.0, 48.0)),
        write_run(tmp_path, "amp", paired(30, 0, 0, 10)[1], rates=(5.0, 100.0, 104.0, 96.0), precision="AMP bf16"),
    ]
    vs_first = compare_runs(runs)["runs"][1]["vs_first"]
    assert vs_first["speedup"] == pytest.approx(2.0)  # 3000 images in the same time ratio

    # Every epoch has 1000 images, so a run's rate is 1000 over its mean epoch seconds, and its
    # relative standard error is the seconds' sd / (sqrt(3) * their mean): the same for both runs
    # here (each epoch twice as fast), so Welch's df is 4; the interval is 2.0 * exp(+-t * se).
    def relative_se(rates):
        seconds = [1000 / r for r in rates]
        mean = sum(seconds) / 3
        return math.sqrt(sum((s - mean) ** 2 for s in seconds) / 2) / math.sqrt(3) / mean

    se = math.sqrt(relative_se((50, 52, 48)) ** 2 + relative_se((100, 104, 96)) ** 2)
    assert vs_first["speedup_ci95"] == pytest.approx(
        [2.0 * math.exp(-2.7764451051977934 * se), 2.0 * math.exp(2.7764451051977934 * se)]
    )
    assert "| 2.00x | 1.83x to 2.19x |" in comparison_report(runs)


def test_speedup_interval_holds_the_speedup_when_epochs_vary(tmp_path):
    # (review) 30 epochs at 100 images/s against epochs alternating 100 and 1000 (1000 images
    # each): 60000 images in 600 s + 165 s, i.e. 1.82x, but the interval, from the geometric mean
    # of the epochs' rates, said 2.04x to 4.90x. Point and interval are now one estimator.
    runs = [
        write_run(tmp_path, "steady", paired(30, 0, 0, 10)[0], rates=(5.0, *[100.0] * 30)),
        write_run(tmp_path, "uneven", paired(30, 0, 0, 10)[1], rates=(5.0, *[100.0, 1000.0] * 15)),
    ]
    vs_first = compare_runs(runs)["runs"][1]["vs_first"]
    assert vs_first["speedup"] == pytest.approx(2 / 1.1)  # 1.82x
    low, high = vs_first["speedup_ci95"]
    assert low < vs_first["speedup"] < high
    assert math.log(vs_first["speedup"]) == pytest.approx((math.log(low) + math.log(high)) / 2)
    assert f"| 1.82x | {low:.2f}x to {high:.2f}x |" in comparison_report(runs)


def test_runs_without_predictions_still_compare(tmp_path):
    runs = [write_run(tmp_path, "old", test_acc=80.0), write_run(tmp_path, "new", paired(30, 0, 2, 8)[1])]
    vs_first = compare_runs(runs)["runs"][1]["vs_first"]
    assert vs_first["acc_diff"] == pytest.approx(0.0)  # 80% both
    assert (vs_first["acc_diff_ci95"], vs_first["mcnemar_p"], vs_first["verdict"]) == (None, None, None)
    assert "old has no test_predictions.csv" in vs_first["unavailable"]
    report = comparison_report(runs)
    assert "| new | +0.00 | n/a | n/a | n/a | n/a | unavailable |" in report
    assert "- new: paired statistics unavailable: old has no test_predictions.csv" in report
    # Predictions on other images (another test split) cannot be paired either.
    other = write_run(tmp_path, "other", paired(30, 0, 2, 8)[1] + [True])
    assert "tested on different images" in compare_runs([runs[1], other])["runs"][1]["vs_first"]["unavailable"]


def test_compare_names_its_outputs_and_says_what_it_replaced(tmp_path, run_cli):
    write_run(tmp_path, "fp32", paired(25, 5, 9, 1)[0])
    write_run(tmp_path, "amp", paired(25, 5, 9, 1)[1], precision="AMP bf16")
    code, out, err = run_cli("--compare", "fp32", "amp", checkpoint_dir=tmp_path)
    assert code == 0, err
    names = [tmp_path / f"compare_fp32_vs_amp.{ext}" for ext in ("md", "json", "png")]
    assert f"wrote {names[0]}, {names[1]} and {names[2]}\n" in out
    assert "same within noise" in out and "+10.00" in out
    assert json.loads(names[1].read_text())["runs"][1]["vs_first"]["verdict"] == "same within noise"
    code, out, err = run_cli("--compare", "fp32", "amp", checkpoint_dir=tmp_path)
    assert out.rstrip().endswith("(replacing the earlier comparison of that name)")
    code, out, err = run_cli("--compare", "amp", "fp32", "--compare_name", "flipped", checkpoint_dir=tmp_path)
    assert (tmp_path / "flipped.md").read_text().count("| fp32 | -10.00 |") == 1
    assert not (tmp_path / "compare.md").exists()


def test_compare_name_never_replaces_a_file_that_is_not_a_comparison(tmp_path, run_cli):
    # (review) --compare_name README wrote over checkpoints/README.md, "replacing the earlier comparison".
    write_run(tmp_path, "fp32", paired(25, 5, 9, 1)[0])
    readme = tmp_path / "README.md"
    readme.write_text("the folder's own notes\n")
    code, out, err = run_cli("--compare", "fp32", "--compare_name", "README", checkpoint_dir=tmp_path)
    assert code == 2 and f"{readme} exists and is not a comparison" in err and "--compare_name" in err
    assert readme.read_text() == "the folder's own notes\n" and not (tmp_path / "README.json").exists()


def test_no_images_and_no_spread_are_n_a_with_their_reason(tmp_path):
    """(review) paired_accuracy([], []) divided by zero, and epochs all at one rate (synthetic)
    gave a zero-width speedup interval, a certainty no run of epochs can give: both are n/a now,
    each with why."""
    assert paired_accuracy([], []) is None
    runs = [
        write_run(tmp_path, "fp32", [], rates=(5.0, 50.0, 50.0, 50.0), test_acc=0.0),
        write_run(tmp_path, "amp", [], rates=(5.0, 100.0, 100.0, 100.0), test_acc=0.0, precision="AMP bf16"),
    ]
    vs_first = compare_runs(runs)["runs"][1]["vs_first"]
    assert vs_first["speedup"] == pytest.approx(2.0) and vs_first["speedup_ci95"] is None
    assert vs_first["verdict"] is None and "no test images to compare the runs on" in vs_first["unavailable"]
    report = comparison_report(runs)
    assert "| 2.00x | n/a (every steady epoch at the same rate: no spread to tell how sure it is) |" in report
    assert "- amp: paired statistics unavailable: fp32 and amp: no test images to compare the runs on" in report
