"""What a float16 run's GradScaler did, as the user sees it: the gradient-norm and loss-scale
panels of curves.png, the skipped-steps column of --compare, and the TensorBoard event files."""
import numpy as np
import pytest
from PIL import Image

from report import comparison_table, curves_figure, plot_curves

CURVE_TITLES = ["loss", "accuracy", "learning rate at the start of the epoch"]
TELEMETRY_KEYS = ("loss_scale", "skipped_steps", "grad_norm_mean", "grad_norm_max")


def history(loss_scales, skipped_steps, grad_norms):
    """An epochs list as results.json holds it, one epoch per loss scale; grad_norms: (mean, max)."""
    return [{"epoch": i, "train_loss": 1.8 / i, "val_loss": 1.9 / i, "train_acc": 40.0 + 10 * i,
             "val_acc": 38.0 + 9 * i, "lr": 1e-3 * (1 - (i - 1) / 5), "seconds": 3.0, "images_per_sec": 100.0,
             "peak_mem_mb": None, "loss_scale": scale, "skipped_steps": skipped, "grad_norm_mean": mean,
             "grad_norm_max": peak}
            for i, (scale, skipped, (mean, peak)) in enumerate(zip(loss_scales, skipped_steps, grad_norms), 1)]


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
EARLIER_COLUMNS = ["run", "device", "precision", "test acc (%)", "peak GPU memory", "s/epoch", "epochs", "total time",
                   "images/s", "speedup", "memory saving", "model", "image size", "batch size", "dataset"]


def finished_run(name, precision, **results):
    """A results.json as --compare loads it, with three epochs and no config.json."""
    epochs = [{"epoch": i, "seconds": 10.0, "images_per_sec": 500.0, "peak_mem_mb": 2048.0, "val_acc": 80.0 + i}
              for i in range(1, 4)]
    return {"run": name, "device": "NVIDIA H100 80GB HBM3", "precision": precision, "test_acc": 91.0,
            "total_train_seconds": 31.0, "epochs": epochs, "config": None, **results}


def test_compare_counts_the_skipped_steps_in_a_last_column():
    runs = [finished_run("fp32", "FP32", skipped_steps=0), finished_run("fp16", "AMP fp16", skipped_steps=37),
            finished_run("old", "AMP fp16")]  # a results.json without the count
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")]
                     for line in comparison_table(runs).splitlines() if not line.startswith("|---")]
    assert header == EARLIER_COLUMNS + ["skipped steps"]  # appended: the others keep their positions
    assert [row[-1] for row in rows] == ["0", "37", "n/a"]
    header, row = [[cell.strip() for cell in line.strip("|").split("|")]
                   for line in comparison_table(runs[1:2]).splitlines() if not line.startswith("|---")]
    assert header[-1] == "skipped steps" and row[-1] == "37"  # the summary row at the end of training too
