"""What a float16 run's GradScaler did, as the user sees it: the gradient-norm and loss-scale
panels of curves.png, the skipped-steps column of --compare, and the TensorBoard event files."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from report import TensorBoardLog, comparison_table, curves_figure, plot_curves, read_tensorboard_scalars
from utils import UserError

CURVE_TITLES = ["loss", "accuracy", "learning rate at the start of the epoch"]
TELEMETRY_KEYS = ("loss_scale", "skipped_steps", "grad_norm_mean", "grad_norm_max")


def history(loss_scales, skipped_steps, grad_norms):
    """An epochs list as results.json holds it, one epoch per loss scale; grad_norms: (mean, max)."""
    return [
        {
            "epoch": i,
            "train_loss": 1.8 / i,
            "val_loss": 1.9 / i,
            "train_acc": 40.0 + 10 * i,
            "val_acc": 38.0 + 9 * i,
            "lr": 1e-3 * (1 - (i - 1) / 5),
            "seconds": 3.0,
            "images_per_sec": 100.0,
            "peak_mem_mb": None,
            "loss_scale": scale,
            "skipped_steps": skipped,
            "grad_norm_mean": mean,
            "grad_norm_max": peak,
        }
        for i, (scale, skipped, (mean, peak)) in enumerate(zip(loss_scales, skipped_steps, grad_norms), 1)
    ]


NORMS = [(2.1, 9.5), (1.4, 5.2), (0.9, 3.1), (0.7, 2.0), (0.6, 1.6)]
# Two steps skipped in epoch 1 and one in epoch 2 halve the scale; then it grows again.
FP16 = history([32768.0, 16384.0, 32768.0, 65536.0, 131072.0], [2, 1, 0, 0, 0], NORMS)
BF16 = history([None] * 5, [0] * 5, NORMS)  # no GradScaler
OLD = [{k: v for k, v in e.items() if k not in TELEMETRY_KEYS} for e in BF16]  # results.json before these keys


def panels(figure):
    """{title: axes} of the figure's panels (the skipped steps' twin axis has no title)."""
    return {ax.get_title(): ax for ax in figure.axes if ax.get_title()}


def grid_shape(figure):
    """(rows, columns) of the figure's panel grid."""
    return next(iter(panels(figure).values())).get_subplotspec().get_geometry()[:2]


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 900 and image.height >= 250
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20


# --------------------------------------------------------------------------- curves.png
def test_float16_curves_show_gradient_norm_loss_scale_and_skipped_steps(tmp_path):
    figure = curves_figure(FP16, "fp16 run")
    by_title = panels(figure)
    assert list(by_title) == CURVE_TITLES + ["gradient norm", "loss scale"]
    assert grid_shape(figure) == (2, 3)  # five panels in two rows, the sixth slot left empty

    scale_ax = by_title["loss scale"]
    (line,) = scale_ax.get_lines()
    assert list(line.get_ydata()) == [32768.0, 16384.0, 32768.0, 65536.0, 131072.0]
    assert scale_ax.get_yscale() == "log"
    (bars_ax,) = [ax for ax in figure.axes if ax is not scale_ax and ax.get_shared_x_axes().joined(ax, scale_ax)]
    assert [bar.get_height() for bar in bars_ax.patches] == [2, 1, 0, 0, 0]
    assert bars_ax.get_ylabel() == "skipped optimizer steps"
    assert all(tick == round(tick) for tick in bars_ax.get_yticks())
    legend = [text.get_text() for text in scale_ax.get_legend().get_texts()]
    assert legend == ["loss scale at the end of the epoch", "skipped steps (3 in all)"]

    norm_ax = by_title["gradient norm"]
    assert [list(line.get_ydata()) for line in norm_ax.get_lines()] == [[p for _, p in NORMS], [m for m, _ in NORMS]]
    assert norm_ax.get_yscale() == "linear"  # 0.6 .. 9.5: not worth a log axis
    plot_curves(FP16, tmp_path / "curves.png", "fp16 run")
    assert_png(tmp_path / "curves.png")


@pytest.mark.parametrize("name", ["bf16", "old"])
def test_runs_without_a_scaler_or_telemetry_have_no_loss_scale_panel(tmp_path, name):
    run = {"bf16": BF16, "old": OLD}[name]
    figure = curves_figure(run, name)
    assert list(panels(figure)) == CURVE_TITLES + ["gradient norm"]
    assert grid_shape(figure) == (1, 4)
    assert len(figure.axes) == 4  # no twin axis either
    norm_ax = panels(figure)["gradient norm"]
    texts = [text.get_text() for text in norm_ax.texts]
    if name == "old":  # results.json written before the gradient norm was recorded
        assert texts == ["not recorded"] and norm_ax.get_lines() == []
        assert norm_ax.get_xlim() == panels(figure)["loss"].get_xlim()  # still by the run's epochs
    else:
        assert texts == [] and len(norm_ax.get_lines()) == 2
    plot_curves(run, tmp_path / "curves.png", name)
    assert_png(tmp_path / "curves.png")


def test_gradient_norm_spanning_decades_gets_a_log_axis_and_gaps_for_missing_epochs():
    # A spike in epoch 1, no finite norm in epoch 4 (every step overflowed), tiny norms at the end.
    run = history([65536.0] * 5, [0, 0, 0, 40, 0], [(2.0, 950.0), (1.4, 5.2), (0.9, 3.1), (None, None), (0.01, 0.02)])
    norm_ax = panels(curves_figure(run, "spiky"))["gradient norm"]
    assert norm_ax.get_yscale() == "log"
    peak = norm_ax.get_lines()[0].get_ydata()
    assert np.isnan(peak[3]) and list(peak[[0, 1, 2, 4]]) == [950.0, 5.2, 3.1, 0.02]


def test_a_run_resumed_across_the_upgrade_draws_its_old_and_new_epochs():
    # Epochs 1-2 written by the template before the telemetry keys, 3-5 after (float16 throughout).
    run = OLD[:2] + FP16[2:]
    by_title = panels(curves_figure(run, "resumed"))
    assert "loss scale" in by_title
    scales = by_title["loss scale"].get_lines()[0].get_ydata()
    assert np.isnan(scales[:2]).all() and list(scales[2:]) == [32768.0, 65536.0, 131072.0]


def test_a_single_epoch_draws_every_panel_with_one_whole_epoch_tick():
    figure = curves_figure(FP16[:1], "one epoch")
    assert list(panels(figure)) == CURVE_TITLES + ["gradient norm", "loss scale"]
    for ax in figure.axes:
        assert list(ax.get_xticks()) == [1], ax.get_title()


# --------------------------------------------------------------------------- --compare
# The columns before this issue, which scripts read by name and position.
EARLIER_COLUMNS = [
    "run",
    "device",
    "precision",
    "test acc (%)",
    "peak GPU memory",
    "s/epoch",
    "epochs",
    "total time",
    "images/s",
    "speedup",
    "memory saving",
    "model",
    "image size",
    "batch size",
    "dataset",
]


def finished_run(name, precision, **results):
    """A results.json as --compare loads it, with three epochs and no config.json."""
    epochs = [
        {"epoch": i, "seconds": 10.0, "images_per_sec": 500.0, "peak_mem_mb": 2048.0, "val_acc": 80.0 + i}
        for i in range(1, 4)
    ]
    return {
        "run": name,
        "device": "NVIDIA H100 80GB HBM3",
        "precision": precision,
        "test_acc": 91.0,
        "total_train_seconds": 31.0,
        "epochs": epochs,
        "config": None,
        **results,
    }


def test_compare_counts_the_skipped_steps_in_a_last_column():
    runs = [
        finished_run("fp32", "FP32", skipped_steps=0),
        finished_run("fp16", "AMP fp16", skipped_steps=37),
        finished_run("old", "AMP fp16"),
    ]  # a results.json without the count
    header, *rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in comparison_table(runs).splitlines()
        if not line.startswith("|---")
    ]
    assert header == EARLIER_COLUMNS + ["skipped steps"]  # appended: the others keep their positions
    assert [row[-1] for row in rows] == ["0", "37", "n/a"]
    header, row = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in comparison_table(runs[1:2]).splitlines()
        if not line.startswith("|---")
    ]
    assert header[-1] == "skipped steps" and row[-1] == "37"  # the summary row at the end of training too


# --------------------------------------------------------------------------- TensorBoard
# A session that wrote steps 1-6 of a run (flushing at 4 and 6) and then died without closing its
# writer, as a killed or crashed process does.
CRASHED_SESSION = """
import os, sys
sys.path.insert(0, {root!r})
from report import TensorBoardLog
log = TensorBoardLog({log_dir!r})
for step in range(1, 7):
    log.scalars(step, {{"step/loss": 1.0 * step, "step/loss_scale": 1024.0 * step, "step/grad_norm": None}})
    if step in (4, 6):
        log.flush()
os._exit(1)
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crash_after_six_steps(log_dir):
    code = CRASHED_SESSION.format(root=ROOT, log_dir=str(log_dir))
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 1
    # TensorBoard reads a folder's event files in name order, and the names begin with the second
    # they were created in: the resumed session's file must be a later one, as it always is in use.
    time.sleep(1.1)


def test_a_resumed_run_shows_each_step_once_with_the_values_written_last(tmp_path):
    crash_after_six_steps(tmp_path)
    assert read_tensorboard_scalars(tmp_path)["step/loss"] == [(step, float(step)) for step in range(1, 7)]
    # The resumed session goes on from its checkpoint at step 4: steps 5 and 6 are written again.
    log = TensorBoardLog(tmp_path, purge_step=5)
    for step in range(5, 9):
        log.scalars(step, {"step/loss": 10.0 * step, "step/loss_scale": 2048.0 * step, "step/grad_norm": 0.5})
    log.close()
    scalars = read_tensorboard_scalars(tmp_path)
    assert sorted(scalars) == ["step/grad_norm", "step/loss", "step/loss_scale"]
    assert scalars["step/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0), (8, 80.0)]
    assert [step for step, _ in scalars["step/loss_scale"]] == list(range(1, 9))
    assert scalars["step/loss_scale"][4:6] == [(5, 10240.0), (6, 12288.0)]  # the second session's
    assert scalars["step/grad_norm"] == [(step, 0.5) for step in range(5, 9)]  # None was never written


def test_purge_step_discards_the_crashed_sessions_later_steps_even_when_not_written_again(tmp_path):
    # E.g. a step tag logged every few steps: the resumed session's first one comes after them.
    crash_after_six_steps(tmp_path)
    log = TensorBoardLog(tmp_path, purge_step=5)
    log.scalars(7, {"step/loss": 70.0})
    log.close()
    assert read_tensorboard_scalars(tmp_path)["step/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (7, 70.0)]


def test_scalars_keep_the_callers_tags_and_leave_out_none(tmp_path):
    log = TensorBoardLog(tmp_path)
    log.scalars(1, {"epoch/train_loss": 0.75, "epoch/peak_mem_mb": None, "epoch/seconds": 3.5})
    log.scalars(2, {"epoch/train_loss": 0.5, "epoch/peak_mem_mb": None, "epoch/seconds": 3.25})
    log.flush()  # readable before close: TensorBoard shows a run while it trains
    # Values a float32 holds exactly: TensorBoard stores scalars as float32.
    assert read_tensorboard_scalars(tmp_path) == {
        "epoch/train_loss": [(1, 0.75), (2, 0.5)],
        "epoch/seconds": [(1, 3.5), (2, 3.25)],
    }
    log.close()


def hparams_in(log_dir):
    """The HParams plugin's summaries in log_dir's own event files: {tag: HParamsPluginData}."""
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in accumulator.PluginTagToContent("hparams").items()
    }


def test_hparams_go_into_the_runs_own_folder(tmp_path):
    log = TensorBoardLog(tmp_path)
    log.scalars(8, {"step/loss": 0.25})
    settings = {
        "learning_rate": 1e-3,
        "batch_size": 32,
        "amp": True,
        "amp_dtype": "float16",
        "clip_grad_norm": None,
        "compare": ["a", "b"],
    }
    log.hparams(8, settings, {"test/acc": 91.5, "best_val_acc": 90.25})
    log.close()
    assert [path.is_file() for path in tmp_path.iterdir()] == [True]  # one event file, no subfolder (run)
    assert read_tensorboard_scalars(tmp_path) == {
        "step/loss": [(8, 0.25)],
        "test/acc": [(8, 91.5)],
        "best_val_acc": [(8, 90.25)],
    }
    summaries = hparams_in(tmp_path)
    assert sorted(summaries) == ["_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"]
    metrics = [info.name.tag for info in summaries["_hparams_/experiment"].experiment.metric_infos]
    assert metrics == ["test/acc", "best_val_acc"]
    values = summaries["_hparams_/session_start_info"].session_start_info.hparams
    shown = {name: getattr(value, value.WhichOneof("kind")) for name, value in values.items()}
    assert shown == {
        "learning_rate": 1e-3,
        "batch_size": 32,
        "amp": "True",
        "amp_dtype": "float16",
        "clip_grad_norm": "None",
        "compare": "['a', 'b']",
    }


def test_the_report_module_does_not_import_tensorboard():
    # Only a run that asks for TensorBoard pays for importing it (and needs it installed).
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); import report; "
        "print(sorted(name for name in sys.modules if 'tensorboard' in name))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tensorboard_missing_is_one_line_on_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        TensorBoardLog(tmp_path)
    assert list(tmp_path.iterdir()) == []
