"""Paths off the default one that once broke (issue 10): --compile, torchrun's device choice,
a layout change on resume, float16 overflows and BatchNorm, Ctrl-C at the wrong moment,
--predict with nothing readable, non-finite flags, fine-tuning from an earlier run, flags
that contradict each other, and the small things a new user trips over. Each test failed
before its fix."""

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch
from conftest import (
    FAST,
    PYTHON,
    ROOT,
    SMALL_MODEL,
    SimulatedCrash,
    assert_user_error,
    crash_in_epoch,
    make_colour_dataset,
    read_results,
)
from torch import nn

import config
import distributed
import main as main_module
import step
import trainer
import utils
from dataset import build_loaders
from scheduler import WarmupCosineLR, warmup_cosine_lr


def one_epoch(run_cli, data, name, *flags):
    code, out, err = run_cli("--data_dir", data, "--checkpoint_name", name, "--epochs", "1", *FAST, *flags)
    assert code == 0, err
    return out, err


def load(path):
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------- 1. --compile
def test_compile_trains(run_cli, demo_data, tmp_path, monkeypatch):
    # Inductor takes a minute to compile ResNet-18 on a CPU; the eager backend still wraps the
    # model in torch.compile's OptimizedModule, which is what the Trainer must handle.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    one_epoch(run_cli, demo_data, "compiled", "--compile")
    results = read_results(tmp_path / "checkpoints" / "compiled")
    assert results["finished"] and results["test_acc"] is not None
    assert not any(k.startswith("_orig_mod.") for k in load(tmp_path / "checkpoints" / "compiled" / "best.pt")["model"])


# --------------------------------------------------------------------------- 2. torchrun picks a GPU per LOCAL_RANK
@pytest.fixture
def two_gpus_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_torchrun_gives_each_process_the_gpu_of_its_local_rank(two_gpus_under_torchrun, monkeypatch, device):
    assert config.resolve_device(device) == "cuda:1"
    cfg, _ = config.parse_config(["--device", device])
    assert cfg.device == "cuda:1"
    # init_distributed then binds the process to that GPU (set_device with an index, not "cuda").
    calls = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", torch.device(d)))
    # (torchrun's store, here one in memory: rank 1 of 2)
    monkeypatch.setattr(distributed.dist, "rendezvous", lambda url, **kw: iter([(distributed.dist.HashStore(), 1, 2)]))
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw)
    )
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: None)
    assert distributed.init_distributed(cfg.device, 60)
    assert calls["set_device"] == torch.device("cuda", 1) and calls["backend"] == "nccl"
    assert calls["device_id"] == torch.device("cuda", 1)
    assert (calls["rank"], calls["world_size"]) == (1, 2)  # as torchrun's rendezvous gave them


def test_torchrun_refuses_a_fixed_gpu_index(two_gpus_under_torchrun):
    with pytest.raises(utils.UserError, match="LOCAL_RANK"):
        config.resolve_device("cuda:0")


# --------------------------------------------------------------------------- 3. layout change on resume
def test_resume_with_another_memory_layout_keeps_adams_moments_right(run_cli, demo_data, tmp_path, monkeypatch):
    flags = ["--data_dir", demo_data, "--epochs", "2", *FAST, "--deterministic"]
    restore = crash_in_epoch(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        run_cli("--checkpoint_name", "fused", *flags)  # channels_last (the default) for epoch 1
    restore()
    shutil.copytree(tmp_path / "checkpoints" / "fused", tmp_path / "checkpoints" / "unfused")
    resume = ["--data_dir", demo_data, "--resume", "--no_channels_last", "--no_progress"]
    assert run_cli("--checkpoint_name", "fused", *resume)[0] == 0
    # Unfused Adam steps each tensor by its own strides, so it is right whatever the layout.
    monkeypatch.setattr(
        main_module,
        "build_optimizer",
        lambda model, cfg: torch.optim.Adam(
            model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=False
        ),
    )
    assert run_cli("--checkpoint_name", "unfused", *resume)[0] == 0
    fused, unfused = (load(tmp_path / "checkpoints" / n / "last.pt")["model"] for n in ("fused", "unfused"))
    for key, value in fused.items():
        if value.is_floating_point():  # was 1e-3 apart when the moments kept the old layout
            torch.testing.assert_close(value, unfused[key], rtol=0, atol=2e-5, msg=key)


# --------------------------------------------------------------------------- 5. float16 overflow and BatchNorm
class TinyNet(nn.Sequential):
    def __init__(self, classes):
        super().__init__(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, classes),
        )


def float16_trainer(demo_data, tmp_path):
    """A Trainer on float16 autocast + GradScaler, on the CPU (how CUDA's recipe is tested here)."""
    cfg = config.parse_config(["--data_dir", demo_data, *FAST, "--epochs", "1", "--checkpoint_dir", str(tmp_path)])[0]
    cfg.amp, cfg.amp_dtype = True, "float16"  # (the CLI refuses float16 on a CPU for now)
    loaders = build_loaders(cfg, "cpu")
    torch.manual_seed(0)
    model = TinyNet(len(loaders[3]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = WarmupCosineLR(optimizer, total_steps=3, warmup_steps=0)
    os.makedirs(tmp_path / cfg.checkpoint_name, exist_ok=True)
    return Trainer(
        model,
        optimizer,
        scheduler,
        loaders[:3],
        cfg,
        str(tmp_path / cfg.checkpoint_name),
        loaders[3],
        utils.setup_logging(),
    )


Trainer = trainer.Trainer


def test_a_skipped_float16_step_leaves_batchnorm_statistics_as_they_were(demo_data, tmp_path):
    t = float16_trainer(demo_data, tmp_path)
    assert t.scaler.is_enabled()
    real_transform = t.transform
    batches = []

    def overflow_on_second_batch(images, flip_seed=None):
        x = real_transform(images, flip_seed)
        batches.append(1)
        if len(batches) == 2:  # an overflow in the forward: inf reaches BatchNorm and the loss
            x[0, 0, 0, 0] = float("inf")
        return x

    t.transform = overflow_on_second_batch
    t.train_one_epoch(0)
    assert int(t.health.skipped_steps) == 1 and t.scaler.get_scale() < 2.0**16  # skipped, and the scale backed off
    for buffer in t.model.buffers():
        assert torch.isfinite(buffer.float()).all()
    t.transform = real_transform
    assert math.isfinite(t.evaluate(t.val_loader)["loss"])  # evaluation was NaN from here on


def test_no_checkpoint_is_written_with_non_finite_batchnorm_statistics(demo_data, tmp_path):
    t = float16_trainer(demo_data, tmp_path)
    t.model[1].running_var.fill_(float("nan"))
    with pytest.raises(utils.RunStopped, match="no longer finite"):
        t.save_checkpoint("best.pt")
    assert not os.path.exists(os.path.join(t.run_dir, "best.pt"))


# --------------------------------------------------------------------------- 7. Ctrl-C during the final test
def test_ctrl_c_during_the_final_test_says_it_finishes_the_test(run_cli, demo_data, tmp_path, monkeypatch):
    real_test = trainer.Trainer.test

    def interrupted_test(self):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs now: the user pressed Ctrl-C
        return real_test(self)

    monkeypatch.setattr(trainer.Trainer, "test", interrupted_test)
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "1", *FAST)
    assert code == 0
    assert "finishing the final test" in err and "press Ctrl-C again" in err and "--resume" in err
    assert "stopping after the current step" not in err
    assert read_results(tmp_path / "checkpoints" / "baseline")["finished"]


def test_a_run_stopped_before_its_test_finishes_it_on_resume(run_cli, demo_data, tmp_path, monkeypatch):
    def killed(self):  # the second Ctrl-C: the process ends during the test
        raise SimulatedCrash

    monkeypatch.setattr(trainer.Trainer, "test", killed)
    with pytest.raises(SimulatedCrash):
        run_cli("--data_dir", demo_data, "--epochs", "1", *FAST)
    monkeypatch.undo()
    code, out, err = run_cli("--data_dir", demo_data, "--resume", "--no_progress")
    assert code == 0, err
    assert read_results(tmp_path / "checkpoints" / "baseline")["test_acc"] is not None


# --------------------------------------------------------------------------- 8. --predict
@pytest.fixture(scope="module")
def finished_run(demo_data, tmp_path_factory):
    """A finished one-epoch run `done` (under `checkpoints`) on a copy of the colour data with a seg_pred folder."""
    root = tmp_path_factory.mktemp("finished")
    data = shutil.copytree(demo_data, root / "data")
    shutil.copytree(data / "seg_test" / "seg_test" / "red", data / "seg_pred" / "seg_pred")
    argv = [
        "--checkpoint_dir",
        str(root / "checkpoints"),
        "--data_dir",
        str(data),
        "--checkpoint_name",
        "done",
        "--epochs",
        "1",
        *FAST,
    ]
    assert main_module.main(argv) == 0
    return Namespace(data=str(data), checkpoints=root / "checkpoints", dir=root / "checkpoints" / "done")


def test_predict_with_nothing_readable_keeps_the_earlier_predictions(run_cli, finished_run, tmp_path):
    csv_path = finished_run.dir / "predictions.csv"
    code, out, err = run_cli("--checkpoint_name", "done", "--predict", checkpoint_dir=finished_run.checkpoints)
    assert code == 0, err
    before = csv_path.read_text()
    assert len(before.splitlines()) == 9  # header + 8 images
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not an image")
    (junk / "b.png").write_bytes(b"")
    result = run_cli(
        "--checkpoint_name", "done", "--predict", "--predict_dir", junk, checkpoint_dir=finished_run.checkpoints
    )
    assert_user_error(result, "none of the 2 image file(s)", "unchanged")
    assert csv_path.read_text() == before


def test_predictions_file_labels_several_folders_into_their_own_files(run_cli, finished_run, tmp_path):
    green = os.path.join(finished_run.data, "seg_test", "seg_test", "green")
    out_file = tmp_path / "green.csv"
    code, out, err = run_cli(
        "--checkpoint_name",
        "done",
        "--predict",
        "--predict_dir",
        green,
        "--predictions_file",
        out_file,
        checkpoint_dir=finished_run.checkpoints,
    )
    assert code == 0, err
    rows = out_file.read_text().splitlines()
    assert rows[0] == "file,label,confidence" and len(rows) == 9 and str(out_file) in out


# --------------------------------------------------------------------------- 9. non-finite values; the divergence message
@pytest.mark.parametrize(
    "flag,value",
    [
        ("--learning_rate", "inf"),
        ("--learning_rate", "nan"),
        ("--weight_decay", "nan"),
        ("--min_lr", "nan"),
        ("--clip_grad_norm", "inf"),
        ("--val_fraction", "nan"),
        ("--dist_timeout", "inf"),
    ],
)
def test_non_finite_values_are_refused(run_cli, demo_data, flag, value):
    assert_user_error(run_cli("--data_dir", demo_data, *FAST, flag, value), flag, "finite")


def test_divergence_before_any_save_names_no_missing_checkpoint(run_cli, demo_data, tmp_path, monkeypatch):
    real_loss = step.F.cross_entropy
    monkeypatch.setattr(step.F, "cross_entropy", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "2", *FAST)
    assert code == 1 and err.count("\n") == 1 and "diverged" in err, err
    run_dir = tmp_path / "checkpoints" / "baseline"
    assert not (run_dir / "last.pt").exists()
    assert "last.pt" not in err and "No checkpoint was written" in err
    assert "diverged" in (run_dir / "train.log").read_text()  # the reason is in the log too


# --------------------------------------------------------------------------- 10. the AMP demo has its own name
def test_demo_with_amp_gets_its_own_run_name():
    assert config.parse_config(["--demo", "--device", "cpu"])[0].checkpoint_name == "demo"
    assert config.parse_config(["--demo", "--amp", "--device", "cpu"])[0].checkpoint_name == "demo_amp"
    assert (
        config.parse_config(["--demo", "--amp", "--device", "cpu", "--checkpoint_name", "x"])[0].checkpoint_name == "x"
    )


# --------------------------------------------------------------------------- 11. --evaluate and --predict use the run's data folder
def test_evaluate_and_predict_use_the_runs_saved_data_dir(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing under ./data here
    argv = ["--checkpoint_dir", str(finished_run.checkpoints), "--checkpoint_name", "done"]
    assert main_module.main([*argv, "--evaluate"]) == 0
    assert main_module.main([*argv, "--predict", "--predictions_file", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 9


def test_evaluate_refuses_a_setting_that_would_change_the_answers(run_cli, finished_run):
    result = run_cli(
        "--checkpoint_name", "done", "--evaluate", "--image_size", "64", checkpoint_dir=finished_run.checkpoints
    )
    assert_user_error(result, "--evaluate", "was trained with --image_size 32, not with --image_size 64")


def test_evaluate_needs_only_the_test_split(run_cli, finished_run, tmp_path):
    only_test = tmp_path / "only_test"
    shutil.copytree(os.path.join(finished_run.data, "seg_test"), only_test / "seg_test")
    code, out, err = run_cli(
        "--checkpoint_name", "done", "--evaluate", "--data_dir", only_test, checkpoint_dir=finished_run.checkpoints
    )
    assert code == 0, err
    assert "on 24 images" in out


def test_evaluate_with_other_settings_keeps_the_runs_own_test_record(run_cli, finished_run, tmp_path):
    """(review) --evaluate with another --data_dir, --device or --batch_size rewrote the run's
    test_predictions.csv but not its results.json; --compare then said "paired statistics
    unavailable". Now that test goes to files of its own, named by what changed, and says so."""
    runs = tmp_path / "checkpoints"
    for name in ("done", "twin"):  # (copies: the shared run stays as it was)
        shutil.copytree(finished_run.dir, runs / name)
    own = {f: (runs / "done" / f).read_bytes() for f in ("results.json", "test_predictions.csv")}
    only_test = tmp_path / "only_test"  # the same test images, in another folder
    shutil.copytree(os.path.join(finished_run.data, "seg_test"), only_test / "seg_test")
    code, out, err = run_cli(
        "--checkpoint_name", "done", "--evaluate", "--data_dir", only_test, "--batch_size", "8", checkpoint_dir=runs
    )
    assert code == 0, err
    # (the folder's name, a short hash of its real path: see test_two_data_folders_of_one_name_...)
    (csv_path,) = (runs / "done").glob("test_predictions_data_dir-only_test-*_batch_size-8.csv")
    json_path = runs / "done" / csv_path.name.replace("test_predictions_", "evaluate_").replace(".csv", ".json")
    assert f"wrote {csv_path} and {json_path}: tested with --data_dir {only_test} (the run's: " in out
    assert "--batch_size 8 (the run's: 16); the run's own results.json and test_predictions.csv are unchanged" in out
    assert {f: (runs / "done" / f).read_bytes() for f in own} == own
    record = json.loads(json_path.read_text())
    assert record["settings"]["batch_size"] == {"run": 16, "evaluated": 8} and record["test_images"] == 24
    assert f"test accuracy {record['test_acc']:.2f}% on 24 images" in out
    assert len(csv_path.read_text().splitlines()) == 25  # header + every test image
    # The run's own pair still pairs with another run's: --compare gives its verdict.
    code, out, err = run_cli("--compare", "done", "twin", checkpoint_dir=runs)
    assert code == 0, err
    assert "paired statistics unavailable" not in out and "| same within noise |" in out
    # With the run's own settings, --evaluate rewrites the run's own file (the same answers).
    code, out, err = run_cli("--checkpoint_name", "done", "--evaluate", checkpoint_dir=runs)
    assert code == 0, err
    assert f"wrote {runs / 'done' / 'test_predictions.csv'}\n" in out and "unchanged" not in out
    assert {f: (runs / "done" / f).read_bytes() for f in own} == own
    # A fresh run under the name removes the old model's records with it.
    code, out, err = run_cli(
        "--data_dir", finished_run.data, "--checkpoint_name", "done", "--epochs", "1", *FAST, "--overwrite",
        checkpoint_dir=runs,
    )  # fmt: skip
    assert code == 0, err
    assert not csv_path.exists() and not json_path.exists() and (runs / "done" / "test_predictions.csv").exists()
    shutil.rmtree(runs)


# A run's saved test settings (outputs.TEST_RECORD_SETTINGS), as config.json holds them.
SAVED_TEST_SETTINGS = dict(
    data_dir="/data/run",
    skip_bad_images=False,
    device="cpu",
    batch_size=16,
    amp_dtype="bfloat16",
    fp32_math="ieee",
    channels_last=True,
)


def test_evaluate_counts_tf32_as_a_change_only_where_it_computes_in_tf32():
    """(review) --evaluate --fp32_math tf32 on the CPU wrote a record of its own as if the test
    had changed, but the CPU computes IEEE FP32 either way."""
    import outputs

    saved = SAVED_TEST_SETTINGS
    assert outputs.test_setting_changes(saved, Namespace(**{**saved, "fp32_math": "tf32"})) == {}
    changes = outputs.test_setting_changes(saved, Namespace(**{**saved, "fp32_math": "tf32", "device": "cuda"}))
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0):
        assert changes["fp32_math"] == ("ieee", "tf32")  # (and the device, cpu to cuda)
    cuda_tf32 = {**saved, "fp32_math": "tf32", "device": "cuda"}
    assert outputs.test_setting_changes(cuda_tf32, Namespace(**{**cuda_tf32, "device": "cuda:0"})) == {}


def test_two_data_folders_of_one_name_get_a_record_each(tmp_path):
    """(review) The tag named a data folder by its last part: --evaluate on a/holdout, then on
    b/holdout, wrote the second's files over the first's. A short hash of the real path tells them apart."""
    import outputs

    def tag(data_dir):
        now = Namespace(**{**SAVED_TEST_SETTINGS, "data_dir": str(data_dir)})
        return outputs.evaluation_tag(outputs.test_setting_changes(SAVED_TEST_SETTINGS, now))

    for parent in ("a", "b"):
        (tmp_path / parent / "holdout").mkdir(parents=True)
    first, second = tag(tmp_path / "a" / "holdout"), tag(tmp_path / "b" / "holdout")
    assert first.startswith("data_dir-holdout-") and first != second and tag(tmp_path / "a" / "holdout") == first
    os.symlink(tmp_path / "a" / "holdout", tmp_path / "same")  # the same folder by another path: one record
    assert tag(tmp_path / "same") == first
    assert outputs.evaluation_paths("run", first) != outputs.evaluation_paths("run", second)


# --------------------------------------------------------------------------- 12. --pretrained_path from an earlier run


def test_pretrained_path_fine_tunes_from_an_earlier_run(run_cli, finished_run, tmp_path):
    best = finished_run.dir / "best.pt"
    trained_acc = read_results(finished_run.dir)["best_val_acc"]
    # The same classes: the run's head is kept, so it starts where the earlier run ended.
    tiny_lr = ["--learning_rate", "1e-9", "--min_lr", "0"]
    code, out, err = run_cli(
        "--data_dir",
        finished_run.data,
        "--checkpoint_name",
        "further",
        "--epochs",
        "1",
        *[f for f in FAST if f != "--no_pretrained"],
        *tiny_lr,
        "--pretrained_path",
        best,
    )
    assert code == 0, err
    assert "with its head (the same 3 classes)" in out
    assert read_results(tmp_path / "checkpoints" / "further")["epochs"][0]["val_acc"] == pytest.approx(trained_acc)
    # Other classes: the head is replaced, and it says so in one line.
    two = make_colour_dataset(tmp_path / "two", train_per_class=6, test_per_class=2)
    shutil.rmtree(os.path.join(two, "seg_train", "seg_train", "red"))
    shutil.rmtree(os.path.join(two, "seg_test", "seg_test", "red"))
    code, out, err = run_cli(
        "--data_dir",
        two,
        "--checkpoint_name",
        "tuned",
        "--epochs",
        "1",
        *[f for f in FAST if f != "--no_pretrained"],
        "--pretrained_path",
        best,
    )
    assert code == 0, err
    assert out.count("is replaced by a new one for this data's 2") == 1
    assert load(tmp_path / "checkpoints" / "tuned" / "best.pt")["model"]["fc.weight"].shape == (2, 512)


# --------------------------------------------------------------------------- 13. flags that contradict
@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--resume", "--overwrite"], ["--overwrite", "--resume"]),
        (["--evaluate", "--overwrite"], ["--overwrite", "--evaluate"]),
        (["--data"], ["--data", "--benchmark"]),
        (["--amp_dtype", "bfloat16"], ["--amp_dtype", "--amp"]),
        (["--pretrained_path", "x.pth", "--no_pretrained"], ["--pretrained_path", "--no_pretrained"]),
        (["--predictions_file", "p.csv"], ["--predictions_file", "--predict"]),
        (["--warmup_epochs", "3", "--epochs", "3"], ["--warmup_epochs"]),
        (["--sync_bn"], ["--sync_bn", "torchrun"]),
    ],
)
def test_contradicting_flags_are_refused(run_cli, demo_data, flags, needles):
    argv = [f for f in FAST if f != "--no_pretrained"] if "--pretrained_path" in flags else FAST
    assert_user_error(run_cli("--data_dir", demo_data, *argv, *flags), *needles)


def test_tensorboard_is_refused_where_nothing_trains(run_cli):
    assert_user_error(run_cli("--evaluate", "--tensorboard", "--device", "cpu"), "--tensorboard", "--evaluate")
    assert_user_error(run_cli("--benchmark", "--tensorboard", "--device", "cpu"), "--tensorboard")


def test_compare_refuses_training_flags(run_cli):
    assert_user_error(run_cli("--compare", "a", "b", "--epochs", "3"), "--compare", "--epochs")


def test_config_json_tells_the_truth_about_fp32(finished_run):
    saved = json.loads((finished_run.dir / "config.json").read_text())
    assert saved["amp"] is False and saved["amp_dtype"] is None


# --------------------------------------------------------------------------- 16. epochs, interrupts, pipes
def test_the_save_and_resume_messages_name_the_same_place(run_cli, demo_data, tmp_path, monkeypatch):
    real_step = trainer.training_step
    steps = []

    def sigterm_in_second_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a cluster preempting the job
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", sigterm_in_second_step)
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "2", *FAST, *SMALL_MODEL)
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM: saved" in err and "(epoch 1, after batch 2 of 3)" in err
    monkeypatch.setattr(trainer, "training_step", real_step)
    # 18: the seconds trained before the stop count in the total.
    last_pt = tmp_path / "checkpoints" / "baseline" / "last.pt"
    ckpt = load(last_pt)
    ckpt["epoch_state"].update(seconds=1000.0, checkpoint_seconds=500.0)
    torch.save(ckpt, last_pt)
    code, out, err = run_cli("--data_dir", demo_data, "--resume", "--no_progress")
    assert code == 0, err
    assert "resuming baseline: epoch 1, after batch 2 of 3" in out
    results = read_results(tmp_path / "checkpoints" / "baseline")
    assert results["total_train_seconds"] > 1500
    assert results["epochs"][0]["seconds"] > 1000 and results["epochs"][0]["checkpoint_seconds"] >= 500
    # The resumed session's first epoch holds its start-up: the steady epochs leave it out.
    assert [e["first_in_session"] for e in results["epochs"]] == [True, False]


def test_ctrl_c_during_start_up_is_one_line(run_cli, demo_data, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_module, "build_loaders", interrupted)
    code, out, err = run_cli("--data_dir", demo_data, *FAST)
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


@pytest.mark.usefixtures("forkserver")
def test_output_into_a_closed_pipe_is_quiet(demo_data, tmp_path):
    # `| head -1` leaves after the first log line; the next ones find the pipe closed.
    command = [
        *PYTHON,
        "main.py",
        "--data_dir",
        demo_data,
        "--checkpoint_dir",
        str(tmp_path),
        *FAST,
        *SMALL_MODEL,
        "--epochs",
        "1",
    ]
    proc = subprocess.run(
        " ".join(command) + " | head -1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout == "model: shufflenet_v2_x0_5, 0.34M parameters\n"  # the first line alone
    assert proc.stderr == "", proc.stderr
    assert read_results(tmp_path / "baseline")["finished"]  # the run itself went on to the end


# --------------------------------------------------------------------------- 17. small things
def test_help_shows_one_default_each_and_says_what_is_on():
    text = " ".join(config.build_parser().format_help().split())
    text = text[text.index("options:") :]  # past the usage line
    warmup = text[text.index("--warmup_epochs") : text.index("--min_lr")]
    assert warmup.count("default") == 1, warmup
    amp_dtype = text[text.index("--amp_dtype") : text.index("--fp32_math")]
    assert amp_dtype.count("default") == 1, amp_dtype
    assert "on by default" in text[text.index("--channels_last") : text.index("--no_channels_last")]
    demo = text[text.index("--demo") : text.index("--image_size")]
    assert "64 px" in demo and "8 epochs" in demo and "demo_amp" in demo


def test_one_step_one_epoch_is_singular(run_cli, demo_data):
    out, _ = one_epoch(run_cli, demo_data, "single", "--batch_size", "64")
    assert "1 step x 1 epoch" in out


@pytest.mark.parametrize("how", ["garbage", "pickle"])
def test_a_bad_checkpoint_message_never_suggests_unsafe_loading(run_cli, finished_run, tmp_path, how):
    ckdir = tmp_path / "ck"
    shutil.copytree(finished_run.dir, ckdir / "bad", ignore=shutil.ignore_patterns("last.pt"))
    best = ckdir / "bad" / "best.pt"
    if how == "garbage":
        best.write_bytes(b"\x00garbage" * 100)
    else:
        torch.save({"model": Namespace(a=1)}, best)  # a pickle of a Python object
    code, out, err = run_cli("--checkpoint_name", "bad", "--evaluate", checkpoint_dir=ckdir)
    assert code == 2 and err.count("\n") == 1, err
    assert "weights_only" not in err and "False" not in err


# --------------------------------------------------------------------------- 18. smaller review findings
def test_bfloat16_counts_only_when_the_gpu_has_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(utils.UserError, match="T4 has no bfloat16"):
        config.parse_config(["--device", "cuda", "--amp", "--amp_dtype", "bfloat16"])


def test_a_resumed_schedule_keeps_this_sessions_length():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    before = WarmupCosineLR(optimizer, total_steps=100, warmup_steps=10)
    for _ in range(40):
        optimizer.step()
        before.step()
    # Resumed under another number of processes: 120 steps now, warmup 12.
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    after = WarmupCosineLR(optimizer, total_steps=120, warmup_steps=12)
    after.load_state_dict(before.state_dict())
    assert (after.last_epoch, after.total_steps, after.warmup_steps) == (40, 120, 12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine_lr(40, 1.0, 120, 12))


# --------------------------------------------------------------------------- 19. the suite's disk use
def test_the_suite_keeps_only_failed_tests_folders(request):
    assert request.config.getini("tmp_path_retention_policy") == "failed"
    assert int(request.config.getini("tmp_path_retention_count")) <= 1


# --------------------------------------------------------------------------- found by review
def test_imagenet_weights_without_batchnorm_counters_load(tmp_path):
    # The ImageNet ResNet-18 file predates BatchNorm's num_batches_tracked; wrapped models'
    # files carry a module. or _orig_mod. prefix. Both are ResNet-18 weights.
    from torchvision.models import resnet18

    from model import build_model

    torch.manual_seed(0)
    state = {k: v for k, v in resnet18().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "imagenet.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    for file in ("imagenet.pth", "ddp.pth"):
        model = build_model(4, pretrained_path=str(tmp_path / file))
        torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
        assert model.fc.out_features == 4


def test_a_resume_at_an_epochs_end_goes_on_at_this_sessions_step(run_cli, demo_data, tmp_path, monkeypatch):
    # Under another number of processes an epoch can take another number of steps; the LR
    # schedule must go on from epochs done x this session's steps per epoch.
    flags = ["--data_dir", demo_data, "--epochs", "3", "--warmup_epochs", "0", *FAST, *SMALL_MODEL]
    assert run_cli("--checkpoint_name", "full", *flags)[0] == 0
    restore = crash_in_epoch(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        run_cli("--checkpoint_name", "cut", *flags)
    restore()
    last_pt = tmp_path / "checkpoints" / "cut" / "last.pt"
    ckpt = load(last_pt)
    assert ckpt["scheduler"]["last_epoch"] == 3
    ckpt["scheduler"]["last_epoch"] = 2  # as if saved where an epoch took 2 steps, not 3
    torch.save(ckpt, last_pt)
    code, out, err = run_cli("--checkpoint_name", "cut", "--resume", "--data_dir", demo_data, "--no_progress")
    assert code == 0, err
    full, cut = (read_results(tmp_path / "checkpoints" / n)["epochs"] for n in ("full", "cut"))
    assert [e["lr"] for e in cut] == pytest.approx([e["lr"] for e in full])
    assert load(last_pt)["scheduler"]["last_epoch"] == 9


def test_saved_run_modes_check_the_saved_batch_under_torchrun(monkeypatch):
    for name, value in (("WORLD_SIZE", "3"), ("LOCAL_RANK", "0"), ("RANK", "0")):
        monkeypatch.setenv(name, value)
    for mode in (
        ["--resume", "--device", "cpu"],
        ["--evaluate", "--device", "cpu"],
        ["--predict", "--device", "cpu"],
        ["--compare", "a"],
    ):
        config.parse_config(mode)  # the default batch of 256 is not theirs
    cfg, explicit = config.parse_config(["--resume", "--device", "cpu"])
    saved = {**vars(cfg), "batch_size": 24, "resume": False}
    assert config.merge_resumed(saved, cfg, explicit).batch_size == 24
    with pytest.raises(utils.UserError, match="split evenly over the 3"):
        config.merge_resumed({**saved, "batch_size": 16}, cfg, explicit)


def test_session_settings_are_this_sessions_on_resume():
    cfg, explicit = config.parse_config(["--resume", "--device", "cpu"])
    saved = {**vars(cfg), "compile": True, "cache": True, "progress": False, "deterministic": True, "image_size": 32}
    merged = config.merge_resumed(saved, cfg, explicit)
    assert (merged.compile, merged.cache, merged.progress, merged.deterministic) == (False, False, True, False)
    assert merged.image_size == 32  # what the run is stays the saved run's


def test_mismatch_messages_name_real_flags():
    cfg, explicit = config.parse_config(["--resume", "--device", "cpu", "--no_pretrained"])
    with pytest.raises(utils.UserError, match="trained without --no_pretrained, not with --no_pretrained"):
        config.merge_resumed({**vars(cfg), "pretrained": True}, cfg, explicit)
    cfg, explicit = config.parse_config(["--evaluate", "--device", "cpu", "--no_pretrained"])
    assert config.merge_evaluated({**vars(cfg), "pretrained": True}, cfg, explicit)  # answers do not change


def test_demo_keeps_a_typed_pretrained_path():
    cfg, _ = config.parse_config(["--demo", "--device", "cpu", "--pretrained_path", "x.pt"])
    assert cfg.pretrained and cfg.pretrained_path == "x.pt"


def test_one_image_per_batchnorm_at_32_px_is_refused(run_cli, demo_data):
    assert_user_error(run_cli("--data_dir", demo_data, *FAST, "--batch_size", "1"), "--batch_size 1", "BatchNorm")


def test_cpu_0_is_the_cpu():
    assert config.resolve_device("cpu:0") == "cpu"


def test_a_skipped_first_step_gives_no_scheduler_warning(demo_data, tmp_path, recwarn):
    t = float16_trainer(demo_data, tmp_path)
    real_transform = t.transform

    def overflow_first(images, flip_seed=None):
        x = real_transform(images, flip_seed)
        if t.scheduler.last_epoch == 0:
            x[0, 0, 0, 0] = float("inf")
        return x

    t.transform = overflow_first
    t.train_one_epoch(0)
    assert int(t.health.skipped_steps) == 1
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


# --------------------------------------------------------------------------- found by the second review
def corrupt_png(path):
    """A PNG whose header is fine and whose pixel data is garbage (torchvision's decoder used to
    crash the whole process on it)."""
    from PIL import Image

    Image.fromarray(torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()).save(path)
    data = bytearray(open(path, "rb").read())
    for i in range(100, len(data) - 20):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def test_a_corrupt_png_is_an_unreadable_image_not_a_crash(tmp_path):
    corrupt_png(tmp_path / "bad.png")
    code = (
        "from dataset import decode_problem, load_image_uint8; import sys; "
        f"print(decode_problem({str(tmp_path / 'bad.png')!r})); load_image_uint8({str(tmp_path / 'bad.png')!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]  # was -11 (a segfault in libpng)
    assert proc.stdout.startswith("not a decodable image")


@pytest.mark.usefixtures("forkserver")
def test_a_failed_run_with_worker_processes_exits(demo_data, tmp_path):
    # The workers ignore SIGTERM, which is how Python ends them at exit: a run that failed used to
    # print its traceback and then wait for them forever.
    probe = [
        *PYTHON,
        os.path.join(ROOT, "tests", "crash_probe.py"),
        "--data_dir",
        demo_data,
        "--checkpoint_dir",
        str(tmp_path),
        *FAST,
        *SMALL_MODEL,
        "--epochs",
        "1",
        "--num_workers",
        "2",
    ]
    proc = subprocess.run(
        probe,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PROBE_WORKER_BUG": "1"},
    )
    assert proc.returncode == 1
    assert "probe: a bug in a data-loading worker" in proc.stderr and "killed by signal" not in proc.stderr


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    # (--help answers before torch loads: a --compare's flags pass that check, then torch loads)
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--checkpoint_dir", str(tmp_path), "--compare", "a", "b"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # Python is up and the flags checked; torch is still importing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted before anything was saved\n", err


def test_demo_never_writes_into_a_folder_that_holds_other_files(run_cli, demo_data, tmp_path):
    data = shutil.copytree(demo_data, tmp_path / "mine")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    assert_user_error(run_cli("--demo", "--data_dir", data, "--epochs", "1"), "--demo", str(data), "empty or new")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_seeds_beyond_64_bits_are_refused(run_cli, demo_data):
    assert_user_error(run_cli("--data_dir", demo_data, *FAST, "--seed", "99999999999999999999"), "--seed")


def test_evaluate_takes_skip_bad_images(run_cli, finished_run, tmp_path):
    data = shutil.copytree(finished_run.data, tmp_path / "data")
    (data / "seg_test" / "seg_test" / "red" / "junk.jpg").write_text("not a picture")
    argv = ["--checkpoint_name", "done", "--evaluate", "--data_dir", data]
    assert_user_error(run_cli(*argv, checkpoint_dir=finished_run.checkpoints), "junk.jpg", "--skip_bad_images")
    code, out, err = run_cli(*argv, "--skip_bad_images", checkpoint_dir=finished_run.checkpoints)
    assert code == 0, err
    assert "on 24 images" in out


@pytest.mark.parametrize(
    "content", ['{"finished": true, "test_acc": 1.0}', '{"finished": true, "test_acc": "x", "epochs": []}', "[1, 2]"]
)
def test_compare_of_a_broken_results_file_is_one_line(run_cli, tmp_path, content):
    (tmp_path / "checkpoints" / "odd").mkdir(parents=True)
    (tmp_path / "checkpoints" / "odd" / "results.json").write_text(content)
    assert_user_error(run_cli("--compare", "odd"), "not a results file of this template")


def test_compare_of_a_run_still_in_its_first_epoch_says_so(run_cli, tmp_path):
    (tmp_path / "checkpoints" / "young").mkdir(parents=True)
    (tmp_path / "checkpoints" / "young" / "last.pt").write_bytes(b"")
    assert_user_error(run_cli("--compare", "young"), "has not finished an epoch", "--resume")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--benchmark", "--epochs", "3"], "--epochs"),
        (["--benchmark", "--amp"], "FP32 and AMP anyway"),
        (["--benchmark", "--no_pretrained"], "--no_pretrained"),
        (["--benchmark_steps", "3"], "--benchmark_steps"),
    ],
)
def test_flags_the_mode_does_not_read_are_refused(run_cli, flags, needle):
    assert_user_error(run_cli(*flags, "--device", "cpu"), needle)


@pytest.mark.usefixtures("forkserver")
def test_a_kill_between_an_epochs_last_step_and_its_last_pt_writes_no_tensorboard_point_twice(demo_data, tmp_path):
    from report import read_tensorboard_scalars

    flags = [
        "--data_dir",
        demo_data,
        "--checkpoint_dir",
        str(tmp_path),
        *FAST,
        *SMALL_MODEL,
        "--epochs",
        "2",
        "--tensorboard",
        "--save_every_steps",
        "1",
        "--log_interval",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [*PYTHON, os.path.join(ROOT, "tests", "crash_probe.py"), *flags],
        env={**env, "PROBE_KILL_AT_BEST": "1"},
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL
    time.sleep(1.1)  # TensorBoard orders a folder's event files by the second they were opened
    resumed = subprocess.run(
        [*PYTHON, os.path.join(ROOT, "main.py"), *flags, "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    scalars = read_tensorboard_scalars(tmp_path / "baseline" / "tensorboard")
    assert [s for s, _ in scalars["epoch/val_acc"]] == [3, 6]  # each epoch once (was [3, 3, 6])
    assert [s for s, _ in scalars["step/lr"]] == [1, 2, 3, 4, 5, 6]


def test_the_stop_message_names_what_a_second_signal_does(capsys):
    # A second Ctrl-C exits at once; a second SIGTERM (a scheduler's) changes nothing, and nobody pressed Ctrl-C.
    from checkpoint import GracefulStop

    GracefulStop()._handle(signal.SIGTERM, None)
    assert capsys.readouterr().err.strip() == (
        "SIGTERM: stopping after the current step (a Ctrl-C (SIGINT) to exit at once)"
    )
    GracefulStop()._handle(signal.SIGINT, None)
    assert (
        capsys.readouterr().err.strip()
        == "SIGINT: stopping after the current step (press Ctrl-C again to exit at once)"
    )


def test_a_sighup_ignored_by_nohup_stays_ignored():
    # `nohup python main.py &`: the run must outlive the terminal, not stop when it closes.
    from checkpoint import GracefulStop

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop = GracefulStop().install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        stop.uninstall()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        stop = GracefulStop().install()  # (without nohup: a closed terminal saves and stops the run)
        assert signal.getsignal(signal.SIGHUP) == stop._handle
        stop.uninstall()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_data_workers_leave_every_stop_signal_to_the_main_process():
    # A closed terminal sends SIGHUP to the whole process group: workers that died of it would
    # crash the run instead of letting it save.
    from dataset import _ignore_stop_signals

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.getsignal(signum) for signum in stops}
    try:
        _ignore_stop_signals(0)
        assert all(signal.getsignal(signum) == signal.SIG_IGN for signum in stops)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_the_stop_line_names_a_command_that_works_as_pasted():
    # (a folder or run name with a space, and no --checkpoint_dir where it is the default)
    import shlex
    from argparse import Namespace

    from checkpoint import GracefulStop

    stop = GracefulStop()
    stop.signal = signal.SIGTERM
    line = stop.resume_hint("last.pt", "epoch 1", Namespace(checkpoint_name="a b", checkpoint_dir="my runs"))
    assert shlex.split(line.split("continue with: ")[1]) == [
        "python",
        "main.py",
        "--checkpoint_name",
        "a b",
        "--checkpoint_dir",
        "my runs",
        "--resume",
    ]
    line = stop.resume_hint("last.pt", "epoch 1", Namespace(checkpoint_name="x", checkpoint_dir="checkpoints"))
    assert line.endswith("continue with: python main.py --checkpoint_name x --resume")
