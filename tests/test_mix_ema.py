"""Mixup, cutmix and the EMA of the weights (issue 12, items 7 and 8): the soft targets and their
replay from the seed, the EMA's formula and its place after the float16 skip guard, with
accumulation, then tiny real runs of the CLI (48 training images in batches of 16: 3 optimizer
steps an epoch): a run SIGKILLed mid-epoch (with --auto_augment too) resumes to the uninterrupted run's weights and EMA bit for
bit, best.pt says which weights it holds and --evaluate reproduces its test accuracy."""

import os
import shutil
import signal
import subprocess
from argparse import Namespace

import pytest
import torch
import torchvision
from conftest import FAST, PYTHON, ROOT, SMALL_MODEL, assert_user_error, read_results
from test_float16 import float16_trainer

import trainer
import utils
from outputs import MEASUREMENT_KEYS
from report import read_tensorboard_scalars
from step import MIX_SEED_TAG, BatchMix, WeightEMA

# The tricks the resumed run is checked with (a flag added here joins every run of that test).
RESUMED_TRICKS = [
    "--mixup_alpha",
    "0.4",
    "--cutmix_alpha",
    "1.0",
    "--ema_decay",
    "0.6",
    "--auto_augment",
    "randaugment",
]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # each image's class differs from the one before it (rolled in)


def load(path):
    return torch.load(path, weights_only=True)


def run_dir(tmp_path, name):
    return tmp_path / "checkpoints" / name


def train(run_cli, data, name, *flags):
    code, out, err = run_cli("--data_dir", data, "--checkpoint_name", name, *FAST, *flags)
    assert code == 0, err
    return out


@pytest.fixture(autouse=True)
def drop_runs(tmp_path):
    """Each test's run folders (~130 MB a run) go as soon as it ends."""
    yield
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)


# --------------------------------------------------------------------------- mixup and cutmix
@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_are_the_images_shares_sum_to_1_and_replay_from_the_seed(mixup, cutmix):
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    mix = BatchMix(3, mixup, cutmix)
    rng_before = torch.get_rng_state()
    mixed, targets = mix(images, LABELS, seed=1234)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's own random numbers are untouched
    assert targets.shape == (8, 3) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    own = targets[torch.arange(8), LABELS]  # each image's share of itself
    rolled_in = targets[torch.arange(8), LABELS.roll(1)]  # and of the image before it
    torch.testing.assert_close(own + rolled_in, torch.ones(8))
    assert ((own > 0) & (own < 1)).all()  # soft: two classes in every row
    if is_cutmix(mixed, images):  # a box of the image before, whose area is its share
        pasted = (mixed != images).flatten(1).float().mean(dim=1)
        torch.testing.assert_close(pasted, rolled_in, atol=1e-6, rtol=0)
    else:  # mixup: every pixel is own * image + (1 - own) * the one before
        own_ = own.view(-1, 1, 1, 1)
        torch.testing.assert_close(mixed, own_ * images + (1 - own_) * images.roll(1, 0))
    # The dominant class (what train accuracy counts) is the one with the larger share.
    assert torch.equal(targets.argmax(dim=1), torch.where(own >= rolled_in, LABELS, LABELS.roll(1)))
    # Replayed from the same seed; another seed (another batch or epoch) mixes otherwise.
    again = mix(images, LABELS, seed=1234)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)
    assert not torch.equal(mix(images, LABELS, seed=1235)[1], targets)


def is_cutmix(mixed, images):
    """Whether every pixel is the image's own or the one's before it (not a blend of the two)."""
    return bool(((mixed == images) | (mixed == images.roll(1, 0))).all())


def test_both_alphas_mix_each_batch_one_way_or_the_other():
    images, mix = torch.rand(8, 3, 16, 16), BatchMix(3, 0.4, 1.0)
    kinds = {is_cutmix(mix(images, LABELS, seed)[0], images) for seed in range(20)}
    assert kinds == {True, False}
    assert BatchMix.from_config(Namespace(mixup_alpha=0.0, cutmix_alpha=0.0), 3) is None  # off: class indices


def test_the_training_loop_mixes_each_micro_batch_with_its_own_seed(demo_data, tmp_path, monkeypatch):
    # float16 (GradScaler) + --accum_steps 2 + mixup: 3 micro-batches, 2 optimizer steps.
    t = float16_trainer(demo_data, tmp_path, flags=["--mixup_alpha", "0.4", "--accum_steps", "2", "--ema_decay", "0.9"])
    seen, real_update, real_step, real_mix, seeds = (
        [],
        trainer.ClassificationMeter.update,
        trainer.training_step,
        t.mix,
        [],
    )

    def spy_step(model, images, targets, *args):
        seen.append({"targets": targets})
        return real_step(model, images, targets, *args)

    def spy_meter(self, loss, logits, labels):
        seen[-1]["labels"] = labels
        return real_update(self, loss, logits, labels)

    monkeypatch.setattr(trainer, "training_step", spy_step)
    monkeypatch.setattr(trainer.ClassificationMeter, "update", spy_meter)
    t.mix = lambda images, labels, seed: (seeds.append(seed), real_mix(images, labels, seed))[1]
    record = t.train_one_epoch(0)
    assert len(seen) == 3 and t.scheduler.last_epoch == 2 and int(t.ema.n_averaged) == 2
    assert seeds == [
        utils.derived_seed(t.cfg.seed, 0, i, 0, MIX_SEED_TAG) for i in range(3)
    ]  # (seed, epoch, batch, rank)
    for batch in seen:
        targets = batch["targets"]
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(targets)))
        assert torch.equal(batch["labels"], targets.argmax(dim=1))  # train accuracy counts the dominant class
    assert torch.isfinite(torch.tensor(record["train_loss"])) and 0 <= record["train_acc"] <= 100


# --------------------------------------------------------------------------- the EMA
def test_the_ema_copies_the_first_step_and_then_follows_the_formula(demo_data, tmp_path, monkeypatch):
    decay = 0.75
    t = float16_trainer(demo_data, tmp_path, flags=["--ema_decay", str(decay), "--batch_size", "24"])  # 2 steps
    after_step = []  # the model's weights and buffers after each optimizer step, as the EMA sees them
    real_schedule = t.scheduler.step

    def snapshot():
        real_schedule()
        after_step.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})

    monkeypatch.setattr(t.scheduler, "step", snapshot)
    t.train_one_epoch(0)
    w1, w2 = after_step
    assert int(t.ema.n_averaged) == 2 and int(t.health.skipped_steps) == 0
    for key, value in t.ema.module.state_dict().items():
        if value.is_floating_point():  # weights and BatchNorm statistics: decay * w1 + (1 - decay) * w2
            assert not torch.equal(w1[key], w2[key]), key  # (the step changed it)
            torch.testing.assert_close(value, decay * w1[key] + (1 - decay) * w2[key], rtol=1e-6, atol=1e-7)
        else:  # BatchNorm's step counters: the model's own count, not averaged
            assert torch.equal(value, w2[key]), key
    # After one step the EMA is the weights themselves.
    one = WeightEMA(t.model, decay)
    one.update_parameters(t.model)
    for key, value in one.module.state_dict().items():
        assert torch.equal(value, t.model.state_dict()[key]), key


def test_a_skipped_float16_step_does_not_poison_the_ema(demo_data, tmp_path):
    t = float16_trainer(demo_data, tmp_path, flags=["--ema_decay", "0.5", "--mixup_alpha", "0.4"])
    real_transform, batches = t.transform, []

    def overflow_on_second_batch(images, flip_seed=None):
        x = real_transform(images, flip_seed)
        batches.append(1)
        if len(batches) == 2:  # inf in the forward: it reaches BatchNorm's statistics and the loss
            x[:, 0, 0, 0] = float("inf")
        return x

    t.transform = overflow_on_second_batch
    t.train_one_epoch(0)
    assert int(t.health.skipped_steps) == 1 and int(t.ema.n_averaged) == 3  # (a skipped step counts: weights unchanged)
    for name, value in t.ema.module.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
    t.transform = real_transform
    assert torch.isfinite(torch.tensor(t.evaluate(t.val_loader, t.ema.module)["loss"]))


# --------------------------------------------------------------------------- real runs
def probe(data, tmp_path, name, *flags, kill_after_step=None):
    """A run of main.py (through tests/crash_probe.py) in its own process; with `kill_after_step`
    it SIGKILLs itself right after that optimizer step."""
    command = [
        *PYTHON,
        os.path.join(ROOT, "tests", "crash_probe.py"),
        "--data_dir",
        data,
        "--checkpoint_dir",
        str(tmp_path / "checkpoints"),
        "--checkpoint_name",
        name,
        *FAST,
        *flags,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        **({"PROBE_KILL_AFTER_STEP": str(kill_after_step)} if kill_after_step else {}),
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.usefixtures("forkserver")
def test_a_run_sigkilled_mid_epoch_resumes_to_the_same_weights_and_ema(run_cli, demo_data, tmp_path):
    # last.pt is written after step 4 (epoch 2's first); the SIGKILL after step 5 loses a step
    # that the resumed run must augment (in two workers), mix and average again exactly as the
    # uninterrupted one did. (Every run in its own process: the same threads, the same bits. The
    # small model: three processes of ResNet-18 made this one of the suite's slowest tests.)
    flags = [
        "--epochs",
        "2",
        "--deterministic",
        "--save_every_steps",
        "2",
        "--num_workers",
        "2",
        *RESUMED_TRICKS,
        *SMALL_MODEL,
    ]
    assert probe(demo_data, tmp_path, "full", *flags).returncode == 0
    killed = probe(demo_data, tmp_path, "cut", *flags, kill_after_step=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cut = load(run_dir(tmp_path, "cut") / "last.pt")
    assert (cut["epoch"], cut["batch_in_epoch"], int(cut["ema"]["n_averaged"])) == (1, 1, 4)
    resumed = probe(demo_data, tmp_path, "cut", "--resume", "--num_workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming cut: epoch 2, after batch 1 of 3" in resumed.stdout
    full, cut = (load(run_dir(tmp_path, name) / "last.pt") for name in ("full", "cut"))
    for part in ("model", "ema"):  # bit for bit
        assert full[part].keys() == cut[part].keys()
        for key, value in full[part].items():
            assert torch.equal(cut[part][key], value), (part, key)
    strip = lambda run: [{k: v for k, v in e.items() if k not in MEASUREMENT_KEYS} for e in read_results(run)["epochs"]]  # noqa: E731
    assert strip(run_dir(tmp_path, "cut")) == strip(run_dir(tmp_path, "full"))

    # best.pt: the better weights of the best epoch, loadable by a plain torchvision model, and
    # --evaluate tests what it holds.
    results = read_results(run_dir(tmp_path, "full"))
    best = load(run_dir(tmp_path, "full") / "best.pt")
    epoch = results["epochs"][best["epoch"] - 1]
    assert best["weights"] == results["best_weights"] == ("ema" if epoch["val_acc_ema"] > epoch["val_acc"] else "raw")
    assert results["best_val_acc"] == max(epoch["val_acc"], epoch["val_acc_ema"])
    ema_weights = {k.removeprefix("module."): v for k, v in best["ema"].items() if k != "n_averaged"}
    assert all(torch.equal(ema_weights[k], v) for k, v in best["model"].items()) == (best["weights"] == "ema")
    torchvision.models.get_model(SMALL_MODEL[1], num_classes=3).load_state_dict(best["model"])  # strict
    assert all(0 <= results[key] <= 100 for key in ("test_acc", "test_acc_ema"))
    code, out, err = run_cli(
        "--data_dir", demo_data, "--checkpoint_name", "full", "--evaluate", "--device", "cpu", "--num_workers", "0"
    )
    assert code == 0, err
    assert f"test accuracy {results['test_acc']:.2f}%" in out
    assert ("EMA weights" in out) == (best["weights"] == "ema")


def test_best_pt_holds_the_ema_when_it_validates_better(run_cli, demo_data, tmp_path, monkeypatch):
    real_evaluate = trainer.Trainer.evaluate

    def ema_validates_better(self, loader, model=None, **kwargs):
        numbers = real_evaluate(self, loader, model, **kwargs)
        if loader is self.val_loader and model is self.ema.module:
            numbers["acc"] = 101.0  # (better than any raw accuracy)
        return numbers

    monkeypatch.setattr(trainer.Trainer, "evaluate", ema_validates_better)
    out = train(run_cli, demo_data, "ema", "--epochs", "1", "--ema_decay", "0.5", "--tensorboard")
    monkeypatch.undo()
    best, results = load(run_dir(tmp_path, "ema") / "best.pt"), read_results(run_dir(tmp_path, "ema"))
    assert best["weights"] == results["best_weights"] == "ema" and results["best_val_acc"] == 101.0
    for key, value in best["model"].items():
        assert torch.equal(value, best["ema"][f"module.{key}"]), key
    assert results["test_acc"] == results["test_acc_ema"]
    assert "test accuracy of the best-validation model (epoch 1, EMA weights)" in out
    code, out, err = run_cli(
        "--data_dir", demo_data, "--checkpoint_name", "ema", "--evaluate", "--device", "cpu", "--num_workers", "0"
    )
    assert code == 0, err
    assert f"ema (epoch 1, EMA weights, FP32): test accuracy {results['test_acc']:.2f}%" in out
    scalars = read_tensorboard_scalars(run_dir(tmp_path, "ema") / "tensorboard")
    assert [v for _, v in scalars["epoch/val_acc_ema"]] == [101.0]


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--mixup_alpha", "-0.2"], ("--mixup_alpha", "at least 0")),
        (["--cutmix_alpha", "inf"], ("--cutmix_alpha", "finite")),
        (["--ema_decay", "1"], ("--ema_decay", "between 0 and 1")),
        (["--ema_decay", "0"], ("--ema_decay", "between 0 and 1")),
        (["--ema_decay", "nan"], ("--ema_decay", "finite")),
    ],
)
def test_bad_values_are_refused_in_one_line(run_cli, tmp_path, flags, needles):
    assert_user_error(run_cli("--data_dir", tmp_path / "no_data", *FAST, *flags), *needles)
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_without_the_ema_of_its_ema_decay_is_refused_in_one_line(demo_data, tmp_path):
    t = float16_trainer(demo_data, tmp_path, flags=["--ema_decay", "0.5"])
    checkpoint = t.checkpoint()
    del checkpoint["ema"]  # (no run of ours writes this: a foreign or hand-edited file)
    with pytest.raises(utils.UserError, match="has no EMA weights for its --ema_decay"):
        t.restore(checkpoint)
