"""The bag of tricks (issue 12) under AMP: optimizers, no weight decay on biases and norms, step
and constant LR schedules, zero-init residual blocks, label smoothing. The pure functions
first, then tiny real runs of the CLI (48 training images in batches of 16: 3 optimizer steps
an epoch), then the refusals and benchmarks/study.sh."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import (
    FAST,
    FORKSERVER,
    ROOT,
    SMALL_MODEL,
    SimulatedCrash,
    assert_user_error,
    crash_in_epoch,
    read_results,
)
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import config
import main as main_module
import step
import utils
from model import build_model, residual_gammas, zero_init_residual
from scheduler import WarmupLR, constant_lr, lr_at_step, step_decay_lr, warmup_cosine_lr
from step import AmpUpdate, build_optimizer, training_step

# The last BatchNorm of each of ResNet-18's 8 BasicBlocks.
RESNET18_LAST_BN = {f"layer{i}.{j}.bn2.weight" for i in range(1, 5) for j in range(2)}


def run_dir(tmp_path, name):
    return tmp_path / "checkpoints" / name


def load(path):
    return torch.load(path, weights_only=True)


def train(run_cli, data, name, *flags):
    code, out, err = run_cli("--data_dir", data, "--checkpoint_name", name, *FAST, *flags)
    assert code == 0, err
    return out


# --------------------------------------------------------------------------- LR schedules: the pure functions
def test_step_decay_drops_by_gamma_at_each_milestone_and_nowhere_else():
    milestones = [30, 60, 90]
    lrs = [step_decay_lr(s, 1.0, 0, milestones, gamma=0.1) for s in range(120)]
    assert [s for s in range(1, 120) if lrs[s] != lrs[s - 1]] == milestones
    # From milestone m on (its step included), the LR is decayed once more.
    for k, m in enumerate(milestones):
        assert lrs[m - 1] == pytest.approx(0.1**k) and lrs[m] == pytest.approx(0.1 ** (k + 1))
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(1e-3)


def test_warmup_then_step_decay():
    lrs = [lr_at_step(s, 2.0, "step", 20, 5, milestones=[10, 15], gamma=0.5) for s in range(20)]
    assert lrs[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])  # the cosine's warmup, to the peak
    assert lrs[5:] == pytest.approx([2.0] * 5 + [1.0] * 5 + [0.5] * 5)


def test_constant_after_warmup():
    assert [lr_at_step(s, 1e-3, "constant", 10, 4) for s in range(10)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 7
    )
    assert constant_lr(0, 1e-3, 0) == 1e-3


def test_cosine_stays_the_default_curve():
    assert [lr_at_step(s, 1e-3, "cosine", 50, 5, min_lr=1e-5) for s in range(50)] == [
        warmup_cosine_lr(s, 1e-3, 50, 5, 1e-5) for s in range(50)
    ]
    with pytest.raises(ValueError, match="linear"):
        lr_at_step(0, 1.0, "linear", 10, 0)


def test_the_scheduler_sets_every_groups_lr_and_resumes_at_a_step():
    def make():
        decay, no_decay = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.SGD(
            [{"params": [decay]}, {"params": [no_decay], "weight_decay": 0.0}], lr=0.1, weight_decay=1e-4
        )
        return optimizer, WarmupLR(optimizer, 12, 2, schedule="step", milestones=[6, 9], gamma=0.1)

    expected = [lr_at_step(s, 0.1, "step", 12, 2, milestones=[6, 9], gamma=0.1) for s in range(12)]
    optimizer, scheduler = make()
    seen = []
    for _ in range(12):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen == [pytest.approx([lr, lr]) for lr in expected]
    # Saved at step 7, loaded into a fresh one: both groups go on at step 7's LR.
    optimizer, scheduler = make()
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(scheduler.state_dict())
    assert [group["lr"] for group in optimizer2.param_groups] == pytest.approx([expected[7]] * 2)
    assert scheduler2.lr_at(9) == pytest.approx(1e-3)


# --------------------------------------------------------------------------- LR schedules: real runs
def test_step_decay_and_constant_in_real_runs(run_cli, demo_data, tmp_path):
    train(
        run_cli,
        demo_data,
        "step",
        "--epochs",
        "3",
        "--warmup_epochs",
        "0",
        "--lr_schedule",
        "step",
        "--lr_milestones",
        "1",
        "2",
        *SMALL_MODEL,
    )
    step = run_dir(tmp_path, "step")
    # results.json's LR of each epoch (its first step): the peak, then 0.1x from each milestone epoch on.
    assert [e["lr"] for e in read_results(step)["epochs"]] == pytest.approx([2e-3, 2e-4, 2e-5])
    last = load(step / "last.pt")
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-5)
    assert last["scheduler"]["milestones"] == [3, 6]  # the epochs in optimizer steps
    cfg = json.loads((step / "config.json").read_text())
    assert (cfg["lr_schedule"], cfg["lr_milestones"], cfg["lr_gamma"], cfg["min_lr"]) == ("step", [1, 2], 0.1, None)

    train(
        run_cli,
        demo_data,
        "constant",
        "--epochs",
        "2",
        "--warmup_epochs",
        "1",
        "--lr_schedule",
        "constant",
        *SMALL_MODEL,
    )
    constant = run_dir(tmp_path, "constant")
    assert [e["lr"] for e in read_results(constant)["epochs"]] == pytest.approx([2e-3 / 3, 2e-3])
    assert load(constant / "last.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-3)  # a cosine: 0
    cfg = json.loads((constant / "config.json").read_text())
    assert (cfg["min_lr"], cfg["lr_milestones"], cfg["lr_gamma"]) == (None, None, None)


# --------------------------------------------------------------------------- optimizers
def the_default_cfg(*flags):
    return config.parse_config(["--device", "cpu", *flags])[0]


def test_the_default_recipe_is_unchanged():
    cfg = the_default_cfg()
    model = build_model(3, pretrained=False)
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["fused"]) == (1e-4, 1e-4, True)
    assert (cfg.lr_schedule, cfg.min_lr, cfg.label_smoothing, cfg.zero_init_residual) == ("cosine", 0.0, 0.0, False)
    assert main_module.build_scheduler(optimizer, cfg, 10).schedule == "cosine"
    # config.json names no setting the run does not use.
    assert (cfg.momentum, cfg.lr_milestones, cfg.lr_gamma) == (None, None, None)
    assert the_default_cfg("--optimizer", "sgd").momentum == 0.9


def test_no_bias_decay_puts_biases_and_norms_in_the_zero_decay_group():
    model = build_model(3, pretrained=False)
    cfg = the_default_cfg("--no_bias_decay", "--weight_decay", "0.05")
    groups = build_optimizer(model, cfg).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    modules = dict(model.named_modules())
    decay, no_decay = ([names[id(p)] for p in group["params"]] for group in groups)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert sorted(decay + no_decay) == sorted(names.values())
    owner = {name: modules[name.rsplit(".", 1)[0]] for name in names.values()}
    assert all(name.endswith(".weight") and isinstance(owner[name], (nn.Conv2d, nn.Linear)) for name in decay)
    assert all(name.endswith(".bias") or isinstance(owner[name], nn.BatchNorm2d) for name in no_decay)
    assert (len(decay), len(no_decay)) == (21, 41)  # 20 convolutions + fc; 20 BatchNorms x 2 + fc.bias


def saved_optimizer_kind(group):
    """Which optimizer a checkpoint's parameter group belongs to."""
    if "momentum" in group:
        return "sgd"
    if "amsgrad" not in group:
        return "radam"
    return "adamw" if group["decoupled_weight_decay"] else "adam"


@pytest.mark.parametrize(
    "name,implementation,state_keys",
    [
        ("adam", "fused", {"step", "exp_avg", "exp_avg_sq"}),
        ("adamw", "fused", {"step", "exp_avg", "exp_avg_sq"}),
        ("radam", "foreach", {"step", "exp_avg", "exp_avg_sq"}),
    ],
)
def test_each_optimizer_trains_and_resumes_its_state(
    run_cli, demo_data, tmp_path, monkeypatch, name, implementation, state_keys
):
    flags = ["--epochs", "2", "--warmup_epochs", "0", "--optimizer", name]
    restore = crash_in_epoch(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        train(run_cli, demo_data, name, *flags)
    restore()
    out = train(run_cli, demo_data, name, "--resume")
    assert "resuming" in out and "after epoch 1" in out
    last = load(run_dir(tmp_path, name) / "last.pt")
    assert last["epoch"] == 2 and last["config"]["optimizer"] == name
    (group,) = last["optimizer"]["param_groups"]
    assert saved_optimizer_kind(group) == name and group[implementation] is True
    states = list(last["optimizer"]["state"].values())
    assert len(states) == 62 and all(set(state) == state_keys for state in states)
    # 2 epochs of 3 steps: the resumed epoch counted on from the first one's state.
    assert all(float(state["step"]) == 6 for state in states)


def test_sgd_with_no_bias_decay_resumes_as_if_never_stopped(run_cli, demo_data, tmp_path, monkeypatch):
    flags = [
        "--epochs",
        "2",
        "--warmup_epochs",
        "0",
        "--optimizer",
        "sgd",
        "--momentum",
        "0.8",
        "--nesterov",
        "--no_bias_decay",
        "--deterministic",
    ]
    train(run_cli, demo_data, "full", *flags)
    restore = crash_in_epoch(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        train(run_cli, demo_data, "cut", *flags)
    restore()
    train(run_cli, demo_data, "cut", "--resume")
    full, cut = (load(run_dir(tmp_path, name) / "last.pt") for name in ("full", "cut"))
    groups = cut["optimizer"]["param_groups"]
    assert [(g["weight_decay"], len(g["params"]), g["momentum"], g["nesterov"], g["fused"]) for g in groups] == [
        (1e-4, 21, 0.8, True, True),
        (0.0, 41, 0.8, True, True),
    ]
    for key, value in full["model"].items():  # the momentum buffers went on from where they were
        torch.testing.assert_close(cut["model"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", config.OPTIMIZERS)
def test_each_optimizer_skips_a_float16_overflow_and_steps_after_it(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    optimizer = build_optimizer(
        model, the_default_cfg("--optimizer", name, "--no_bias_decay", "--learning_rate", "0.1")
    )
    update = AmpUpdate(optimizer, torch.amp.GradScaler("cpu"))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    assert bool(update(F.cross_entropy(model(x), y) * float("inf")).skipped)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not bool(update(F.cross_entropy(model(x), y)).skipped)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# --------------------------------------------------------------------------- zero-init residual blocks
def test_zero_init_residual_of_a_random_init_is_torchvisions():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.manual_seed(0)
    ours = build_model(3, pretrained=False, zero_residual=True).state_dict()
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=3, zero_init_residual=True).state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert {key for key in plain if not torch.equal(plain[key], ours[key])} == RESNET18_LAST_BN
    # Bottleneck blocks (ResNet-50 and up) zero their third BatchNorm.
    torch.manual_seed(0)
    bottlenecks = zero_init_residual(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3))
    torch.manual_seed(0)
    expected = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3, zero_init_residual=True)
    assert sorted(residual_gammas(bottlenecks)) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert all(torch.equal(a, b) for a, b in zip(bottlenecks.state_dict().values(), expected.state_dict().values()))


def test_zero_init_residual_after_loading_pretrained_weights(run_cli, demo_data, tmp_path, monkeypatch):
    torch.manual_seed(5)
    weights = torchvision.models.resnet18().state_dict()
    for key in weights:
        if ".bn" in key and key.endswith(".weight"):
            weights[key] = torch.rand_like(weights[key]) + 0.5  # trained-looking: no BatchNorm weight 0 or 1
    torch.save(weights, tmp_path / "weights.pth")
    initial = []
    real_build_model = main_module.build_model

    def build_model_spy(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        initial.append({key: value.clone() for key, value in model.state_dict().items()})
        return model

    monkeypatch.setattr(main_module, "build_model", build_model_spy)
    flags = [flag for flag in FAST if flag != "--no_pretrained"]
    code, out, err = run_cli(
        "--data_dir",
        demo_data,
        "--checkpoint_name",
        "zero",
        "--epochs",
        "1",
        *flags,
        "--pretrained_path",
        tmp_path / "weights.pth",
        "--zero_init_residual",
    )
    assert code == 0, err
    assert "zeroed the last BatchNorm weight of 8 residual blocks" in out
    (start,) = initial
    changed = {key for key in weights if not key.startswith("fc.") and not torch.equal(weights[key], start[key])}
    assert changed == RESNET18_LAST_BN  # exactly these, after loading, and nothing else
    assert all((start[key] == 0).all() for key in RESNET18_LAST_BN)


def test_zero_init_residual_says_so_when_there_are_no_residual_blocks(capsys):
    utils.setup_logging()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    zero_init_residual(model)
    out = capsys.readouterr().out
    assert out.startswith("--zero_init_residual: Sequential has no ResNet residual blocks") and out.endswith(
        "nothing to zero\n"
    )
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


# --------------------------------------------------------------------------- label smoothing
def test_label_smoothing_raises_the_loss_of_a_perfect_prediction():
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    targets = torch.tensor([0, 1])

    def loss(eps):
        return float(
            training_step(
                lambda images: logits,
                None,
                targets,
                contextlib.nullcontext,
                lambda loss, step: None,
                label_smoothing=eps,
            )[0]
        )

    assert loss(0.0) < 1e-6
    # Smoothed targets put eps/3 on each class: the confident logits now cost 0.1 * (0 + 20 + 20) / 3.
    assert loss(0.1) == pytest.approx(0.1 * 40 / 3, rel=1e-4)


def test_label_smoothing_is_on_the_training_loss_only(run_cli, demo_data, tmp_path, monkeypatch):
    calls = []
    real_loss = step.F.cross_entropy

    def cross_entropy(logits, targets, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs.get("label_smoothing", 0.0)))
        return real_loss(logits, targets, *args, **kwargs)

    monkeypatch.setattr(step.F, "cross_entropy", cross_entropy)
    train(run_cli, demo_data, "smooth", "--epochs", "1", "--label_smoothing", "0.1")
    # 3 training batches with smoothing; validation (1 batch) and the test (2) plain.
    assert calls == [(True, 0.1)] * 3 + [(False, 0.0)] * 3
    assert json.loads((run_dir(tmp_path, "smooth") / "config.json").read_text())["label_smoothing"] == 0.1


# --------------------------------------------------------------------------- resume and refusals
def test_a_run_from_before_these_flags_resumes_with_adam_and_the_cosine():
    cfg, explicit = config.parse_config(["--resume", "--device", "cpu"])
    new = {
        "optimizer",
        "momentum",
        "nesterov",
        "no_bias_decay",
        "lr_schedule",
        "lr_milestones",
        "lr_gamma",
        "zero_init_residual",
        "label_smoothing",
    }
    saved = {key: value for key, value in vars(cfg).items() if key not in new}
    merged = config.merge_resumed(saved, cfg, explicit)
    assert (merged.optimizer, merged.lr_schedule, merged.momentum, merged.label_smoothing) == (
        "adam",
        "cosine",
        None,
        0,
    )
    cfg, explicit = config.parse_config(["--resume", "--device", "cpu", "--optimizer", "sgd"])
    with pytest.raises(utils.UserError, match="trained with --optimizer adam, not with --optimizer sgd"):
        config.merge_resumed(saved, cfg, explicit)
    cfg, explicit = config.parse_config(
        ["--resume", "--device", "cpu", "--lr_schedule", "step", "--lr_milestones", "20"]
    )
    with pytest.raises(utils.UserError, match="trained without --lr_milestones, not with --lr_milestones 20"):
        config.merge_resumed(saved, cfg, explicit)


def test_a_run_saved_with_a_milestone_at_its_last_epoch_still_resumes():
    # Such a milestone never applied (refused for new runs now); a run saved before that goes on.
    cfg, explicit = config.parse_config(["--resume", "--device", "cpu"])
    saved = {**vars(cfg), "epochs": 2, "warmup_epochs": 0, "lr_schedule": "step", "lr_milestones": [2], "lr_gamma": 0.1}
    assert config.merge_resumed(saved, cfg, explicit).lr_milestones == [2]
    with pytest.raises(utils.UserError, match="--lr_milestones 2 would never apply"):
        config.parse_config(
            [
                "--device",
                "cpu",
                "--epochs",
                "2",
                "--warmup_epochs",
                "0",
                "--lr_schedule",
                "step",
                "--lr_milestones",
                "2",
            ]
        )


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--optimizer", "lion"], ("--optimizer", "lion")),
        (["--momentum", "0.5"], ("--momentum", "--optimizer sgd", "not --optimizer adam")),
        (["--optimizer", "adamw", "--nesterov"], ("--nesterov", "--optimizer sgd")),
        (["--optimizer", "sgd", "--momentum", "1"], ("--momentum", "below 1")),
        (["--optimizer", "sgd", "--momentum", "0", "--nesterov"], ("--nesterov", "--momentum")),
        (["--no_bias_decay", "--weight_decay", "0"], ("--no_bias_decay", "--weight_decay 0")),
        (["--lr_schedule", "step", "--lr_milestones", "5", "3"], ("--lr_milestones", "increase", "5 3")),
        (["--lr_schedule", "step", "--epochs", "3", "--lr_milestones", "99"], ("--lr_milestones 99", "--epochs 3")),
        (["--lr_schedule", "step", "--epochs", "3", "--lr_milestones", "0"], ("--lr_milestones 0", "from 1 to 2")),
        (
            ["--lr_schedule", "step", "--epochs", "9", "--warmup_epochs", "2", "--lr_milestones", "1"],
            ("--lr_milestones 1", "--warmup_epochs 2"),
        ),
        (["--lr_schedule", "step"], ("--lr_schedule step", "--lr_milestones")),
        (["--lr_milestones", "30"], ("--lr_milestones", "--lr_schedule step")),
        (["--lr_gamma", "0.5"], ("--lr_gamma", "--lr_schedule step")),
        (["--lr_schedule", "step", "--lr_milestones", "30", "--lr_gamma", "0"], ("--lr_gamma",)),
        (["--lr_schedule", "constant", "--min_lr", "1e-6"], ("--min_lr", "--lr_schedule cosine")),
        (["--label_smoothing", "1"], ("--label_smoothing", "below 1")),
        (["--label_smoothing", "-0.1"], ("--label_smoothing",)),
        (["--label_smoothing", "nan"], ("--label_smoothing", "finite")),
    ],
)
def test_bad_values_are_refused_in_one_line(run_cli, tmp_path, flags, needles):
    assert_user_error(run_cli("--data_dir", tmp_path / "no_data", *FAST, *flags), *needles)
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(autouse=True)
def drop_runs(tmp_path):
    """Each test's run folders (~130 MB a run) go as soon as it ends."""
    yield
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)


# --------------------------------------------------------------------------- the study script
@pytest.mark.usefixtures("forkserver")
def test_the_study_script_runs_the_chosen_ablation_and_compares_it(demo_data, tmp_path):
    script = os.path.join(ROOT, "benchmarks", "study.sh")
    # The script's `python main.py ...` through the fork server: a `python` first on its PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FORKSERVER}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RUNS": "baseline smoothing",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    # (--output: timm's name for --checkpoint_dir, which the script also reads for its table)
    flags = ["--data_dir", demo_data, "--output", str(tmp_path), *FAST, *SMALL_MODEL, "--epochs", "1"]
    done = subprocess.run(["bash", script, *flags], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    configs = {
        name: json.loads((tmp_path / name / "config.json").read_text())
        for name in ("study_baseline", "study_smoothing")
    }
    assert (configs["study_baseline"]["lr_schedule"], configs["study_baseline"]["warmup_epochs"]) == ("constant", 0)
    assert (configs["study_smoothing"]["lr_schedule"], configs["study_smoothing"]["label_smoothing"]) == ("cosine", 0.1)
    table = (tmp_path / "compare_study_baseline_vs_study_smoothing.md").read_text()  # in the given --checkpoint_dir
    assert "| study_baseline |" in table and "| study_smoothing |" in table and "- label_smoothing: 0.0" in table
    shutil.rmtree(tmp_path / "study_baseline"), shutil.rmtree(tmp_path / "study_smoothing")
    # SEEDS: each run once per seed, named <run>_s<seed>, and --compare groups the seeds.
    done = subprocess.run(
        ["bash", script, *flags],
        env={**env, "RUNS": "cosine", "SEEDS": "1 2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads((tmp_path / f"study_cosine_s{s}" / "config.json").read_text())["seed"] for s in (1, 2)] == [1, 2]
    assert "| study_cosine_s1, study_cosine_s2 | FP32 | 2 | 1 2 |" in done.stdout  # the seed group
    shutil.rmtree(tmp_path / "study_cosine_s1"), shutil.rmtree(tmp_path / "study_cosine_s2")
    refused = subprocess.run(
        ["bash", script, *flags, "--seed", "3"], env={**env, "SEEDS": "1 2"}, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "drop --seed" in refused.stderr
    refused = subprocess.run(
        ["bash", script, *flags], env={**env, "SEEDS": "1 1"}, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "SEEDS names 1 twice" in refused.stderr
    # A run it does not know stops it before anything trains.
    refused = subprocess.run(
        ["bash", script, *flags], env={**env, "RUNS": "cosine typo"}, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "unknown run typo" in refused.stderr
    assert not (tmp_path / "study_cosine").exists()
