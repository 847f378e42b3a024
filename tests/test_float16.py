"""CUDA's AMP recipe, float16 autocast + GradScaler, checked on the CPU (issue 11): what a user
relies on when the scaler works, through the real Trainer (and the CLI where files are
involved), plus the AMP telemetry in results.json and TensorBoard."""

import functools
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from conftest import FAST, SMALL_MODEL, main_command, read_results
from torch import nn

import config
import step
import trainer
import utils
from dataset import build_loaders
from outputs import MEASUREMENT_KEYS
from report import read_tensorboard_scalars
from scheduler import WarmupCosineLR, warmup_cosine_lr

FLOAT16 = ["--amp", "--amp_dtype", "float16", *SMALL_MODEL]  # (a Trainer built here gets its own model)
REAL_LOSS = step.F.cross_entropy


@pytest.fixture
def low_initial_scale(monkeypatch):
    """GradScaler starting at 2**8 instead of 2**16, so the tiny model never overflows by itself
    and every skipped step is an injected one."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**8))


def inf_loss_on(monkeypatch, calls_to_poison):
    """Make the training loss inf on the given (0-based) calls of cross_entropy in training
    mode, as an overflow in float16 would; evaluation's calls are not counted."""
    calls = []

    def cross_entropy(logits, targets, *args, **kwargs):
        loss = REAL_LOSS(logits, targets, *args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        calls.append(1)
        return loss * float("inf") if len(calls) - 1 in calls_to_poison else loss

    monkeypatch.setattr(step.F, "cross_entropy", cross_entropy)


class TinyNet(nn.Sequential):
    """A small conv net; without BatchNorm when the batch composition must not matter."""

    def __init__(self, classes, batchnorm=True):
        super().__init__(
            nn.Conv2d(3, 8, 3, stride=2),
            *([nn.BatchNorm2d(8)] if batchnorm else []),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, classes),
        )


def float16_trainer(demo_data, tmp_path, optimizer=None, model=None, flags=()):
    cfg = config.parse_config(
        ["--data_dir", demo_data, *FAST, *FLOAT16, "--epochs", "1", "--checkpoint_dir", str(tmp_path), *flags]
    )[0]
    loaders = build_loaders(cfg, "cpu")
    torch.manual_seed(0)
    model = model or TinyNet(len(loaders[3]))
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = WarmupCosineLR(optimizer, total_steps=100, warmup_steps=0)
    os.makedirs(tmp_path / cfg.checkpoint_name, exist_ok=True)
    return trainer.Trainer(
        model,
        optimizer,
        scheduler,
        loaders[:3],
        cfg,
        str(tmp_path / cfg.checkpoint_name),
        loaders[3],
        utils.setup_logging(),
    )


def test_float16_on_the_cpu_trains_with_a_warning_and_reports_the_scaler(
    run_cli, demo_data, tmp_path, low_initial_scale
):
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "2", *FAST, *FLOAT16, "--checkpoint_name", "f16")
    assert code == 0, err
    assert out.count("warning: float16 + GradScaler on the CPU") == 1
    results = read_results(tmp_path / "checkpoints" / "f16")
    assert results["precision"] == "AMP fp16" and results["amp_dtype"] == "float16"
    for epoch in results["epochs"]:
        assert epoch["loss_scale"] > 0 and epoch["grad_norm_max"] >= epoch["grad_norm_mean"] > 0
    assert sum(e["skipped_steps"] for e in results["epochs"]) == results["skipped_steps"]
    assert config.parse_config(["--amp", "--device", "cpu"])[0].amp_dtype == "bfloat16"  # --amp alone: bf16


# --------------------------------------------------------------------------- the scaler at work
def test_injected_overflows_skip_exactly_those_updates(demo_data, tmp_path, monkeypatch, low_initial_scale):
    t = float16_trainer(demo_data, tmp_path, flags=["--batch_size", "8"])  # 6 steps an epoch
    poisoned = {1, 4}
    inf_loss_on(monkeypatch, poisoned)
    seen = []
    real_update = t.update.__call__

    def spy(loss, update=True):
        before = [p.detach().clone() for p in t.model.parameters()]
        steps = [s["step"].clone() for s in t.optimizer.state.values()]
        scale = t.scaler.get_scale()
        outcome = real_update(loss, update)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
        same_steps = steps == [s["step"] for s in t.optimizer.state.values()]
        seen.append((unchanged, same_steps, scale, t.scaler.get_scale()))
        return outcome

    t.update = spy
    record = t.train_one_epoch(0)
    assert len(seen) == 6
    for i, (unchanged, same_steps, scale_before, scale_after) in enumerate(seen):
        if i in poisoned:
            assert unchanged and same_steps and scale_after == scale_before / 2, i
        else:
            assert not unchanged and scale_after == scale_before, i
    assert record["skipped_steps"] == 2 and int(t.health.skipped_steps) == 2
    assert record["loss_scale"] == 2.0**8 / 4


def test_skipped_counts_in_results_equal_the_injected_ones(
    run_cli, demo_data, tmp_path, monkeypatch, low_initial_scale
):
    inf_loss_on(monkeypatch, {0, 2, 4})  # 3 steps an epoch: two in epoch 1, one in epoch 2
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "2", *FAST, *FLOAT16)
    assert code == 0, err
    results = read_results(tmp_path / "checkpoints" / "baseline")
    assert [e["skipped_steps"] for e in results["epochs"]] == [2, 1] and results["skipped_steps"] == 3
    assert [e["loss_scale"] for e in results["epochs"]] == [2.0**6, 2.0**5]


def test_the_scale_grows_back_after_growth_interval_clean_steps(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=2))
    t = float16_trainer(demo_data, tmp_path, flags=["--batch_size", "8"])
    inf_loss_on(monkeypatch, {0})
    scales = []
    real_update = t.update.__call__
    t.update = lambda loss, update=True: (real_update(loss, update), scales.append(t.scaler.get_scale()))[0]
    t.train_one_epoch(0)
    s = 2.0**16
    assert scales == [s / 2, s / 2, s, s, 2 * s, 2 * s]  # halved once, then doubled every 2 clean steps


def test_clipping_under_float16_clips_the_true_gradients(demo_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyNet(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    t = float16_trainer(demo_data, tmp_path, optimizer=optimizer, model=model, flags=["--clip_grad_norm", "0.05"])
    captured = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm):
        captured.append([p.grad.detach().clone() for p in parameters])  # unscaled, not yet clipped
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    before = [p.detach().clone() for p in model.parameters()]
    t.update(REAL_LOSS(t.model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])) * 1.0)
    grads = captured[0]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    assert norm > 0.05  # the clip cuts
    expected = [b - g * (0.05 / (norm + 1e-6)) for b, g in zip(before, grads)]  # FP32 clipping, SGD at lr 1
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_accumulating_two_float16_micro_batches_equals_one_batch_of_twice_the_size():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    deltas = []
    for batches in ([(x, y)], [(x[:8], y[:8]), (x[8:], y[8:])]):
        torch.manual_seed(1)
        model = TinyNet(3, batchnorm=False)
        before = [p.detach().clone() for p in model.parameters()]
        update = step.AmpUpdate(torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu"))
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.float16)
        for i, (xb, yb) in enumerate(batches):
            step.training_step(model, xb, yb, autocast, update, len(batches), step=i == len(batches) - 1)
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], deltas[0], rtol=2e-3, atol=1e-5)


# --------------------------------------------------------------------------- divergence, crash, resume
def test_twenty_skipped_steps_in_a_row_stop_the_run_and_keep_last_pt(run_cli, demo_data, tmp_path, monkeypatch):
    inf_loss_on(monkeypatch, set(range(12, 1000)))  # 12 steps an epoch: every step from epoch 2 on
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "3", *FAST, *FLOAT16, "--batch_size", "4")
    assert code == 1 and err.count("\n") == 1, err
    streak = re.search(r"GradScaler skipped the update\) for (\d+) steps in a row", err)
    assert "diverged" in err and streak and int(streak.group(1)) >= 20, err
    last = torch.load(tmp_path / "checkpoints" / "baseline" / "last.pt", weights_only=True)  # whole, and finite
    assert last["epoch"] >= 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert last["skipped_steps"] >= 12


def cli(data, ckdir, name, *flags):
    return main_command(
        data,
        ckdir,
        name,
        *FAST,
        *FLOAT16,
        "--deterministic",
        "--epochs",
        "2",
        "--save_every_steps",
        "1",
        "--batch_size",
        "8",
        "--log_interval",
        "1",
        "--tensorboard",
        *flags,
    )


def run_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.usefixtures("forkserver")
def test_sigkill_and_resume_in_float16_equal_the_uninterrupted_run(demo_data, tmp_path):
    subprocess.run(cli(demo_data, tmp_path, "full"), env=run_env(), check=True, capture_output=True, timeout=300)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        cli(demo_data, tmp_path, "cut"), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # kill it in epoch 2, after some steps
        if (cut / "last.pt").exists() and any(n.endswith(".tmp") for n in os.listdir(cut)):
            results = cut / "results.json"
            if results.exists() and read_results(cut)["epochs"]:
                break
        time.sleep(0.002)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cli(demo_data, tmp_path, "cut", "--resume"), env=run_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()

    full_pt, cut_pt = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in ("full", "cut"))
    for key, value in full_pt["model"].items():
        assert torch.equal(cut_pt["model"][key], value), key
    assert cut_pt["scaler"] == full_pt["scaler"]  # the same loss scale and growth tracker
    strip = lambda run: [{k: v for k, v in e.items() if k not in MEASUREMENT_KEYS} for e in read_results(run)["epochs"]]  # noqa: E731
    assert strip(cut) == strip(tmp_path / "full")
    # TensorBoard: the resumed run appended to the same series, each step exactly once.
    full_tb, cut_tb = (read_tensorboard_scalars(tmp_path / n / "tensorboard") for n in ("full", "cut"))
    for tag in ("step/lr", "step/loss_scale", "step/grad_norm", "step/loss", "epoch/val_acc"):
        full_steps, cut_steps = [s for s, _ in full_tb[tag]], [s for s, _ in cut_tb[tag]]
        assert cut_steps == full_steps and len(set(cut_steps)) == len(cut_steps), tag
        # (NaN where GradScaler skipped the step: the first steps' scale is too high for this model)
        assert [v for _, v in cut_tb[tag]] == pytest.approx([v for _, v in full_tb[tag]], rel=1e-6, nan_ok=True), tag


# --------------------------------------------------------------------------- TensorBoard and the benchmark
def test_tensorboard_holds_the_runs_scalars(run_cli, demo_data, tmp_path):
    code, out, err = run_cli(
        "--data_dir",
        demo_data,
        "--epochs",
        "2",
        *FAST,
        "--tensorboard",
        "--log_interval",
        "2",
        "--amp",
        *SMALL_MODEL,
        "--warmup_epochs",
        "1",
    )
    assert code == 0, err
    run_dir = tmp_path / "checkpoints" / "baseline"
    scalars = read_tensorboard_scalars(run_dir / "tensorboard")
    results = read_results(run_dir)
    # Per step, every --log_interval steps and at each epoch's end (3 steps an epoch): 2, 3, 4, 6.
    assert [s for s, _ in scalars["step/lr"]] == [2, 3, 4, 6]
    # The LR each logged step trained with: step S is the schedule's step S - 1 (0-based).
    assert [v for _, v in scalars["step/lr"]] == pytest.approx(
        [warmup_cosine_lr(s - 1, 2e-3, 6, 3) for s in (2, 3, 4, 6)]
    )
    assert [s for s, _ in scalars["step/images_per_sec"]] == [2, 3, 4, 6]  # from each epoch's start on
    assert "step/loss_scale" not in scalars  # bfloat16: no scaler
    assert all(v > 0 for _, v in scalars["step/grad_norm"])
    # Per epoch, at the step the epoch ended on, the numbers of results.json.
    assert scalars["epoch/val_acc"] == [
        (3, pytest.approx(results["epochs"][0]["val_acc"])),
        (6, pytest.approx(results["epochs"][1]["val_acc"])),
    ]
    assert scalars["test/acc"] == [(6, pytest.approx(results["test_acc"]))]


def test_benchmark_adds_float16_rows_on_the_cpu_only_when_asked(run_cli, tmp_path):
    import json

    flags = [
        "--benchmark",
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--image_size",
        "32",
        "--benchmark_steps",
        "1",
        *SMALL_MODEL,
    ]
    for extra, modes in (
        ([], {"fp32", "amp_bfloat16"}),
        (["--amp_dtype", "float16"], {"fp32", "amp_float16", "amp_bfloat16"}),
    ):
        code, out, err = run_cli(*flags, *extra)
        assert code == 0, err
        rows = json.loads((tmp_path / "checkpoints" / "benchmark" / "benchmark.json").read_text())["rows"]
        assert {r["mode"] for r in rows} == modes
