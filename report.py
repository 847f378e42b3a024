"""Reporting: turn runs' results into the comparison table, the learning-curve (with the gradient
norm and float16's loss scale), comparison and confusion-matrix pictures, per-class accuracies
and the predictions CSV; write and read a run's TensorBoard event files."""
import csv
import io
import os

import numpy as np
# Figure (not pyplot) draws with the Agg canvas: no display needed and no global figure state,
# so a picture redrawn every epoch of a long run leaks nothing.
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from utils import UserError, atomic_savefig, atomic_write_text, load_json

TABLE_COLUMNS = ("run", "device", "precision", "test acc (%)", "peak GPU memory", "s/epoch", "epochs", "total time",
                 "images/s")
RELATIVE_COLUMNS = ("speedup", "memory saving")
# After the others, so scripts that read the table by position still find them where they were.
SETTING_COLUMNS = ("model", "image size", "batch size", "dataset")
SCALER_COLUMNS = ("skipped steps",)  # GradScaler's skipped optimizer steps; last, for the same reason
UNKNOWN = "?"  # a setting of a run without a readable config.json
DEFAULT_MODEL = "resnet18"  # the only model before --model; configs written then have no "model"
# Settings runs may differ in without a warning: the precision being compared (amp, amp_dtype), where
# and how a run is saved, logged or resumed, and other modes' flags. num_workers and cache change
# images/s only where loading is the bottleneck. The config's device ("cuda") gives way to the
# device's name in results.json.
NOT_COMPARED = {
    "amp", "amp_dtype", "precision", "checkpoint_name", "checkpoint_dir", "num_workers", "progress", "log_interval",
    "save_every_steps", "resume", "evaluate", "predict", "predict_dir", "compare", "overwrite", "dist_timeout",
    "cache", "benchmark", "benchmark_steps", "data", "demo", "tensorboard", "predictions_file",
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
    return results


def load_run_config(path):
    """A run's config.json as a dict, or None if it is missing or unreadable (old runs may lack
    it): the comparison then shows the run's settings as unknown instead of failing."""
    try:
        config = load_json(path)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


# A run's peak GPU memory two ways (see metrics.PeakMemory): over every training epoch, or in steady
# state, over the epochs after each session's first (no cuDNN autotuning in them).
OVERALL_PEAK, STEADY_PEAK = "peak_mem_mb", "steady_peak_mem_mb"


def peak_memory(run, key=OVERALL_PEAK):
    """The largest `key` peak GPU memory (MiB) of a run's epochs; None on the CPU (or for a
    steady-state peak, when no epoch has one)."""
    peaks = [e[key] for e in run["epochs"] if e.get(key) is not None]
    return max(peaks) if peaks else None


def memory_key(runs):
    """The peak the table compares: the steady-state one when every run has it (CUDA runs with
    an epoch after their session's first), else the overall one for all, so they compare alike."""
    return STEADY_PEAK if all(peak_memory(r, STEADY_PEAK) is not None for r in runs) else OVERALL_PEAK


def memory_note(runs):
    """The line that says which peak GPU memory the table shows ("" on the CPU)."""
    if all(peak_memory(r) is None for r in runs):
        return ""
    if memory_key(runs) == STEADY_PEAK:
        return ("Peak GPU memory: the steady-state training peak (epochs after each session's first; "
                "results.json's steady_peak_mem_mb).")
    return ("Peak GPU memory: the overall training peak (results.json's peak_mem_mb), cuDNN's autotuning in each "
            "session's first epoch included: not every run has a steady-state peak (steady_peak_mem_mb).")


def throughput(run):
    """Training images per second over all epochs (each epoch weighted by its duration)."""
    seconds = sum(e["seconds"] for e in run["epochs"])
    images = sum(e["images_per_sec"] * e["seconds"] for e in run["epochs"] if e["images_per_sec"] is not None)
    return images / seconds if seconds > 0 else None


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
            f"{sum(e['seconds'] for e in epochs) / max(len(epochs), 1):.1f}",
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
    return [str(config.get("model", DEFAULT_MODEL)), f"{config.get('image_size', UNKNOWN)}{crop}",
            str(config.get("batch_size", UNKNOWN)), dataset_name(config.get("data_dir"))]


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


def comparison_report(runs):
    """What --compare prints and saves to compare.md: the table, what speedup and memory saving
    are relative to, and a warning when the runs differ in more than their precision."""
    text = comparison_table(runs) + "\n"
    if len(runs) > 1:
        text += f"\nSpeedup (images/s) and memory saving (peak GPU memory) are relative to {runs[0]['run']}.\n"
    if memory_note(runs):
        text += f"\n{memory_note(runs)}\n"
    differences = setting_differences(runs)
    if differences:
        text += ("\nwarning: these runs differ in more than precision; speedup and accuracy differences are not "
                 "AMP's alone:\n" + "".join(f"- {difference}\n" for difference in differences))
    unknown = [r["run"] for r in runs if r.get("config") is None]
    if unknown and len(runs) > 1:
        text += (f"\nnote: no readable config.json for {', '.join(unknown)}; settings shown as {UNKNOWN} are "
                 "unknown and were not compared\n")
    return text


# --------------------------------------------------------------------------- per class
def per_class_accuracy(confusion, class_names):
    """{class: accuracy in percent} from a confusion matrix whose rows are the true classes;
    None for a class without test images."""
    matrix = np.asarray(confusion)
    totals = matrix.sum(axis=1)
    return {
        name: (100.0 * matrix[i, i] / totals[i] if totals[i] else None) for i, name in enumerate(class_names)
    }


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
    for ax, key, name, ylabel in ((loss_ax, "loss", "loss", "cross-entropy loss"),
                                  (acc_ax, "acc", "accuracy", "accuracy (%)")):
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
    bars = bars_ax.bar(epochs, skipped, width=0.5, color="tab:orange", alpha=0.45,
                       label=f"skipped steps ({sum(skipped)} in all)")
    bars_ax.set_ylabel("skipped optimizer steps")
    bars_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    # Both axes leave the top third free for the legend (the bars' axis runs 0..1 when none were skipped).
    bars_ax.set_ylim(0, max(1, max(skipped)) * 1.6)
    ax.set_zorder(bars_ax.get_zorder() + 1)  # the scale's line in front of the bars ...
    ax.patch.set_visible(False)  # ... without hiding them
    scales = _values(history, "loss_scale")
    (line,) = ax.plot(epochs, scales, marker="o", markersize=3, color="tab:blue",
                      label="loss scale at the end of the epoch")
    ax.set_yscale("log", base=2)
    positive = [s for s in scales if s > 0]  # a scale halved to float32's 0 has no place on a log axis
    if positive:
        low, high = min(positive), max(positive)
        octaves = max(1.0, np.log2(high / low))
        ax.set_ylim(low / 2 ** (0.1 * octaves), high * 2 ** (0.6 * octaves))
    ax.set(xlabel="epoch", ylabel="loss scale", title="loss scale")
    _integer_epochs(ax, epochs)
    ax.legend(handles=[line, bars], loc="upper left")


def plot_comparison(runs, path):
    """Save comparison_figure(runs) to `path`."""
    atomic_savefig(comparison_figure(runs), path)


def comparison_figure(runs):
    """The runs' validation accuracy by epoch and by training time, one line per run."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    by_epoch, by_time = figure.subplots(1, 2, sharey=True)
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
    devices = ", ".join(sorted({r["device"] for r in runs}))
    figure.suptitle(f"{len(runs)} runs on {devices}" if len(runs) > 1 else f"{runs[0]['run']} on {devices}")
    return figure


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
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if share[i, j] > 60 else "black")
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

    def scalars(self, step, values):
        """{tag: value} at `step`; None values (e.g. no loss scale without a GradScaler) are left out."""
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def hparams(self, step, hparams, metrics):
        """The run's settings and its final {tag: metric} for TensorBoard's HParams tab. Unlike
        SummaryWriter.add_hparams, which writes them to a new timestamped subfolder (a second run
        in TensorBoard's list), they go into this run's own event file."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries
        summaries = hparams_summaries({name: _hparam_value(value) for name, value in hparams.items()}, metrics)
        file_writer = self.writer._get_file_writer()  # what add_hparams writes with, in its subfolder
        for summary in summaries:  # the experiment, the session start and the session end
            file_writer.add_summary(summary, step)
        self.scalars(step, metrics)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


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
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


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
