"""Training through the real CLI on a tiny generated dataset: FP32 and AMP learn, outputs are
complete and loadable, resume continues exactly, clip and accumulation do their job."""

import json

import pytest
import torch
from conftest import FAST, SMALL_MODEL, read_results
from torchvision.models import get_model

from scheduler import warmup_cosine_lr
from step import AmpUpdate


class SimulatedCrash(Exception):
    """A crash that main.py does not handle (as a power cut would not be)."""


RESULT_KEYS = {
    "test_acc",
    "best_val_acc",
    "total_train_seconds",
    "device",
    "amp",
    "amp_dtype",
    "skipped_steps",
    "epochs",
}
EPOCH_KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "checkpoint_seconds",
    "images_per_sec",
    "peak_mem_mb",
}


# The FP32 run trains the default model; the bfloat16 one the small model (see conftest.SMALL_MODEL),
# at an LR it learns at whatever the thread count and CPU (5e-3 ended at 71-87% test accuracy
# across them; 1e-2 at 79-100% in ten runs).
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp_bf16"])
def test_training_learns_and_writes_every_output(demo_data, run_cli, tmp_path, amp):
    name = "amp" if amp else "fp32"
    code, out, err = run_cli(
        "--data_dir",
        demo_data,
        "--checkpoint_name",
        name,
        "--epochs",
        "5",
        *FAST,
        *(["--amp", *SMALL_MODEL, "--learning_rate", "1e-2"] if amp else []),
    )
    assert code == 0, err
    run_dir = tmp_path / "checkpoints" / name
    results = read_results(run_dir)
    assert RESULT_KEYS <= set(results)
    assert results["world_size"] == 1 and "DistributedDataParallel" not in out  # no torchrun: one process
    assert results["amp"] is amp and results["amp_dtype"] == ("bfloat16" if amp else None)
    epochs = results["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 6))
    assert all(EPOCH_KEYS <= set(e) for e in epochs)
    assert all(e["peak_mem_mb"] is None for e in epochs)  # CPU
    assert epochs[-1]["train_loss"] < 0.7 * epochs[0]["train_loss"]  # it learns
    assert results["test_acc"] >= 75  # chance is 33
    assert results["best_val_acc"] == max(e["val_acc"] for e in epochs)

    # Checkpoints: the promised keys, weights_only, and a plain torchvision model takes them.
    for file in ("best.pt", "last.pt"):
        ckpt = torch.load(run_dir / file, weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "class_names", "config"} <= set(ckpt)
        assert ckpt["config"]["model"] == ("shufflenet_v2_x0_5" if amp else "resnet18")
        plain = get_model(ckpt["config"]["model"], num_classes=len(ckpt["class_names"]))
        plain.load_state_dict(ckpt["model"])  # strict: no wrapper prefixes
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 5
    config = json.loads((run_dir / "config.json").read_text())
    assert config["amp"] is amp and config["image_size"] == 32 and config["warmup_epochs"] == 0
    assert "epoch   5/5" in (run_dir / "train.log").read_text()
    assert f"{results['test_acc']:.2f}" in out  # the summary row

    # --evaluate re-tests best.pt and prints the same accuracy.
    code, out, err = run_cli("--data_dir", demo_data, "--checkpoint_name", name, "--evaluate", "--num_workers", "0")
    assert code == 0, err
    assert f"test accuracy {results['test_acc']:.2f}%" in out


def test_resume_continues_at_the_right_epoch_and_lr(demo_data, run_cli, tmp_path, monkeypatch):
    flags = ["--data_dir", demo_data, "--epochs", "4", "--warmup_epochs", "1", *FAST, *SMALL_MODEL]  # 8 epochs: small
    assert run_cli("--checkpoint_name", "full", *flags)[0] == 0
    full = read_results(tmp_path / "checkpoints" / "full")

    # Interrupt a second run after its second epoch, then resume it.
    import trainer

    original = trainer.Trainer.train_one_epoch

    def crash_in_third_epoch(self, epoch):
        if epoch == 2:
            raise SimulatedCrash
        return original(self, epoch)

    monkeypatch.setattr(trainer.Trainer, "train_one_epoch", crash_in_third_epoch)
    with pytest.raises(SimulatedCrash):
        run_cli("--checkpoint_name", "cut", *flags)
    monkeypatch.setattr(trainer.Trainer, "train_one_epoch", original)
    assert torch.load(tmp_path / "checkpoints" / "cut" / "last.pt", weights_only=True)["epoch"] == 2

    # The user renames the run folder before resuming: the run goes on in its new place.
    (tmp_path / "checkpoints" / "cut").rename(tmp_path / "checkpoints" / "moved")
    code, out, err = run_cli("--checkpoint_name", "moved", "--resume", "--data_dir", demo_data, "--no_progress")
    assert code == 0, err
    assert "after epoch 2" in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["full", "moved"]
    cut = read_results(tmp_path / "checkpoints" / "moved")
    assert (
        torch.load(tmp_path / "checkpoints" / "moved" / "last.pt", weights_only=True)["config"]["checkpoint_name"]
        == "moved"
    )
    assert [e["epoch"] for e in cut["epochs"]] == [1, 2, 3, 4]
    for a, b in zip(full["epochs"], cut["epochs"]):
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_acc"] == pytest.approx(b["val_acc"])
    assert cut["test_acc"] == pytest.approx(full["test_acc"])
    # config.json: this session's settings on top, and each session's under "sessions".
    sessions = json.loads((tmp_path / "checkpoints" / "moved" / "config.json").read_text())["sessions"]
    assert [s["from"] for s in sessions] == ["start", "after epoch 2"] and sessions[-1]["device"] == "cpu"


def test_a_stop_after_the_last_partial_batch_of_an_epoch_resumes(demo_data, run_cli, tmp_path, monkeypatch):
    # 48 training images in batches of 20: 20, 20, 8. A stop right after the third batch's save
    # leaves a checkpoint whose epoch has no batches left (skipping 60 of 48 samples).
    flags = [
        "--data_dir",
        demo_data,
        "--epochs",
        "2",
        "--warmup_epochs",
        "0",
        *FAST,
        "--batch_size",
        "20",
        "--save_every_steps",
        "1",
        *SMALL_MODEL,
    ]
    assert run_cli("--checkpoint_name", "full", *flags)[0] == 0
    import trainer

    original = trainer.Trainer.save_checkpoint

    def stop_after_the_epochs_last_batch(self, name):
        original(self, name)
        if self.state.epoch == 0 and self.state.batch_in_epoch == 3:
            raise SimulatedCrash

    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", stop_after_the_epochs_last_batch)
    with pytest.raises(SimulatedCrash):
        run_cli("--checkpoint_name", "cut", *flags)
    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", original)
    code, out, err = run_cli("--checkpoint_name", "cut", "--resume", "--data_dir", demo_data, "--no_progress")
    assert code == 0, err
    full, cut = read_results(tmp_path / "checkpoints" / "full"), read_results(tmp_path / "checkpoints" / "cut")
    for a, b in zip(full["epochs"], cut["epochs"], strict=True):
        assert (a["train_loss"], a["train_acc"], a["val_acc"]) == pytest.approx(
            (b["train_loss"], b["train_acc"], b["val_acc"])
        )


def test_lr_schedule_counts_optimizer_steps_with_accumulation(demo_data, run_cli, tmp_path):
    # 48 training images in batches of 16 -> 3 micro-batches -> 2 optimizer steps an epoch.
    code, _, err = run_cli(
        "--data_dir",
        demo_data,
        "--checkpoint_name",
        "acc",
        "--epochs",
        "2",
        "--warmup_epochs",
        "1",
        "--accum_steps",
        "2",
        *FAST,
    )
    assert code == 0, err
    ckpt = torch.load(tmp_path / "checkpoints" / "acc" / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == 4  # 2 epochs x 2 optimizer steps
    lrs = [e["lr"] for e in read_results(tmp_path / "checkpoints" / "acc")["epochs"]]
    assert lrs == pytest.approx([warmup_cosine_lr(s, 2e-3, 4, 2) for s in (0, 2)])


# --------------------------------------------------------------------------- the update step
def linear_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    return model, x, y


def sgd_update(model, update, batches):
    """The change of all parameters after one AmpUpdate over `batches` (micro-batches)."""
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    for i, (x, y) in enumerate(batches):
        loss = torch.nn.functional.cross_entropy(model(x), y) / len(batches)
        update(loss, update=i == len(batches) - 1)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@pytest.mark.parametrize("scaled", [False, True], ids=["no_scaler", "grad_scaler"])
def test_clipping_bounds_the_true_gradient_norm(scaled):
    model, x, y = linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
    step = sgd_update(model, AmpUpdate(opt, scaler, clip_grad_norm=0.01), [(x, y)])
    # With SGD at lr 1 the step is the clipped gradient: its norm is the clip value, whatever
    # the loss scale (clipping the scaled gradients would give 0.01 / 1024).
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)

    unclipped_model, x, y = linear_problem()
    opt = torch.optim.SGD(unclipped_model.parameters(), lr=1.0)
    step = sgd_update(unclipped_model, AmpUpdate(opt, scaler.__class__("cpu", enabled=False)), [(x, y)])
    assert step.norm().item() > 0.1  # the clip really cut something


def test_accumulated_micro_batches_equal_one_big_batch():
    model_a, x, y = linear_problem()
    model_b, _, _ = linear_problem()
    big = sgd_update(
        model_a,
        AmpUpdate(torch.optim.SGD(model_a.parameters(), lr=0.5), torch.amp.GradScaler("cpu", enabled=False)),
        [(x, y)],
    )
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    small = sgd_update(
        model_b,
        AmpUpdate(torch.optim.SGD(model_b.parameters(), lr=0.5), torch.amp.GradScaler("cpu", enabled=False)),
        halves,
    )
    torch.testing.assert_close(big, small)
    # and without the update on the first micro-batch nothing moved in between:
    model_c, _, _ = linear_problem()
    upd = AmpUpdate(torch.optim.SGD(model_c.parameters(), lr=0.5), torch.amp.GradScaler("cpu", enabled=False))
    w0 = model_c.weight.detach().clone()
    upd(torch.nn.functional.cross_entropy(model_c(x[:4]), y[:4]), update=False)
    assert torch.equal(model_c.weight, w0)


def test_checkpoint_writes_are_timed_apart_from_training(demo_data, run_cli, tmp_path, monkeypatch):
    # Each checkpoint write takes 100 s on a clock the test moves: an epoch's `seconds` (and so its
    # images/s) leave the mid-epoch writes out, `checkpoint_seconds` has them, and
    # `total_train_seconds` has every write, the end-of-epoch best.pt and last.pt included.
    import time

    import trainer

    offset, writes, real_clock, real_save = [0.0], [], time.perf_counter, trainer.atomic_torch_save

    def slow_save(obj, path):
        writes.append("mid" if obj["batch_in_epoch"] else "end")
        offset[0] += 100.0
        return real_save(obj, path)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    monkeypatch.setattr(trainer, "atomic_torch_save", slow_save)
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "2", "--save_every_steps", "1", *FAST, *SMALL_MODEL)
    assert code == 0, err
    results = read_results(tmp_path / "checkpoints" / "baseline")
    mid_writes = writes.count("mid") // 2  # an epoch's writes in its training loop (one a step)
    assert mid_writes >= 1
    for epoch in results["epochs"]:
        assert epoch["seconds"] < 100  # training alone
        assert 100 * mid_writes <= epoch["checkpoint_seconds"] < 100 * mid_writes + 100
        assert epoch["images_per_sec"] > 1
    assert results["total_train_seconds"] >= 100 * len(writes)
