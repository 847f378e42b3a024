"""What a new user tripped on (issue 22): no silent waits, outputs where expected, a finished run
that says so, the same image checks in every mode, fine-tuning advice, and a data folder of class
folders. (Precise BatchNorm, item 1, is tests/test_precise_bn.py; flags before torch, item 3, is
tests/test_cli.py.)"""

import os

import pytest
from conftest import FAST, SMALL_MODEL, assert_user_error, read_results

import benchmark
import main as main_module
import trainer

SMALL_BENCHMARK = [
    "--benchmark",
    "--device",
    "cpu",
    "--batch_size",
    "2",
    "--image_size",
    "32",
    "--benchmark_steps",
    "2",
    "--num_workers",
    "0",
    *SMALL_MODEL,
]


# --------------------------------------------------------------------------- item 2: no silent waits
def test_benchmark_says_how_far_it_is_with_an_estimate(run_cli, tmp_path):
    code, out, err = run_cli(*SMALL_BENCHMARK)
    assert code == 0, err
    lines = out.splitlines()
    warmed = [line for line in lines if "warmed up" in line]
    assert [line.split(" (")[0].strip() for line in warmed] == ["row 1/4", "row 2/4", "row 3/4", "row 4/4"]
    assert all(" s a step; about " in line and line.endswith(" s left") for line in warmed)
    # The progress comes before the table, each row's as it is ready; the table after them all.
    assert lines.index(warmed[-1]) < lines.index(next(line for line in lines if line.startswith("| fp32 |")))
    # Into its own folder (item 4): neither the default run's nor the demo's.
    assert os.listdir(tmp_path / "checkpoints") == ["benchmark"]
    assert (tmp_path / "checkpoints" / "benchmark" / "benchmark.json").exists()


def test_benchmark_without_progress_prints_the_table_alone(run_cli):
    code, out, err = run_cli(*SMALL_BENCHMARK, "--no_progress")
    assert code == 0, err
    assert "warmed up" not in out and "| fp32 | NCHW |" in out


def test_the_remaining_time_counts_the_rows_not_built_yet():
    # 2 rows measured at 1 s and 3 s a step, 2 rows to come (guessed at 2 s), 10 timed steps:
    # the new rows' warm-up and peak-memory steps (2 x 4 x 2 s) and everyone's timed steps.
    assert benchmark.seconds_left([1.0, 3.0], 2, 10) == pytest.approx(2 * 4 * 2 + 10 * (1 + 3) + 10 * 2 * 2)


def test_long_passes_have_progress_bars(run_cli, demo_data, monkeypatch):
    """Validation, test, --evaluate, --predict, the image check and --cache each get a bar (on a
    terminal), named; --no_progress turns them all off."""
    import dataset
    import utils

    named = []
    real = utils.progress_bar

    def spy(iterable, description, total=None):
        named.append(description)
        return real(iterable, description, total)

    for module in (trainer, dataset, main_module):
        monkeypatch.setattr(module, "progress_bar", spy)
    flags = ["--data_dir", demo_data, "--epochs", "1", *FAST, *SMALL_MODEL, "--cache", "--checkpoint_name", "bars"]
    bars_on = [flag for flag in flags if flag != "--no_progress"]
    assert run_cli(*bars_on)[0] == 0
    assert {"checking images", "--cache: decoding", "evaluating"} <= set(named)
    assert run_cli("--checkpoint_name", "bars", "--evaluate", "--data_dir", demo_data, "--device", "cpu")[0] == 0
    assert "testing" in named
    named.clear()
    assert run_cli(*flags, "--overwrite")[0] == 0
    assert named and set(named) == {""}  # --no_progress: every bar off


# --------------------------------------------------------------------------- item 6: images alike in every mode
@pytest.fixture(scope="module")
def labeled_run(demo_data, tmp_path_factory):
    """A finished one-epoch run `done` on the colours, and a folder to label: two good JPEGs and
    one cut short (its header intact, a quarter of its data gone)."""
    root = tmp_path_factory.mktemp("labeled")
    argv = [
        "--checkpoint_dir",
        str(root / "checkpoints"),
        "--data_dir",
        demo_data,
        "--checkpoint_name",
        "done",
        "--epochs",
        "1",
        *FAST,
    ]
    assert main_module.main(argv) == 0
    photos = root / "photos"
    photos.mkdir()
    source = os.path.join(demo_data, "seg_test", "seg_test", "red")
    for name in ("0.jpg", "1.jpg"):
        (photos / name).write_bytes(open(os.path.join(source, name), "rb").read())
    payload = open(os.path.join(source, "2.jpg"), "rb").read()
    (photos / "cut.jpg").write_bytes(payload[: len(payload) * 3 // 4])
    return root


def test_predict_warns_about_a_truncated_jpeg_as_training_does(run_cli, labeled_run):
    flags = ["--checkpoint_name", "done", "--predict", "--predict_dir", labeled_run / "photos"]
    code, out, err = run_cli(*flags, checkpoint_dir=labeled_run / "checkpoints")
    assert code == 0, err
    assert "warning: 1 JPEG(s) look truncated, e.g." in err and "cut.jpg; they load with the missing part gray" in err
    rows = (labeled_run / "checkpoints" / "done" / "predictions.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["file", "0.jpg", "1.jpg", "cut.jpg"]  # labeled, gray part and all
    # --skip_bad_images: decoded first, as in training, and the broken file left out.
    code, out, err = run_cli(*flags, "--skip_bad_images", checkpoint_dir=labeled_run / "checkpoints")
    assert code == 0, err
    assert "skipped: " in err and "cut.jpg: not a decodable image" in err and "look truncated" not in err
    rows = (labeled_run / "checkpoints" / "done" / "predictions.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["file", "0.jpg", "1.jpg"]
    assert "(1 unreadable file(s) skipped)" in out


def test_predict_does_not_call_a_skipped_file_truncated(run_cli, labeled_run, tmp_path):
    # (review) a text file named .jpg was listed as skipped and also as a truncated JPEG that "loads gray".
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "0.jpg").write_bytes((labeled_run / "photos" / "0.jpg").read_bytes())
    (photos / "notes.jpg").write_text("not an image")
    (photos / "byte.jpg").write_bytes(b"x")  # too short to look for the end marker in (it was a traceback)
    code, out, err = run_cli(
        "--checkpoint_name",
        "done",
        "--predict",
        "--predict_dir",
        photos,
        "--predictions_file",
        tmp_path / "p.csv",
        checkpoint_dir=labeled_run / "checkpoints",
    )
    assert code == 0, err
    assert "notes.jpg" in err and "byte.jpg" in err and "skipped: " in err and "look truncated" not in err
    assert [row.split(",")[0] for row in (tmp_path / "p.csv").read_text().splitlines()] == ["file", "0.jpg"]


# --------------------------------------------------------------------------- item 7: fine-tuning advice
def test_starting_from_a_run_at_its_own_peak_lr_suggests_a_lower_one(run_cli, labeled_run, demo_data):
    best = labeled_run / "checkpoints" / "done" / "best.pt"  # trained at FAST's --learning_rate 2e-3
    flags = [
        "--data_dir",
        demo_data,
        "--epochs",
        "1",
        *[f for f in FAST if f != "--no_pretrained"],
        "--pretrained_path",
        best,
    ]
    code, out, err = run_cli(*flags, "--checkpoint_name", "again")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("--pretrained_path:"))
    assert line.startswith(
        f"--pretrained_path: starting from {best} with its head (the same 3 classes); this run "
        "warms its LR up to --learning_rate 0.002 again (the earlier run peaked at 0.002)"
    )
    assert line.endswith("pass a lower --learning_rate (e.g. 0.0002) and a short --warmup_epochs (0 or 1)")
    code, out, err = run_cli(*flags, "--checkpoint_name", "tuned", "--learning_rate", "2e-4")
    assert code == 0, err
    assert "(the same 3 classes)\n" in out and "warms its LR" not in out  # lower already: no advice


# --------------------------------------------------------------------------- item 8: class folders, no split
@pytest.fixture(scope="module")
def class_folders_only(demo_data, tmp_path_factory):
    """The colours' 20 training images a class as DATA/<class>/*.jpg: no train/test split."""
    import shutil

    root = tmp_path_factory.mktemp("classes_only") / "data"
    shutil.copytree(os.path.join(demo_data, "seg_train", "seg_train"), root)
    return root


def test_class_folders_without_a_split_are_named_with_what_to_do(run_cli, class_folders_only, tmp_path):
    result = run_cli("--data_dir", class_folders_only, "--epochs", "1", *FAST)
    assert_user_error(
        result,
        f"{class_folders_only} holds 3 class folder(s) (blue, green, red) but no training and test split",
        f"{class_folders_only}/train/<class>/",
        "--test_fraction F",
    )
    assert not (tmp_path / "checkpoints").exists()


def test_test_fraction_holds_out_a_stratified_seeded_test_split(run_cli, class_folders_only, tmp_path):
    flags = ["--data_dir", class_folders_only, "--epochs", "1", *FAST, "--test_fraction", "0.25"]
    code, out, err = run_cli(*flags, "--checkpoint_name", "held_out")
    assert code == 0, err
    # 60 images: 5 a class to test, then a fifth of the other 15 a class to validation.
    assert "training held_out: 36 train / 9 val / 15 test images, 3 classes" in out
    results = read_results(tmp_path / "checkpoints" / "held_out")
    assert [sum(row) for row in results["confusion_matrix"]] == [5, 5, 5]  # stratified
    # --evaluate holds out the same images again (the run's saved --test_fraction and --seed).
    code, out, err = run_cli(
        "--checkpoint_name", "held_out", "--evaluate", "--data_dir", class_folders_only, "--device", "cpu"
    )
    assert code == 0, err
    assert f"test accuracy {results['test_acc']:.2f}% on 15 images" in out


def test_a_test_fraction_that_leaves_no_validation_split_says_so(run_cli, class_folders_only):
    # (found by review: the line blamed --val_fraction alone)
    assert_user_error(
        run_cli("--data_dir", class_folders_only, "--epochs", "1", *FAST, "--test_fraction", "0.99"),
        "too small for a validation split of 0.2 once --test_fraction 0.99 held its test split out",
    )


def test_the_held_out_split_is_disjoint_and_follows_the_seed(class_folders_only):
    import config
    from dataset import build_datasets

    def splits(seed):
        cfg = config.parse_config(
            [
                "--data_dir",
                str(class_folders_only),
                "--test_fraction",
                "0.25",
                "--seed",
                str(seed),
                "--device",
                "cpu",
                "--image_size",
                "8",
            ]
        )[0]
        train, val, test, _ = build_datasets(cfg)
        return [set(subset.indices) for subset in (train, val, test)]

    train, val, test = splits(1)
    assert len(train) + len(val) + len(test) == 60 and not (train & val or train & test or val & test)
    assert splits(1) == [train, val, test]  # the same with the same seed
    assert splits(2)[2] != test  # another seed, other test images


def test_test_fraction_is_refused_where_there_is_a_test_split(run_cli, demo_data):
    assert_user_error(
        run_cli("--data_dir", demo_data, "--epochs", "1", *FAST, "--test_fraction", "0.2"),
        "--test_fraction holds a test split out of the training images",
        "has one",
        "drop --test_fraction",
    )


def test_resume_of_a_finished_run_with_more_epochs_says_how_to_train_further(run_cli, labeled_run, demo_data):
    # --resume cannot change --epochs: the answer is the finished run's note, not "drop the flag".
    run_dir = labeled_run / "checkpoints" / "done"
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "results.json")}
    code, out, err = run_cli(
        "--checkpoint_name",
        "done",
        "--resume",
        "--epochs",
        "5",
        "--data_dir",
        demo_data,
        checkpoint_dir=labeled_run / "checkpoints",
    )
    assert code == 0 and err == "", err
    assert "done is finished: it trained its 1 epoch" in out and "--pretrained_path" in out and "--epochs N" in out
    assert before == {name: (run_dir / name).read_bytes() for name in before}
