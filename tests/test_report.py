"""The reports, from two tiny runs (FP32 and AMP bf16) trained once for this module: --compare's
table and chart, the learning curves, per-class results and confusion matrix, --predict's CSV."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from conftest import FAST, SMALL_MODEL, assert_user_error, read_results
from PIL import Image

import main as main_module
import outputs
import report
from report import (
    comparison_figure,
    comparison_report,
    comparison_table,
    curves_figure,
    load_finished_run,
    memory_note,
    setting_differences,
)

RUNS = ("fp32", "amp")
CLASSES = ["blue", "green", "red"]
TEST_PER_CLASS = 8  # make_colour_dataset's test split
TRAIN_IMAGES = 48  # 3 classes x 20, less the 20% validation split
EPOCHS = 2
COLUMNS = [
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
    "skipped steps",
]
SETTING_COLUMNS = COLUMNS[-5:-1]
CURVES_DRAWN = []  # (run, epochs shown) each time a curves.png was drawn while runs_dir trained


@pytest.fixture(scope="module")
def runs_dir(demo_data, tmp_path_factory):
    """A checkpoint folder holding the finished runs `fp32` and `amp`."""
    root = tmp_path_factory.mktemp("runs")
    real_plot_curves = outputs.plot_curves

    def spy(history, path, title):
        CURVES_DRAWN.append((os.path.basename(os.path.dirname(path)), len(history)))
        real_plot_curves(history, path, title)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(outputs, "plot_curves", spy)
        for name, extra in (("fp32", []), ("amp", ["--amp"])):
            argv = [
                "--checkpoint_dir",
                str(root),
                "--data_dir",
                demo_data,
                "--checkpoint_name",
                name,
                "--epochs",
                str(EPOCHS),
                *FAST,
                *SMALL_MODEL,
                *extra,
            ]
            assert main_module.main(argv) == 0
    return root


def table(markdown):
    """(header, rows) of the first markdown table in `markdown`, as lists of cell strings."""
    lines = markdown.split("\n\n")[0].splitlines()  # (the other tables follow, after a blank line)
    header, _rule, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return header, rows


def assert_png(path, min_width, min_height):
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min_width <= image.width <= 3000 and min_height <= image.height <= 3000, image.size
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{path} is nearly blank"


# --------------------------------------------------------------------------- --compare
def test_compare_table_rows_and_columns_match_the_runs_results(runs_dir, demo_data, run_cli):
    code, out, err = run_cli("--compare", *RUNS, checkpoint_dir=runs_dir)
    assert code == 0, err
    markdown = (runs_dir / "compare_fp32_vs_amp.md").read_text()  # named from the runs
    assert markdown.split("\n\n")[0] in out  # the saved table is the printed one
    header, rows = table(markdown)
    assert header == COLUMNS
    assert [row[0] for row in rows] == list(RUNS)  # one row per run, in the order named
    seconds = {}
    for row in rows:
        cell = dict(zip(header, row))
        results = read_results(runs_dir / cell["run"])
        seconds[cell["run"]] = results["epochs"][1]["seconds"]  # the steady epochs: the first is left out
        assert cell["device"] == results["device"]
        assert cell["precision"] == results["precision"] == {"fp32": "FP32", "amp": "AMP bf16"}[cell["run"]]
        assert float(cell["test acc (%)"]) == pytest.approx(results["test_acc"], abs=0.005)
        assert cell["peak GPU memory"] == "n/a (CPU)"
        assert float(cell["s/epoch"]) == pytest.approx(seconds[cell["run"]], abs=0.05)
        assert int(cell["epochs"]) == EPOCHS
        assert cell["total time"] == f"{results['total_train_seconds']:.0f} s"
        assert float(cell["images/s"]) == pytest.approx(TRAIN_IMAGES / seconds[cell["run"]], abs=0.5)
        assert cell["memory saving"] == "n/a"  # no GPU memory to compare on the CPU
        assert [cell[c] for c in SETTING_COLUMNS] == ["shufflenet_v2_x0_5", "32", "16", os.path.basename(demo_data)]
        assert cell["skipped steps"] == str(results["skipped_steps"]) == "0"  # bf16 and FP32: no GradScaler
    assert rows[0][COLUMNS.index("speedup")] == "1.00x"
    speedup = float(rows[1][COLUMNS.index("speedup")].rstrip("x"))
    assert speedup == pytest.approx(seconds["fp32"] / seconds["amp"], abs=0.006)
    assert_png(runs_dir / "compare_fp32_vs_amp.png", 600, 250)
    # Against fp32, image by image: both runs' test_predictions.csv pair up over the 24 test images.
    vs_first = json.loads((runs_dir / "compare_fp32_vs_amp.json").read_text())["runs"][1]["vs_first"]
    assert vs_first["images"] == 24 and vs_first["verdict"] in ("same within noise", "better", "worse")
    assert vs_first["acc_diff"] == pytest.approx(
        read_results(runs_dir / "amp")["test_acc"] - read_results(runs_dir / "fp32")["test_acc"]
    )
    assert f"| amp | {vs_first['acc_diff']:+.2f} | {vs_first['acc_diff_ci95'][0]:+.2f} to" in out


@pytest.mark.parametrize("name", RUNS)
def test_each_run_keeps_its_test_predictions(runs_dir, demo_data, name):
    with open(runs_dir / name / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_dir = os.path.join(demo_data, "seg_test", "seg_test")
    assert [r["file"] for r in rows] == sorted(
        f"{c}/{f}" for c in CLASSES for f in os.listdir(os.path.join(test_dir, c))
    )
    assert all(r["true_label"] == r["file"].split("/")[0] and r["predicted_label"] in CLASSES for r in rows)
    assert all(1 / len(CLASSES) <= float(r["confidence"]) <= 1 for r in rows)
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)  # the results' confusion matrix, image by image
    for r in rows:
        matrix[CLASSES.index(r["true_label"]), CLASSES.index(r["predicted_label"])] += 1
    assert matrix.tolist() == read_results(runs_dir / name)["confusion_matrix"]


def gpu_run(name, precision, peak_mb, seconds, images_per_sec):
    """A results.json as a CUDA run writes it, with three epochs."""
    epochs = [
        {
            "epoch": i + 1,
            "seconds": seconds,
            "images_per_sec": images_per_sec,
            "peak_mem_mb": peak_mb - 100 * i,
            "val_acc": 80.0 + i,
        }
        for i in range(3)
    ]
    return {
        "run": name,
        "device": "NVIDIA H100 80GB HBM3",
        "precision": precision,
        "test_acc": 91.234,
        "total_train_seconds": 3 * seconds + 1.6,
        "epochs": epochs,
    }


def test_speedup_and_memory_saving_are_relative_to_the_first_run():
    runs = [gpu_run("base", "FP32", 4096, 30.0, 400.0), gpu_run("half", "AMP fp16", 2048, 12.0, 1000.0)]
    header, rows = table(comparison_table(runs))
    base, half = (dict(zip(header, row)) for row in rows)
    assert (base["peak GPU memory"], half["peak GPU memory"]) == ("4.00 GiB", "2.00 GiB")  # the epochs' maximum
    assert (base["speedup"], base["memory saving"]) == ("1.00x", "0%")
    assert (half["speedup"], half["memory saving"]) == ("2.50x", "50%")
    assert (half["s/epoch"], half["epochs"], half["total time"], half["images/s"]) == ("12.0", "3", "38 s", "1000")
    # Steady epochs: a slow first epoch (start-up, autotuning) counts in the total time only.
    runs[1]["epochs"][0].update(seconds=60.0, images_per_sec=200.0)
    _, rows = table(comparison_table(runs))
    assert dict(zip(header, rows[1]))["images/s"] == "1000" and dict(zip(header, rows[1]))["speedup"] == "2.50x"
    assert half["test acc (%)"] == "91.23"
    # One run alone (the summary at the end of training) has nothing to be relative to.
    header, rows = table(comparison_table(runs[:1]))
    assert header == COLUMNS[:-7] + SETTING_COLUMNS + ["skipped steps"] and len(rows) == 1


def test_compare_uses_the_steady_state_peak_memory_when_every_run_has_it():
    # Each session's first epoch also holds cuDNN's autotuning: 4096 MB against 3000 steady.
    runs = [gpu_run("base", "FP32", 4096, 30.0, 400.0), gpu_run("half", "AMP fp16", 2048, 12.0, 1000.0)]
    for run, steady in zip(runs, (3072, 1024)):
        for e in run["epochs"]:
            e["steady_peak_mem_mb"] = None if e["epoch"] == 1 else steady
    header, rows = table(comparison_table(runs))
    base, half = (dict(zip(header, row)) for row in rows)
    assert (base["peak GPU memory"], half["peak GPU memory"], half["memory saving"]) == ("3.00 GiB", "1.00 GiB", "67%")
    assert "the steady-state training peak" in memory_note(runs) and memory_note(runs) in comparison_report(runs)
    # A run without one (one epoch, or a results.json from before the key): all compare their overall peaks.
    for e in runs[1]["epochs"]:
        e.pop("steady_peak_mem_mb")
    header, rows = table(comparison_table(runs))
    assert [dict(zip(header, row))["peak GPU memory"] for row in rows] == ["4.00 GiB", "2.00 GiB"]
    assert "the overall training peak" in memory_note(runs)
    assert memory_note([{**runs[0], "epochs": [{"peak_mem_mb": None}]}]) == ""  # the CPU: nothing to name


# The settings of a run as config.json holds them (vars(cfg)), trimmed to a few.
SETTINGS = dict(
    data_dir="/data/intel",
    image_size=64,
    batch_size=32,
    epochs=3,
    learning_rate=1e-4,
    seed=42,
    amp=False,
    amp_dtype="float16",
    accum_steps=1,
    channels_last=True,
    compile=False,
    checkpoint_dir="checkpoints",
    num_workers=8,
    progress=True,
    compare=None,
    save_every_steps=0,
    log_interval=20,
    tensorboard=False,
)


def write_run(root, name, precision="FP32", config=SETTINGS, **changes):
    """A finished run folder root/name, loaded as --compare does: results.json, and config.json
    holding `config` with `changes` (none if `config` is None; a string is written as it is)."""
    folder = root / name
    folder.mkdir(parents=True)
    results = {**gpu_run(name, precision, 2048, 10.0, 500.0), "finished": True, "world_size": 1}
    (folder / "results.json").write_text(json.dumps(results))
    if isinstance(config, dict):
        config = json.dumps({**config, "checkpoint_name": name, **changes})
    if config is not None:
        (folder / "config.json").write_text(config)
    return load_finished_run(str(root), name)


def test_compare_warns_when_runs_differ_in_more_than_precision(tmp_path):
    runs = [
        write_run(tmp_path, "a"),
        write_run(tmp_path, "b", image_size=32, epochs=4, num_workers=2),
        write_run(tmp_path, "c", "AMP fp16", epochs=4, amp=True),
    ]
    assert setting_differences(runs) == ["image_size: 64 (a, c), 32 (b)", "epochs: 3 (a), 4 (b, c)"]
    report = comparison_report(runs)
    assert (
        "warning: these runs differ in more than precision; speedup and accuracy differences are not AMP's "
        "alone:\n- image_size: 64 (a, c), 32 (b)\n- epochs: 3 (a), 4 (b, c)\n"
    ) in report
    header, rows = table(report)
    assert header == COLUMNS
    assert [dict(zip(header, row))["image size"] for row in rows] == ["64", "32", "64"]
    cropped = write_run(tmp_path / "crop", "d", image_size=256, random_crop=224)
    header, (row,) = table(comparison_report([cropped]))
    assert dict(zip(header, row))["image size"] == "256 (crop 224)"  # (the crop is what the model saw)
    # The memory note right under the table whose column it explains, then what the ratios are relative to.
    assert report.startswith(
        comparison_table(runs) + f"\n\n{memory_note(runs)}\n\nSpeedup (images/s) and memory saving"
    )
    # Another dataset, model or GPU is named too (full paths in the warning, folder names in the table).
    runs = [write_run(tmp_path / "more", "a"), write_run(tmp_path / "more", "b", data_dir="/data/other/", model="vit")]
    runs[1]["device"] = "NVIDIA A100"
    assert setting_differences(runs) == [
        "model: resnet18 (a), vit (b)",
        "data_dir: /data/intel (a), /data/other/ (b)",
        "device: NVIDIA H100 80GB HBM3 (a), NVIDIA A100 (b)",
    ]
    _, rows = table(comparison_table(runs))
    assert [row[-5:-1] for row in rows] == [["resnet18", "64", "32", "intel"], ["vit", "64", "32", "other"]]


def test_compare_of_fp32_and_amp_alone_has_no_warning(tmp_path):
    runs = [
        write_run(tmp_path, "fp32"),
        write_run(
            tmp_path, "amp", "AMP bf16", amp=True, amp_dtype="bfloat16", num_workers=2, checkpoint_dir="elsewhere"
        ),
    ]
    assert setting_differences(runs) == []
    report = comparison_report(runs)
    assert "warning" not in report and "note" not in report
    assert report.startswith(
        comparison_table(runs)
        + f"\n\n{memory_note(runs)}\n\nSpeedup (images/s) and memory saving (peak GPU memory) are "
        "relative to fp32."
    )
    # Without per-image predictions (these hand-made runs have none) the paired statistics are unavailable.
    assert "- amp: paired statistics unavailable: fp32 has no test_predictions.csv" in report
    # --save_every_steps, --log_interval and --tensorboard count: their writes fall inside the timed epochs.
    runs = [
        write_run(tmp_path / "io", "a"),
        write_run(tmp_path / "io", "b", save_every_steps=10, log_interval=1, tensorboard=True),
    ]
    assert setting_differences(runs) == [
        "save_every_steps: 0 (a), 10 (b)",
        "log_interval: 20 (a), 1 (b)",
        "tensorboard: False (a), True (b)",
    ]


def test_compare_shows_the_settings_of_a_run_without_config_as_unknown(tmp_path):
    runs = [
        write_run(tmp_path, "new", image_size=128),
        write_run(tmp_path, "old", config=None),
        write_run(tmp_path, "broken", config="{not json"),
        write_run(tmp_path, "odd", config="[1, 2]"),
    ]
    assert [r["config"] for r in runs[1:]] == [None, None, None]
    _, rows = table(comparison_table(runs))
    assert [row[-5:-1] for row in rows] == [["resnet18", "128", "32", "intel"]] + [["?"] * 4] * 3
    assert setting_differences(runs) == []  # nothing known differs
    assert setting_differences(runs + [write_run(tmp_path, "small", image_size=64)]) == [
        "image_size: 128 (new), ? (old, broken, odd), 64 (small)"
    ]
    assert "note: no readable config.json for old, broken, odd;" in comparison_report(runs)
    # An old config.json, written before a setting existed, leaves that setting unknown.
    old_config = {k: v for k, v in SETTINGS.items() if k != "channels_last"}
    runs = [
        write_run(tmp_path / "more", "a", channels_last=False),
        write_run(tmp_path / "more", "b", config=old_config),
    ]
    assert setting_differences(runs) == []


def test_compare_refuses_missing_or_unfinished_runs_and_writes_nothing(runs_dir, run_cli, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs_dir / "fp32", checkpoints / "fp32", ignore=shutil.ignore_patterns("*.pt"))
    unfinished = read_results(checkpoints / "fp32")
    unfinished.update(finished=False, test_acc=None)
    (checkpoints / "cut").mkdir()
    (checkpoints / "cut" / "results.json").write_text(json.dumps(unfinished))
    assert_user_error(run_cli("--compare", "fp32", "ghost"), "'ghost'", "results.json")
    assert_user_error(run_cli("--compare", "fp32", "cut"), "'cut'", "not finished")
    assert_user_error(run_cli("--compare", "fp32", "../fp32"), "--compare")
    assert_user_error(run_cli("--compare", "fp32", "--predict"), "--compare and --predict")
    assert not list(checkpoints.glob("compare*"))


# --------------------------------------------------------------------------- each run's pictures and results
def test_curves_are_redrawn_every_epoch(runs_dir):
    assert CURVES_DRAWN == [(name, epoch) for name in RUNS for epoch in range(1, EPOCHS + 1)]


@pytest.mark.parametrize("epochs", [1, 2, 30])
def test_epoch_axes_tick_whole_epochs_only(epochs):
    history = [
        {
            "epoch": i,
            "train_loss": 1 / i,
            "val_loss": 1.1 / i,
            "train_acc": 50 + i,
            "val_acc": 48 + i,
            "lr": 1e-3 / i,
            "seconds": 2.0,
        }
        for i in range(1, epochs + 1)
    ]
    run = {"run": "a", "device": "cpu", "precision": "FP32", "epochs": history}
    axes = curves_figure(history, "a").axes + comparison_figure([run]).axes[:1]  # not the by-time axis
    for ax in axes:
        ticks = ax.get_xticks()
        assert len(ticks) >= 1 and all(tick == round(tick) for tick in ticks), (ax.get_title(), ticks)
        if epochs <= 2:
            assert list(ticks) == list(range(1, epochs + 1))


@pytest.mark.parametrize("name", RUNS)
def test_every_run_draws_valid_curves_and_confusion_pngs(runs_dir, name):
    assert_png(runs_dir / name / "curves.png", 900, 250)
    assert_png(runs_dir / name / "confusion.png", 300, 300)


@pytest.mark.parametrize("name", RUNS)
def test_per_class_accuracy_and_confusion_matrix(runs_dir, name):
    results = read_results(runs_dir / name)
    matrix = np.array(results["confusion_matrix"])
    assert results["class_names"] == CLASSES
    assert matrix.sum() == len(CLASSES) * TEST_PER_CLASS  # every test image once
    assert matrix.sum(axis=1).tolist() == [TEST_PER_CLASS] * len(CLASSES)  # rows are the true classes
    assert 100 * np.trace(matrix) / matrix.sum() == pytest.approx(results["test_acc"])
    expected = {c: 100 * matrix[i, i] / TEST_PER_CLASS for i, c in enumerate(CLASSES)}
    assert results["per_class_acc"] == pytest.approx(expected)
    log = (runs_dir / name / "train.log").read_text()
    assert "per-class test accuracy" in log
    for i, c in enumerate(CLASSES):
        assert f"{c:<5}  {expected[c]:6.2f}% ({matrix[i, i]}/{TEST_PER_CLASS})" in log


# --------------------------------------------------------------------------- --predict
def read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("name", RUNS)
def test_predict_labels_every_readable_image_once(runs_dir, demo_data, run_cli, tmp_path, name):
    # The test images (in class folders, so the answers are known), a broken file and a non-image.
    images = tmp_path / "unlabeled"
    shutil.copytree(os.path.join(demo_data, "seg_test", "seg_test"), images)
    (images / "zz_broken.jpg").write_bytes(b"not a jpeg")  # sorts last: the batches stay the test's
    (images / "notes.txt").write_text("not an image")
    code, out, err = run_cli(
        "--checkpoint_name", name, "--predict", "--predict_dir", images, *FAST, checkpoint_dir=runs_dir
    )
    assert code == 0, err
    assert "zz_broken.jpg" in err and "notes.txt" not in err  # listed, not fatal
    assert "1 unreadable" in out

    header, *rows = read_predictions(runs_dir / name / "predictions.csv")
    assert header == ["file", "label", "confidence"]
    expected_files = sorted(f"{c}/{f}" for c in CLASSES for f in os.listdir(images / c))
    assert [file for file, _, _ in rows] == expected_files  # each readable image once, sorted
    assert all(label in CLASSES and 1 / len(CLASSES) <= float(p) <= 1 for _, label, p in rows)
    # The same weights on the same batches (under the run's autocast) give the test's confusion matrix.
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    for file, label, _ in rows:
        matrix[CLASSES.index(file.split("/")[0]), CLASSES.index(label)] += 1
    assert matrix.tolist() == read_results(runs_dir / name)["confusion_matrix"]


def test_predict_finds_seg_pred_and_refuses_what_it_cannot_use(runs_dir, run_cli, tmp_path):
    data = tmp_path / "data"
    (data / "seg_pred").mkdir(parents=True)  # the flat layout
    for i, size in enumerate((20, 45, 32)):  # any size: resized to the run's image_size
        Image.new("RGB", (size, size), (200, 30 * i, 10)).save(data / "seg_pred" / f"{i}.png")
    flags = ["--checkpoint_name", "fp32", "--predict", *FAST]
    code, out, err = run_cli(*flags, "--data_dir", data, checkpoint_dir=runs_dir)
    assert code == 0, err
    rows = read_predictions(runs_dir / "fp32" / "predictions.csv")[1:]
    assert [file for file, _, _ in rows] == ["0.png", "1.png", "2.png"]

    assert_user_error(
        run_cli(*flags, "--data_dir", tmp_path / "nothing", checkpoint_dir=runs_dir), "seg_pred", "--predict_dir"
    )
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli(*flags, "--predict_dir", tmp_path / "empty", checkpoint_dir=runs_dir), "no image files")
    assert_user_error(
        run_cli(*flags, "--predict_dir", tmp_path / "empty", "--checkpoint_name", "ghost", checkpoint_dir=runs_dir),
        "best.pt",
    )
    assert_user_error(run_cli("--predict_dir", data, *FAST, checkpoint_dir=runs_dir), "--predict_dir")


def test_images_per_second_leave_out_each_sessions_first_epoch():
    # Epochs 1 and 3 started a session (a run's start, a --resume): their start-up makes them slow.
    epochs = [
        {"epoch": i + 1, "seconds": 10.0, "images_per_sec": rate, "first_in_session": first}
        for i, (rate, first) in enumerate([(20.0, True), (100.0, False), (30.0, True), (100.0, False)])
    ]
    assert report.throughput({"epochs": epochs}) == 100.0
    assert report.seconds_per_epoch({"epochs": epochs}) == 10.0
    older = [{k: v for k, v in e.items() if k != "first_in_session"} for e in epochs]  # results.json before the key
    assert report.throughput({"epochs": older}) == (100.0 + 30.0 + 100.0) / 3
    assert report.throughput({"epochs": epochs[:1]}) == 20.0  # one epoch: all there is
