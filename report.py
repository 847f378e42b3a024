"""Reporting: turn runs' results into the comparison table, the learning-curve (with the gradient
norm and float16's loss scale), comparison and confusion-matrix pictures, per-class accuracies
and the predictions CSV; write and read a run's TensorBoard event files."""

import csv
import hashlib
import io
import os
import threading

import numpy as np

# Figure (not pyplot) draws with the Agg canvas: no display needed and no global figure state,
# so a picture redrawn every epoch of a long run leaks nothing.
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

import verdicts
from checkpoint import run_command
from machine import busy_note, was_busy
from utils import UserError, atomic_savefig, atomic_write_text, load_json, write_failure

TABLE_COLUMNS = (
    "run",
    "device",
    "precision",
    "test acc (%)",
    "peak GPU memory",
    "s/epoch",
    "epochs",
    "total time",
    "images/s",
)
RELATIVE_COLUMNS = ("speedup", "memory saving")
# After the others, so scripts that read the table by position still find them where they were.
SETTING_COLUMNS = ("model", "image size", "batch size", "dataset")
SCALER_COLUMNS = ("skipped steps",)  # GradScaler's skipped optimizer steps; last, for the same reason
UNKNOWN = "?"  # a setting of a run without a readable config.json
DEFAULT_MODEL = "resnet18"  # the only model before --model; configs written then have no "model"
# Settings runs may differ in without a warning: the precision being compared (amp, amp_dtype,
# fp32_math), where a run is saved or resumed, and other modes' flags. num_workers and cache change
# images/s only where loading is the bottleneck. (--log_interval and --tensorboard are compared:
# their writes and syncs fall inside the timed epochs; so is --save_every_steps, whose writes are
# not in an epoch's seconds but are in the total time.) The config's
# device ("cuda") and its copies of results.json's device fields give way to results.json's.
NOT_COMPARED = {
    "amp",
    "amp_dtype",
    "fp32_math",
    "precision",
    "checkpoint_name",
    "checkpoint_dir",
    "num_workers",
    "progress",
    "resume",
    "evaluate",
    "predict",
    "predict_dir",
    "compare",
    "compare_name",
    "overwrite",
    "dist_timeout",
    "cache",
    "benchmark",
    "benchmark_steps",
    "data",
    "demo",
    "predictions_file",
    "device_name",
    "amp_dtype_native",
    "sessions",
    "export",
    "calibration_images",
}


# --------------------------------------------------------------------------- the table
def load_finished_run(checkpoint_dir, name):
    """The results.json of a run that has been tested, with its config.json's settings under
    "config" (None when the run has no readable config.json); anything else is a user error."""
    path = os.path.join(checkpoint_dir, name, "results.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(checkpoint_dir, name, "last.pt")):
            raise UserError(f"run {name!r} has not finished an epoch yet (no {path}); complete it with --resume")
        raise UserError(f"no run named {name!r}: {path} does not exist")
    try:
        results = load_json(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable results file: {exc}") from None
    if not isinstance(results, dict) or not isinstance(results.get("epochs"), list):
        raise UserError(f"{path} is not a results file of this template (no list of epochs)")
    if not results.get("finished") or results.get("test_acc") is None:
        raise UserError(f"run {name!r} has not finished (no test accuracy in {path}); complete it with --resume")
    if not isinstance(results["test_acc"], (int, float)):
        raise UserError(f"{path} is not a results file of this template (test_acc is {results['test_acc']!r})")
    results["run"] = name  # the name it was asked for, even if its folder was renamed
    results["config"] = load_run_config(os.path.join(checkpoint_dir, name, "config.json"))
    results["test_predictions"] = read_test_predictions(os.path.join(checkpoint_dir, name, "test_predictions.csv"))
    return results


def load_run_config(path):
    """A run's config.json as a dict, or None if it is missing or unreadable (old runs may lack
    it): the comparison then shows the run's settings as unknown instead of failing."""
    try:
        config = load_json(path)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def read_results(run_dir):
    """A run's results.json as a dict; {} where it is missing, unreadable or not a dict (a run
    that has not finished an epoch, a damaged file), for the callers that then say or do less."""
    try:
        results = load_json(os.path.join(run_dir, "results.json"))
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


# A run's peak GPU memory two ways (see metrics.PeakMemory): over every training epoch, or in steady
# state, over the epochs after each session's first (no cuDNN autotuning in them).
OVERALL_PEAK, STEADY_PEAK = "peak_mem_mb", "steady_peak_mem_mb"


def peak_memory(run, key=OVERALL_PEAK):
    """The largest `key` peak GPU memory (MiB) of a run's epochs; None on the CPU (or for a
    steady-state peak, when no epoch has one)."""
    peaks = [e[key] for e in run["epochs"] if e.get(key) is not None]
    return max(peaks) if peaks else None


def steady_epochs(run):
    """The epochs that time the training itself: all but each session's first (a run's first
    epoch, and the first after each --resume, also hold the workers' start-up, cuDNN's
    autotuning and --compile's compiling), or all of them when that leaves none. A results.json
    from before `first_in_session` leaves out its first epoch only."""
    epochs = run["epochs"]
    steady = [e for i, e in enumerate(epochs) if not e.get("first_in_session", i == 0)]
    return steady or epochs


def memory_key(runs):
    """The peak the table compares: the steady-state one when every run has it (CUDA runs with
    an epoch after their session's first), else the overall one for all, so they compare alike."""
    return STEADY_PEAK if all(peak_memory(r, STEADY_PEAK) is not None for r in runs) else OVERALL_PEAK


def busy_epochs_note(runs):
    """A warning naming, run by run, the epochs whose training was timed while other programs took
    part of the machine (machine.was_busy), and how much they took; "" when none was."""
    busy = []
    for r in runs:
        epochs = [e for e in r["epochs"] if was_busy(e)]
        if not epochs:
            continue
        others = sorted(e["other_cpus"] for e in epochs if e.get("other_cpus") is not None)
        span = (
            f"{others[0]}" if others and others[0] == others[-1] else f"{others[0]} to {others[-1]}" if others else ""
        )
        took = f"other programs kept {span} of {epochs[0]['cpus']} cores busy" if others else "load above the cores"
        numbers = ", ".join(str(e["epoch"]) for e in epochs)
        busy.append(f"{r['run']} epoch{'s' if len(epochs) > 1 else ''} {numbers} of {len(r['epochs'])} ({took})")
    if not busy:
        return ""
    return f"warning: these epochs' s/epoch and images/s may be slower than this machine's own: {'; '.join(busy)}."


def memory_note(runs):
    """The line that says which peak GPU memory the table shows ("" on the CPU)."""
    if all(peak_memory(r) is None for r in runs):
        return ""
    if memory_key(runs) == STEADY_PEAK:
        return (
            "Peak GPU memory: the steady-state training peak (epochs after each session's first; "
            "results.json's steady_peak_mem_mb)."
        )
    return (
        "Peak GPU memory: the overall training peak (results.json's peak_mem_mb), cuDNN's autotuning in each "
        "session's first epoch included: not every run has a steady-state peak (steady_peak_mem_mb)."
    )


def throughput(run):
    """Training images per second over the steady epochs (each weighted by its duration)."""
    return verdicts.training_rate(epoch_work(run))


def epoch_work(run):
    """[(images, seconds)] of the run's steady epochs that were timed: what its throughput and
    the speedup's interval are computed from."""
    return [(e["images_per_sec"] * e["seconds"], e["seconds"]) for e in steady_epochs(run) if e.get("images_per_sec")]


def seconds_per_epoch(run):
    """The mean seconds of the steady epochs."""
    epochs = steady_epochs(run)
    return sum(e["seconds"] for e in epochs) / max(len(epochs), 1)


def comparison_table(runs):
    """A markdown table with a row per run (results.json dicts, with their "config" where known).
    With more than one run, speedup (images/s) and memory saving (peak GPU memory) are relative
    to the first run. The peak GPU memory is the steady-state one where every run has it (see
    memory_key). The last column counts the steps GradScaler skipped (0 without one)."""
    relative = len(runs) > 1
    columns = TABLE_COLUMNS + (RELATIVE_COLUMNS if relative else ()) + SETTING_COLUMNS + SCALER_COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    reference, key = runs[0], memory_key(runs)
    for r in runs:
        epochs = r["epochs"]
        memory, speed = peak_memory(r, key), throughput(r)
        cells = [
            r["run"],
            r["device"],
            r["precision"],
            "n/a" if r.get("test_acc") is None else f"{r['test_acc']:.2f}",
            "n/a (CPU)" if memory is None else f"{memory / 1024:.2f} GiB",
            f"{seconds_per_epoch(r):.1f}",
            str(len(epochs)),
            f"{r['total_train_seconds']:.0f} s",
            "n/a" if speed is None else f"{speed:.0f}",
        ]
        if relative:
            reference_memory, reference_speed = peak_memory(reference, key), throughput(reference)
            cells.append(f"{speed / reference_speed:.2f}x" if speed and reference_speed else "n/a")
            cells.append(f"{100 * (1 - memory / reference_memory):.0f}%" if memory and reference_memory else "n/a")
        cells += setting_cells(r.get("config"))
        cells.append("n/a" if r.get("skipped_steps") is None else str(r["skipped_steps"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setting_cells(config):
    """The SETTING_COLUMNS cells of a run with these settings (None: unknown)."""
    if config is None:
        return [UNKNOWN] * len(SETTING_COLUMNS)
    crop = f" (crop {config['random_crop']})" if config.get("random_crop") else ""  # (the size the model saw)
    return [
        str(config.get("model", DEFAULT_MODEL)),
        f"{config.get('image_size', UNKNOWN)}{crop}",
        str(config.get("batch_size", UNKNOWN)),
        dataset_name(config.get("data_dir")),
    ]


def dataset_name(data_dir):
    """The dataset folder's own name: short enough for the table (the warning gives full paths)."""
    if not data_dir:
        return UNKNOWN
    return os.path.basename(os.path.normpath(data_dir)) or data_dir


def compared_settings(run):
    """{setting: value} of what a run's accuracy and speed depend on, besides its precision: its
    config.json's settings (if known) and the device it ran on. Unknown settings are left out."""
    config = run.get("config")
    settings = {} if config is None else {"model": DEFAULT_MODEL, **config}
    settings["device"] = run["device"]  # its name, not config.json's "cuda"
    if run.get("device_capability"):  # (the same CPU differs with ATEN_CPU_CAPABILITY, say)
        settings["device_capability"] = run["device_capability"]
    if "world_size" in run:
        settings["world_size"] = run["world_size"]
    return {name: value for name, value in settings.items() if name not in NOT_COMPARED}


def setting_differences(runs):
    """One line per setting in which the runs differ, e.g. "image_size: 32 (a), 64 (b)"; a run
    whose setting is unknown is listed as "?" but makes no difference by itself."""
    settings = [compared_settings(r) for r in runs]
    names = dict.fromkeys(name for s in settings for name in s)  # in the order config.json lists them
    differences = []
    for name in names:
        known = [s[name] for s in settings if name in s]
        if any(value != known[0] for value in known):
            values = [(s.get(name, UNKNOWN), r["run"]) for s, r in zip(settings, runs)]
            differences.append(f"{name}: {_grouped(values)}")
    return differences


def _grouped(values):
    """[(value, run)] as "value (run, run), value (run)", each value once, in order of appearance."""
    groups = []  # [(value, [runs])]; a list, since values need not be hashable
    for value, run in values:
        group = next((g for g in groups if g[0] == value), None)
        if group is None:
            groups.append((value, [run]))
        else:
            group[1].append(run)
    return ", ".join(f"{value} ({', '.join(runs)})" for value, runs in groups)


def comparison_report(runs, comparison=None):
    """What --compare prints and saves as markdown: the table, what speedup and memory saving
    are relative to, each run against the first image by image and the seed groups (from
    `comparison`, compare_runs' dict), the devices, and warnings when the runs differ in more
    than their precision or an AMP dtype was emulated."""
    comparison = comparison or compare_runs(runs)
    first = runs[0]["run"]
    text = comparison_table(runs) + "\n"
    note = memory_note(runs)
    if note:  # under the table, whose column it explains
        text += f"\n{note}\n"
    if busy_epochs_note(runs):
        text += f"\n{busy_epochs_note(runs)}\n"
    if len(runs) > 1:
        text += (
            f"\nSpeedup (images/s) and memory saving (peak GPU memory) are relative to {first}. s/epoch and "
            "images/s are of the steady epochs: each session's first epoch (a run's first, the first after a "
            "--resume) is left out when that leaves any; checkpoint writes are left out too.\n"
        )
        text += "\n" + against_first_table(comparison["runs"], first)
    if _has_seed_groups(comparison):
        text += "\n" + seed_groups_table(comparison["groups"])
    text += "\n" + devices_lines(runs)
    differences = setting_differences(runs)
    seeds = (
        [d for d in differences if d.startswith("seed: ")] if _has_seed_groups(comparison) else []
    )  # (the groups handle the seeds)
    differences = [d for d in differences if d not in seeds]
    if differences:
        text += (
            "\nwarning: these runs differ in more than precision; speedup and accuracy differences are not "
            "AMP's alone:\n" + "".join(f"- {difference}\n" for difference in differences)
        )
    if seeds:
        text += (
            f"\nnote: the runs differ in --seed ({seeds[0][len('seed: ') :]}); the seed groups compare like with like\n"
        )
    unknown = [r["run"] for r in runs if r.get("config") is None]
    if unknown and len(runs) > 1:
        text += (
            f"\nnote: no readable config.json for {', '.join(unknown)}; settings shown as {UNKNOWN} are "
            "unknown and were not compared\n"
        )
    return text


# --------------------------------------------------------------------------- error bars
def compare_runs(runs):
    """--compare's numbers, as compare.json holds them: each run against the first, image by
    image, and the seed groups (runs whose settings differ only in --seed), the first group
    being what the others are compared with."""
    return {"runs": [run_entry(r, runs[0] if i else None) for i, r in enumerate(runs)], "groups": group_entries(runs)}


def run_entry(run, first):
    """A run's numbers; `vs_first` (None for the first run): see paired_against and speedup_against."""
    entry = {
        "name": run["run"],
        "precision": run["precision"],
        "device": run["device"],
        "device_capability": run.get("device_capability"),
        "amp_dtype_native": run.get("amp_dtype_native"),
        "seed": (run.get("config") or {}).get("seed"),
        "test_acc": run["test_acc"],
        "images_per_sec": throughput(run),
        "steady_epochs": len(steady_epochs(run)),
        "vs_first": None,
    }
    if first is not None:
        entry["vs_first"] = {**paired_against(first, run), **speedup_against(first, run)}
    return entry


def paired_against(first, run):
    """The test-accuracy difference from the first run in points, its 95% interval, McNemar's p
    and the verdict, over the images both were tested on; without both runs' per-image
    predictions only the difference, and why the rest is unavailable."""
    correct, unavailable = paired_correctness(first, run)
    paired = None if correct is None else verdicts.paired_accuracy(*correct)
    if paired is None:
        if correct is not None:
            unavailable = f"{first['run']} and {run['run']}: {verdicts.NO_IMAGES}"
        return {
            "acc_diff": run["test_acc"] - first["test_acc"],
            "acc_diff_ci95": None,
            "mcnemar_p": None,
            "verdict": None,
            "unavailable": unavailable,
        }
    return {
        "acc_diff": paired.acc_diff,
        "acc_diff_ci95": list(paired.ci95),
        "mcnemar_p": paired.mcnemar_p,
        "verdict": paired.verdict,
        "images": paired.images,
        "only_first_right": paired.only_first,
        "only_this_right": paired.only_this,
    }


def paired_correctness(first, run):
    """([first run right], [this run right]) image by image, or (None, why not)."""
    for r in (first, run):
        predictions = r.get("test_predictions")
        if predictions is None:
            return None, f"{r['run']} has no test_predictions.csv (older runs: --evaluate writes it)"
        acc = 100.0 * sum(true == predicted for true, predicted in predictions.values()) / max(len(predictions), 1)
        if abs(acc - r["test_acc"]) > 1e-6:
            return None, (
                f"{r['run']}'s test_predictions.csv gives {acc:.2f}%, not its test_acc {r['test_acc']:.2f}% "
                "(rewritten by --evaluate with other settings?)"
            )
    a, b = first["test_predictions"], run["test_predictions"]
    if set(a) != set(b) or any(a[file][0] != b[file][0] for file in a):
        return None, f"{first['run']} and {run['run']} were tested on different images"
    files = sorted(a)
    return ([a[f][0] == a[f][1] for f in files], [b[f][0] == b[f][1] for f in files]), None


def speedup_against(first, run):
    """Images/s over the first run's (steady epochs), with a 95% interval from the epochs' spread
    (verdicts.speedup: one estimator for both)."""
    speedup, interval, why = verdicts.speedup(epoch_work(first), epoch_work(run))
    return {
        "speedup": speedup,
        "speedup_ci95": list(interval) if interval else None,
        "speedup_ci95_unavailable": why,
    }


def group_entries(runs):
    """Runs whose compared settings and precision agree, all but --seed, form a group (a run
    without a config.json is a group of its own), in the order of their first run."""
    groups = {}
    for r in runs:
        key = (
            (r["run"],)
            if r.get("config") is None
            else (
                r["precision"],
                repr(sorted((name, repr(value)) for name, value in compared_settings(r).items() if name != "seed")),
            )
        )
        groups.setdefault(key, []).append(r)
    # Each group's [(seed, test acc)] and [(seed, images/s)]: what the group differences pair.
    values = [
        ([(_seed(r), r["test_acc"]) for r in members], [(_seed(r), throughput(r)) for r in members if throughput(r)])
        for members in groups.values()
    ]
    entries = []
    for members, (accuracy, speed) in zip(groups.values(), values):
        acc_mean, acc_sd = verdicts.mean_and_sd(v for _, v in accuracy)
        speed_mean, speed_sd = verdicts.mean_and_sd(v for _, v in speed) if speed else (None, None)
        entries.append(
            {
                "runs": [r["run"] for r in members],
                "precision": members[0]["precision"],
                "seeds": [seed for seed, _ in accuracy],
                "n": len(members),
                "test_acc_mean": acc_mean,
                "test_acc_sd": acc_sd,
                "images_per_sec_mean": speed_mean,
                "images_per_sec_sd": speed_sd,
                "vs_first": None if not entries else group_against(values[0], values[len(entries)]),
            }
        )
    return entries


def _seed(run):
    return (run.get("config") or {}).get("seed")


def group_against(first, group):
    """The group's mean test accuracy (points) and images/s minus the first group's, each with a
    95% t-interval (see verdicts.group_difference), and how its runs were paired. `first` and
    `group`: ([(seed, test acc)], [(seed, images/s)])."""
    acc_diff, acc_interval, pairing = verdicts.group_difference(first[0], group[0])
    entry = {"acc_diff": acc_diff, "acc_diff_ci95": list(acc_interval) if acc_interval else None, "pairing": pairing}
    if first[1] and group[1]:
        speed_diff, speed_interval, _ = verdicts.group_difference(first[1], group[1])
        entry.update(
            images_per_sec_diff=speed_diff, images_per_sec_diff_ci95=list(speed_interval) if speed_interval else None
        )
    return entry


def _number(x):
    """A figure with as many decimals as its size needs (images/s: 1234, 56.7, 2.47)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _interval(interval, fmt="{:+.2f}", unit=""):
    return "n/a" if interval is None else f"{fmt.format(interval[0])}{unit} to {fmt.format(interval[1])}{unit}"


def against_first_table(entries, first):
    """Each run against the first: the markdown table and what its columns mean."""
    lines = [
        f"Against {first}, image by image (95% intervals):",
        "",
        f"| run | test acc diff (points) | 95% CI | only {first} right | only this right | McNemar p | verdict | "
        "speedup | 95% CI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for e in entries[1:]:
        v = e["vs_first"]
        speed = (
            "n/a" if v["speedup"] is None else f"{v['speedup']:.2f}x",
            # (verdicts.speedup says why there is none: a session's first epoch is not steady, say)
            f"n/a ({v.get('speedup_ci95_unavailable') or verdicts.FEW_EPOCHS})"
            if v["speedup_ci95"] is None
            else _interval(v["speedup_ci95"], "{:.2f}", "x"),
        )
        if v["verdict"] is None:
            paired = ["n/a"] * 4 + ["unavailable"]
            notes.append(f"- {e['name']}: paired statistics unavailable: {v['unavailable']}")
        else:
            paired = [
                _interval(v["acc_diff_ci95"]),
                str(v["only_first_right"]),
                str(v["only_this_right"]),
                f"{v['mcnemar_p']:.3g}",
                v["verdict"],
            ]
        lines.append(f"| {e['name']} | {v['acc_diff']:+.2f} | " + " | ".join([*paired, *speed]) + " |")
    lines += [
        "",
        f"test acc diff: the run's test accuracy minus {first}'s; only ... right: test images one of the two "
        "got right and the other wrong; McNemar p: the exact two-sided test on those images; verdict: same "
        "within noise when p >= 0.05, else better or worse; 95% CI: the interval that inverts the same test "
        "(Clopper-Pearson's, of how the discordant images split, in points), so it holds 0 exactly when the "
        f"verdict is same within noise. speedup: steady-epoch images/s over {first}'s (total images over total "
        "seconds), its interval from the same estimator and the spread of the epochs: how steady this machine "
        "was, not what another would do.",
        *notes,
    ]
    return "\n".join(lines) + "\n"


def seed_groups_table(groups):
    """The seed groups, the first one the reference: mean +- sd, n, and the differences."""
    first = ", ".join(groups[0]["runs"])
    lines = [
        "Seed groups (runs whose settings differ only in --seed), against the first:",
        "",
        "| runs | precision | n | seeds | test acc (%) mean ± sd | images/s mean ± sd | test acc diff (points) | "
        "95% CI | images/s diff | 95% CI | paired by |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        acc = f"{g['test_acc_mean']:.2f} ± " + ("n/a" if g["test_acc_sd"] is None else f"{g['test_acc_sd']:.2f}")
        speed = (
            "n/a"
            if g["images_per_sec_mean"] is None
            else (
                f"{_number(g['images_per_sec_mean'])} ± "
                + ("n/a" if g["images_per_sec_sd"] is None else _number(g["images_per_sec_sd"]))
            )
        )
        v = g["vs_first"]
        if v is None:
            diffs = ["(reference)", "", "", "", ""]
        else:
            speed_diff = v.get("images_per_sec_diff")
            diffs = [
                f"{v['acc_diff']:+.2f}",
                _interval(v["acc_diff_ci95"]),
                "n/a" if speed_diff is None else "+" * (speed_diff >= 0) + _number(speed_diff),
                _interval(v.get("images_per_sec_diff_ci95"), "{:+.1f}"),
                {"seed": "seed", "none": "unpaired (Welch)", None: "n/a (n < 2)"}[v["pairing"]],
            ]
        seeds = " ".join(str(seed) for seed in g["seeds"])
        lines.append(
            f"| {', '.join(g['runs'])} | {g['precision']} | {g['n']} | {seeds} | {acc} | {speed} | "
            + " | ".join(diffs)
            + " |"
        )
    lines += [
        "",
        f"sd: the sample standard deviation over the group's runs; the intervals: a t-interval of the "
        f"difference from {first}, paired by seed over the seeds both groups ran (two or more), else Welch's.",
    ]
    return "\n".join(lines) + "\n"


def devices_lines(runs):
    """Each device the runs ran on, with its capability; a warning for an AMP run whose dtype
    its device emulates (its speed then says little about AMP)."""
    devices = {}
    for r in runs:
        devices.setdefault((r["device"], r.get("device_capability") or "capability not recorded"), []).append(r["run"])
    lines = [f"- {name}: {capability} ({', '.join(names)})" for (name, capability), names in devices.items()]
    text = ("Device: " + lines[0][2:] if len(lines) == 1 else "Devices:\n" + "\n".join(lines)) + "\n"
    emulated = [r["run"] for r in runs if r.get("amp") and r.get("amp_dtype_native") is False]
    if emulated:
        text += (
            f"\nwarning: {', '.join(emulated)} ran AMP in a dtype its device emulates: slower than FP32 there, "
            "so its speed says nothing about AMP on hardware that has it\n"
        )
    return text


# --------------------------------------------------------------------------- per class
def per_class_accuracy(confusion, class_names):
    """{class: accuracy in percent} from a confusion matrix whose rows are the true classes;
    None for a class without test images."""
    matrix = np.asarray(confusion)
    totals = matrix.sum(axis=1)
    return {name: (100.0 * matrix[i, i] / totals[i] if totals[i] else None) for i, name in enumerate(class_names)}


def per_class_report(confusion, class_names):
    """One line per class: its accuracy and correct/total test images."""
    matrix = np.asarray(confusion)
    width = max(len(name) for name in class_names)
    lines = ["per-class test accuracy:"]
    for i, (name, acc) in enumerate(per_class_accuracy(matrix, class_names).items()):
        value = "   n/a" if acc is None else f"{acc:6.2f}%"
        lines.append(f"  {name:<{width}}  {value} ({matrix[i, i]}/{matrix[i].sum()})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pictures
MAX_EPOCH_TICKS = 10  # up to this many epochs, each gets its tick


def _integer_epochs(ax, epochs):
    """Ticks at whole epochs only. A locator asked for integers still puts fractional ticks around
    a single point, so few epochs get a tick each; for many the locator chooses integer ones."""
    epochs = sorted(set(epochs))
    if len(epochs) <= MAX_EPOCH_TICKS:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_curves(history, path, title):
    """Save curves_figure(history, title) to `path`."""
    atomic_savefig(curves_figure(history, title), path)


def curves_figure(history, title):
    """Train/validation loss and accuracy, the LR and the gradient norm per epoch; for a float16
    run (one with a GradScaler) also the loss scale and the skipped steps. Four panels sit in one
    row; five in two rows of three (the scaler's panels below the curves)."""
    epochs = [e["epoch"] for e in history]
    float16 = any(e.get("loss_scale") is not None for e in history)
    if float16:
        figure = Figure(figsize=(14, 7.6), layout="constrained")
        axes = figure.subplots(2, 3).ravel()
        axes[-1].remove()  # five panels: the last slot stays empty
    else:
        figure = Figure(figsize=(17, 3.8), layout="constrained")
        axes = figure.subplots(1, 4)
    _loss_and_accuracy_panels(axes[0], axes[1], history, epochs)
    _lr_panel(axes[2], history, epochs)
    axes[3].sharex(axes[0])  # the same epochs even when the panel is empty (an old results.json)
    _grad_norm_panel(axes[3], history, epochs)
    if float16:
        _loss_scale_panel(axes[4], history, epochs)
    figure.suptitle(title)
    return figure


def _values(history, key):
    """The per-epoch values of `key`, NaN where missing or None (results.json files written before
    the key existed lack it): matplotlib leaves a gap there instead of failing."""
    return [np.nan if e.get(key) is None else e[key] for e in history]


def _loss_and_accuracy_panels(loss_ax, acc_ax, history, epochs):
    """Train and validation loss, and train and validation accuracy."""
    for ax, key, name, ylabel in (
        (loss_ax, "loss", "loss", "cross-entropy loss"),
        (acc_ax, "acc", "accuracy", "accuracy (%)"),
    ):
        ax.plot(epochs, [e[f"train_{key}"] for e in history], marker="o", markersize=3, label="train")
        ax.plot(epochs, [e[f"val_{key}"] for e in history], marker="o", markersize=3, label="validation")
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        ax.legend()
        _integer_epochs(ax, epochs)


def _lr_panel(ax, history, epochs):
    """The LR each epoch started with."""
    ax.plot(epochs, [e["lr"] for e in history], marker="o", markersize=3, color="tab:green")
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate at the start of the epoch")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.1e}"))
    _integer_epochs(ax, epochs)


LOG_SCALE_SPAN = 100  # a panel whose positive values span more than this factor gets a log y axis


def _grad_norm_panel(ax, history, epochs):
    """The true (unscaled) global gradient norm: mean and max over each epoch's optimizer steps."""
    mean, peak = _values(history, "grad_norm_mean"), _values(history, "grad_norm_max")
    ax.set(xlabel="epoch", ylabel="global gradient norm (unscaled)", title="gradient norm")
    _integer_epochs(ax, epochs)
    if np.all(np.isnan(mean + peak)):  # an old results.json, or no finite norm at all
        ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_yticks([])
        return
    ax.plot(epochs, peak, marker="o", markersize=3, color="tab:red", label="max over the epoch's steps")
    ax.plot(epochs, mean, marker="o", markersize=3, color="tab:purple", label="mean over the epoch's steps")
    positive = [v for v in mean + peak if v > 0]  # NaN compares False
    if positive and max(positive) > LOG_SCALE_SPAN * min(positive):
        ax.set_yscale("log")  # one spike must not flatten the rest of the run
    ax.legend()


def _loss_scale_panel(ax, history, epochs):
    """GradScaler's scale at the end of each epoch (log axis: it halves and doubles) and the steps
    it skipped for inf/NaN gradients in that epoch (bars, on their own axis)."""
    skipped = [e.get("skipped_steps") or 0 for e in history]
    bars_ax = ax.twinx()
    bars = bars_ax.bar(
        epochs, skipped, width=0.5, color="tab:orange", alpha=0.45, label=f"skipped steps ({sum(skipped)} in all)"
    )
    bars_ax.set_ylabel("skipped optimizer steps")
    bars_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    # Both axes leave the top third free for the legend (the bars' axis runs 0..1 when none were skipped).
    bars_ax.set_ylim(0, max(1, max(skipped)) * 1.6)
    ax.set_zorder(bars_ax.get_zorder() + 1)  # the scale's line in front of the bars ...
    ax.patch.set_visible(False)  # ... without hiding them
    scales = _values(history, "loss_scale")
    (line,) = ax.plot(
        epochs, scales, marker="o", markersize=3, color="tab:blue", label="loss scale at the end of the epoch"
    )
    ax.set_yscale("log", base=2)
    positive = [s for s in scales if s > 0]  # a scale halved to float32's 0 has no place on a log axis
    if positive:
        low, high = min(positive), max(positive)
        octaves = max(1.0, np.log2(high / low))
        ax.set_ylim(low / 2 ** (0.1 * octaves), high * 2 ** (0.6 * octaves))
    ax.set(xlabel="epoch", ylabel="loss scale", title="loss scale")
    _integer_epochs(ax, epochs)
    ax.legend(handles=[line, bars], loc="upper left")


def plot_comparison(runs, path, comparison=None):
    """Save comparison_figure(runs, comparison) to `path`."""
    atomic_savefig(comparison_figure(runs, comparison), path)


def comparison_figure(runs, comparison=None):
    """The runs' validation accuracy by epoch and by training time, one line per run; with more
    than one run, below them each run's (and seed group's) test-accuracy difference and speedup
    against the first, with their 95% intervals as error bars."""
    against = len(runs) > 1
    comparison = comparison or compare_runs(runs) if against else None
    bars = len(runs) - 1 + (len(comparison["groups"]) - 1 if against and _has_seed_groups(comparison) else 0)
    bars_height = 1.2 + 0.4 * bars  # inches: the error-bar row grows with its rows
    figure = Figure(figsize=(11, 4 + bars_height if against else 4), layout="constrained")
    axes = figure.subplots(2 if against else 1, 2, squeeze=False, height_ratios=[4, bars_height] if against else None)
    by_epoch, by_time = axes[0]
    by_time.sharey(by_epoch)
    for r in runs:
        label = f"{r['run']} ({r['precision']})"
        epochs = r["epochs"]
        elapsed = np.cumsum([e["seconds"] for e in epochs])
        accuracy = [e["val_acc"] for e in epochs]
        by_epoch.plot([e["epoch"] for e in epochs], accuracy, marker="o", markersize=3, label=label)
        by_time.plot(elapsed, accuracy, marker="o", markersize=3, label=label)
    by_epoch.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy by epoch")
    _integer_epochs(by_epoch, [e["epoch"] for r in runs for e in r["epochs"]])
    by_time.set(xlabel="training time (s)", title="validation accuracy by training time")
    by_time.grid(alpha=0.3)
    by_epoch.legend(loc="lower right")
    if against:
        _error_bar_panels(*axes[1], comparison)
    devices = ", ".join(sorted({r["device"] for r in runs}))
    figure.suptitle(f"{len(runs)} runs on {devices}" if len(runs) > 1 else f"{runs[0]['run']} on {devices}")
    return figure


def _has_seed_groups(comparison):
    return any(group["n"] > 1 for group in comparison["groups"])


def _error_bar_panels(acc_ax, speed_ax, comparison):
    """Test accuracy difference (points) and speedup against the first run, a row per run (and
    per seed group of two or more runs), each with its 95% interval; a hollow point has none."""
    first = comparison["runs"][0]["name"]
    rows = [
        (
            e["name"],
            e["vs_first"]["acc_diff"],
            e["vs_first"]["acc_diff_ci95"],
            e["vs_first"]["speedup"],
            e["vs_first"]["speedup_ci95"],
        )
        for e in comparison["runs"][1:]
    ]
    if _has_seed_groups(comparison):
        # (a group's difference is from the first group, not the first run: its label says so)
        rows += [
            (
                f"group {', '.join(g['runs'])} (n={g['n']}) vs the first group",
                g["vs_first"]["acc_diff"],
                g["vs_first"]["acc_diff_ci95"],
                None,
                None,
            )
            for g in comparison["groups"][1:]
        ]
    labels = [row[0] for row in rows]
    positions = np.arange(len(rows))[::-1]  # the first row on top
    for ax, value_at, interval_at, reference, xlabel in (
        (acc_ax, 1, 2, 0.0, f"test accuracy minus {first}'s (points)"),
        (speed_ax, 3, 4, 1.0, f"speedup over {first} (images/s ratio)"),
    ):
        for y, row in zip(positions, rows):
            value, interval = row[value_at], row[interval_at]
            if value is None:
                continue
            if interval is None:
                ax.plot([value], [y], marker="o", markerfacecolor="white", color="tab:blue")
            else:
                # (max: an interval of no width can land a rounding error beside its value)
                ax.errorbar(
                    [value],
                    [y],
                    xerr=[[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]],
                    fmt="o",
                    capsize=4,
                    color="tab:blue",
                )
        ax.axvline(reference, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(positions, labels)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set(xlabel=xlabel, title=f"{xlabel.split(' (')[0]}, 95% interval")
        ax.grid(alpha=0.3, axis="x")


def plot_confusion(confusion, class_names, path, title):
    """The confusion matrix with class names on both axes: counts in the cells, colour by the
    share of the true class (so classes of different sizes compare)."""
    matrix = np.asarray(confusion)
    n = len(class_names)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(100.0 * matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    side = 2.8 + 0.75 * n
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    figure.colorbar(image, ax=ax, label="share of the true class (%)")
    ax.set_xticks(range(n), class_names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if share[i, j] > 60 else "black")
    atomic_savefig(figure, path)


# --------------------------------------------------------------------------- TensorBoard
def summary_writer_class():
    """torch's SummaryWriter, imported here, not at the top: a run that does not ask for
    TensorBoard needs no tensorboard package. Its absence is a one-line user error."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class TensorBoardLog:
    """Scalars and the run's settings as TensorBoard event files in `log_dir` (tensorboard
    --logdir shows them). purge_step: a resumed run passes the first step it will write again, so
    that events from that step on, left by a session that crashed after writing them, are
    discarded by TensorBoard instead of drawn twice."""

    def __init__(self, log_dir, purge_step=None):
        try:
            self.writer = summary_writer_class()(str(log_dir), purge_step=purge_step)
        except OSError as exc:  # e.g. a file where the folder should be
            raise UserError(f"cannot write TensorBoard events to {log_dir}: {exc.strerror or exc}") from None
        # A refused write (full disk) is kept, and raised at the next flush or close: the run stops
        # there, at a point every rank reaches, instead of at a rank 0-only logging call. (When
        # TensorBoard's writer thread meets it, the thread dies of it: quietly, see below.)
        self.failure = None
        writer_thread = getattr(getattr(self.writer.file_writer.event_writer, "_async_writer", None), "_worker", None)
        if writer_thread is not None:
            writer_thread.quiet_os_error = True
            if threading.excepthook is not _quiet_tensorboard_thread:
                global _threading_excepthook
                _threading_excepthook, threading.excepthook = threading.excepthook, _quiet_tensorboard_thread

    def _guarded(self, write, *args):
        if self.failure is None:
            try:
                write(*args)
            except OSError as exc:  # (raised again by every later call: TensorBoard's writer thread died of it)
                events = getattr(self.writer.file_writer.event_writer, "_file_name", self.writer.log_dir)
                self.failure = write_failure(events, exc)
                if self.failure is None:  # (not a refused write: a bug)
                    raise

    def scalars(self, step, values):
        """{tag: value} at `step`; None values (e.g. no loss scale without a GradScaler) are left out."""
        for tag, value in values.items():
            if value is not None:
                self._guarded(self.writer.add_scalar, tag, value, step)

    def hparams(self, step, hparams, metrics):
        """The run's settings and its final {tag: metric} for TensorBoard's HParams tab. Unlike
        SummaryWriter.add_hparams, which writes them to a new timestamped subfolder (a second run
        in TensorBoard's list), they go into this run's own event file."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        summaries = hparams_summaries({name: _hparam_value(value) for name, value in hparams.items()}, metrics)
        file_writer = self.writer._get_file_writer()  # what add_hparams writes with, in its subfolder
        for summary in summaries:  # the experiment, the session start and the session end
            self._guarded(file_writer.add_summary, summary, step)
        self.scalars(step, metrics)

    def flush(self):
        """Every event so far on disk; a WriteFailed if the disk refused one (then or before)."""
        self._guarded(self.writer.flush)
        if self.failure is not None:
            raise self.failure

    def close(self):
        self._guarded(self.writer.close)
        if self.failure is not None:
            raise self.failure


_threading_excepthook = threading.excepthook


def _quiet_tensorboard_thread(args):
    """threading.excepthook: no traceback for a TensorBoard writer thread that a refused write
    ended (TensorBoardLog says it in one line at its next flush); any other as before."""
    if not (isinstance(args.exc_value, OSError) and getattr(args.thread, "quiet_os_error", False)):
        _threading_excepthook(args)


def _hparam_value(value):
    """A setting as TensorBoard's HParams take it: a number or a string. None and lists (which
    it would drop or refuse) become their text, and so do booleans, which it would show as 0/1."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    return str(value)


def read_tensorboard_scalars(log_dir):
    """{tag: [(step, value), ...]} of the scalars in `log_dir`'s event files, as TensorBoard shows
    them: every event kept (no sampling), and those purged by a resumed run left out."""
    from tensorboard.backend.event_processing.event_accumulator import DEFAULT_SIZE_GUIDANCE, EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={kind: 0 for kind in DEFAULT_SIZE_GUIDANCE})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


# --------------------------------------------------------------------------- predictions
PREDICTION_COLUMNS = ("file", "label", "confidence")


def write_predictions(path, rows):
    """`rows` of (file, label, confidence) as a CSV sorted by file."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for file, label, confidence in sorted(rows):
        writer.writerow((file, label, f"{confidence:.4f}"))
    atomic_write_text(path, text.getvalue())


TEST_PREDICTION_COLUMNS = ("file", "true_label", "predicted_label", "confidence")


def write_test_predictions(path, rows, class_names):
    """test_predictions.csv: `rows` of (file, true class index, predicted class index,
    confidence) with the classes by name, sorted by file (the pairing key of --compare)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(TEST_PREDICTION_COLUMNS)
    for file, true, predicted, confidence in sorted(rows):
        writer.writerow((file, class_names[true], class_names[predicted], f"{confidence:.4f}"))
    atomic_write_text(path, text.getvalue())


def read_test_predictions(path):
    """{file: (true label, predicted label)} of a test_predictions.csv, or None when the run has
    none (older runs) or it cannot be read as one."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != TEST_PREDICTION_COLUMNS:
                return None
            return {row["file"]: (row["true_label"], row["predicted_label"]) for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


# --------------------------------------------------------------------------- inference (--export)
INFERENCE_COLUMNS = (
    "precision",
    "runtime",
    "size (MB)",
    "test acc (%)",
    "agreement (%)",
    "max logit diff",
    "latency p50 (ms)",
    "latency p95 (ms)",
    "images/s (batch 32)",
)


def inference_cells(row):
    """A row of inference.json as the cells of INFERENCE_COLUMNS."""
    tf32 = row["precision"] == "fp32" and row.get("fp32_math") == "tf32"  # (PyTorch's FP32 in TF32)
    return [
        row["precision"] + (" (tf32)" if tf32 else ""),
        row["runtime"],
        f"{row['size_mb']:.1f}",
        f"{row['test_acc']:.2f}",
        f"{row['agreement']:.2f}",
        f"{row['max_abs_logit_diff']:.2g}",
        f"{row['latency_ms_p50']:.2f}",
        f"{row['latency_ms_p95']:.2f}",
        f"{row['images_per_sec']:.0f}",
    ]


def _markdown_table(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def inference_markdown(report):
    """inference.md: what --export measured for one run (inference.json's content), readably."""
    timing = report["timing"]
    lines = [
        f"# Inference: {report['run']} ({report['model']}, {report['input_size']} x {report['input_size']} px, "
        f"epoch {report['epoch']}, {report['weights']} weights, trained {report['run_precision']})",
        "",
        f"- PyTorch rows: {report['device']} ({report['capability']})",
        f"- onnxruntime rows: {report['onnxruntime_device']} ({report['onnxruntime_capability']})",
        f"- threads: {report['threads']} for both runtimes{wait_words(report)}; torch {report['versions']['torch']}, onnxruntime "
        f"{report['versions']['onnxruntime']}; INT8 calibrated on {report['calibration_images']} training images",
        "",
        _markdown_table(INFERENCE_COLUMNS, [inference_cells(row) for row in report["rows"]]),
        "",
        f"Accuracy and agreement are over the {report['test_images']} test images; agreement is the share whose "
        f"top-1 is PyTorch {'FP32 (tf32)' if report.get('fp32_math') == 'tf32' else 'FP32'}'s, and max logit diff "
        "the largest absolute difference from its logits. Size is the ONNX file, or the float32 weights PyTorch holds (autocast casts them per operation). Latency: one image, "
        "from a uint8 array in memory to its logits, p50 and p95 of "
        f"{timing['latency_runs']} runs after {timing['latency_warmup']} warm-up runs; images/s: "
        f"{timing['throughput_batch']} over the median time of {timing['throughput_runs']} batches after "
        f"{timing['throughput_warmup']} warm-up batches; the rows take turns, run by run, so a passing load "
        "falls on all of them. One measurement: on a shared or busy machine the times "
        f"vary from run to run. {load_sentence(report)}",
    ]
    lines += ["", "Not measured:"] + [f"- {s['precision']} on {s['runtime']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def wait_words(report):
    """', idle threads sleeping (OpenMP passive)' or ', ... spinning ...' ('' for an older inference.json)."""
    wait = report.get("openmp_wait")
    if wait is None:
        return ""
    return f", idle threads {'sleeping' if wait == 'passive' else 'spinning first'} (OpenMP {wait})"


def load_sentence(report):
    """What inference.md says about how busy the machine was while --export timed the rows."""
    if "load_before" not in report:  # (an inference.json from before load_before existed)
        report = {"load_after": report["load_average"], "cpus": report["cpus"]}
    busy = busy_note(report)
    if busy:
        return f"{busy[0].upper()}{busy[1:]}: read the times as upper bounds."
    others = f", other programs {report['other_cpus']} cores" if report.get("other_cpus") is not None else ""
    return (
        f"While the rows were timed the machine was quiet enough: 1-minute load average {report.get('load_before')} "
        f"before and {report['load_after']} after on {report['cpus']} cores (this process's threads included){others}."
    )


def load_inference(checkpoint_dir, name):
    """A run's inference.json (written by --export), or None when it has none or it is unreadable."""
    try:
        report = load_json(os.path.join(checkpoint_dir, name, "inference.json"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("rows"), list) else None


def best_pt_identity(run_dir, digest=True):
    """What tells one best.pt from a later one, which inference.json keeps so that an export whose
    best.pt has since changed is seen to be stale: its size and modification time (cheap) and,
    with `digest`, the sha256 of its bytes (what decides where a copy, tar or touch gave the same
    file a new time)."""
    path = os.path.join(run_dir, "best.pt")
    stat = os.stat(path)
    identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if digest:
        sha256 = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha256.update(block)
        identity["sha256"] = sha256.hexdigest()
    return identity


def best_pt_changed(run_dir, recorded):
    """Whether best.pt is not the one `recorded` (inference.json's best_pt) describes: the same
    size and time say it is; else its sha256 decides (an export recorded without one, from
    before sha256 was kept: the size and time alone, as then)."""
    identity = best_pt_identity(run_dir, digest=False)
    if all(recorded.get(key) == value for key, value in identity.items()):
        return False
    if "sha256" not in recorded:
        return True
    return best_pt_identity(run_dir)["sha256"] != recorded["sha256"]


def stale_export(checkpoint_dir, name, report):
    """Why run `name`'s export (its inference.json `report`) no longer shows its best.pt, in words
    ('' when it still does): best.pt changed after the export (a --resume or --overwrite trained
    on), or is gone. A copied run folder (cp -r, tar) or a touched best.pt is not a change."""
    run_dir = os.path.join(checkpoint_dir, name)
    again = "export again: " + run_command(name, checkpoint_dir, "--export")
    exported = f"{name}'s model.onnx holds epoch {report.get('epoch', '?')}'s weights"
    try:
        best_time = os.stat(os.path.join(run_dir, "best.pt")).st_mtime_ns
    except OSError:
        return f"{exported}, but {name} has no best.pt now"
    recorded = report.get("best_pt")
    if recorded is None:  # (an export from before best_pt was recorded: the files' times tell)
        changed = best_time > os.stat(os.path.join(run_dir, "inference.json")).st_mtime_ns
    else:
        changed = best_pt_changed(run_dir, recorded)
    if changed:
        now = read_results(run_dir).get("best_epoch")
        now = f" (now epoch {now}'s)" if now is not None else ""
        return f"{exported}, but its best.pt has changed since{now}: {again}"
    return ""


def inference_section(checkpoint_dir, names):
    """--compare's inference table: the rows of each compared run's inference.json, a stale
    export's marked and said why; '' when none of them was exported."""
    reports = {name: load_inference(checkpoint_dir, name) for name in names}
    if not any(reports.values()):
        return ""
    stale = {name: stale_export(checkpoint_dir, name, report) for name, report in reports.items() if report}
    rows = [
        [name + (" (stale)" if stale[name] else ""), *inference_cells(row), row.get("device", UNKNOWN)]
        for name, report in reports.items()
        if report
        for row in report["rows"]
    ]
    text = "\nInference (each run's inference.json, written by --export; times from each run's own machine):\n\n"
    text += _markdown_table(("run", *INFERENCE_COLUMNS, "device"), rows) + "\n"
    for reason in filter(None, stale.values()):
        text += f"\nstale: {reason}; its rows are not of the model in the table above\n"
    missing = [name for name, report in reports.items() if not report]
    if missing:
        command = run_command(missing[0] if len(missing) == 1 else "NAME", checkpoint_dir, "--export")
        text += f"\nnot exported: {', '.join(missing)} ({command})\n"
    return text
