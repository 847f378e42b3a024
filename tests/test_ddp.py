"""DistributedDataParallel under torchrun, on the CPU with gloo: two processes through the real CLI
on a tiny dataset. One two-epoch run (with AMP, accumulation, clipping, mixup and an EMA of the
weights) serves several tests;
tests/ddp_probe.py is main.py plus hooks that let every rank dump its weights, send torchrun a
SIGTERM, or crash a rank. Each torchrun start costs seconds, so there are few of them."""

import csv
import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST, FORKSERVER, PYTHON, ROOT, SMALL_MODEL, make_colour_dataset, read_results
from torch import nn
from torchvision.models import resnet18

import config
import distributed
import main as main_module
import utils
from dataset import EpochSampler, build_loaders
from distributed import wrap_ddp
from scheduler import WarmupCosineLR
from trainer import Trainer
from utils import UserError, setup_logging

pytestmark = pytest.mark.usefixtures("forkserver")  # torchrun and its workers are forked from it
TORCHRUN = [*PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
PROBE = os.path.join(ROOT, "tests", "ddp_probe.py")
MAIN = os.path.join(ROOT, "main.py")
# 45 train / 15 val / 21 test images: odd counts, so a rank's shard is padded (train) or one
# image shorter (val, test); the global batch of 16 is 8 a rank.
DDP_FLAGS = [
    *FAST,
    "--epochs",
    "2",
    "--val_fraction",
    "0.25",
    "--amp",
    "--accum_steps",
    "2",
    "--clip_grad_norm",
    "1",
    "--mixup_alpha",
    "0.2",
    "--ema_decay",
    "0.5",
]
RUN_FILES = set(main_module.RUN_FILES) - {"predictions.csv"}  # written by --predict only
TIME_LIMIT = 60  # seconds a failed two-process start may take, well past its normal ~15 s


def torchrun(script, *flags, env=None, timeout=180):
    """(completed process, seconds) of `torchrun --nproc_per_node 2 script flags` (torchrun and
    its workers through the fork server, where the test uses it)."""
    # One thread a process: two ranks on two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    started = time.monotonic()
    proc = subprocess.run(
        [*TORCHRUN, FORKSERVER, script, *map(str, flags)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - started


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    root = make_colour_dataset(tmp_path_factory.mktemp("ddp_colours"), test_per_class=7)
    # Two mislabelled test images keep the test accuracy below 100%, so comparing it with
    # --evaluate's also checks that both counted the same images.
    test_dir = os.path.join(root, "seg_test", "seg_test")
    for i in range(2):
        os.rename(os.path.join(test_dir, "red", f"{i}.jpg"), os.path.join(test_dir, "blue", f"red{i}.jpg"))
    return root


@pytest.fixture(scope="module")
def ddp_run(ddp_data, tmp_path_factory):
    """One two-process run through the probe: its paths and completed process."""
    base = tmp_path_factory.mktemp("ddp_run")
    run = SimpleNamespace(data=ddp_data, checkpoints=base / "checkpoints", name="ddp", dumps=base / "dumps")
    run.dir = run.checkpoints / run.name
    run.dumps.mkdir()
    run.proc, run.seconds = torchrun(
        PROBE,
        "--data_dir",
        ddp_data,
        "--checkpoint_dir",
        run.checkpoints,
        "--checkpoint_name",
        run.name,
        *DDP_FLAGS,
        env={"PROBE_DUMP_DIR": str(run.dumps)},
    )
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    return run


def load(path):
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------- two processes, real CLI
def test_ddp_run_completes_with_one_set_of_outputs(ddp_run):
    out = ddp_run.proc.stdout
    assert "DistributedDataParallel: 2 processes (gloo), 8 images each per micro-batch" in out
    # Only rank 0 logs, prints and writes: each line once, one run folder with one set of files.
    for line in ("epoch   1/2", "epoch   2/2", "test accuracy of the best-validation model", "| ddp |"):
        assert out.count(line) == 1, out
    assert os.listdir(ddp_run.checkpoints) == [ddp_run.name]
    assert set(os.listdir(ddp_run.dir)) == RUN_FILES
    results = read_results(ddp_run.dir)
    assert results["finished"] and results["world_size"] == 2
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]
    # 45 images, 8 a rank and micro-batch: 3 micro-batches a rank, 2 optimizer steps an epoch with
    # --accum_steps 2, the same schedule as one process with batch 16.
    assert load(ddp_run.dir / "last.pt")["scheduler"]["last_epoch"] == 4
    # Checkpoints hold the unwrapped model: strict loading into a plain resnet18, no `module.`.
    for file in ("best.pt", "last.pt"):
        state = load(ddp_run.dir / file)["model"]
        assert not any(key.startswith("module.") for key in state)
        resnet18(num_classes=3).load_state_dict(state)


def test_ddp_ranks_end_with_identical_weights(ddp_run):
    last = load(ddp_run.dir / "last.pt")
    # The trained weights, and the EMA of them (each rank mixed its own share of the batches).
    for dump, saved in (("rank{}.pt", last["model"]), ("ema_rank{}.pt", last["ema"])):
        rank0, rank1 = (load(ddp_run.dumps / dump.format(r)) for r in (0, 1))
        assert rank0.keys() == rank1.keys() == saved.keys()
        for key, value in rank0.items():  # parameters and BatchNorm statistics, bit for bit
            assert torch.equal(value, rank1[key]), key
            assert torch.equal(value, saved[key]), key
    assert int(last["ema"]["n_averaged"]) == 4  # one update per optimizer step


def read_test_predictions(run_dir):
    with open(run_dir / "test_predictions.csv", newline="") as f:
        return [(r["file"], r["true_label"], r["predicted_label"]) for r in csv.DictReader(f)]


def test_ddp_test_accuracy_equals_single_process_evaluate(ddp_run, run_cli):
    results = read_results(ddp_run.dir)
    assert 50 < results["test_acc"] < 100  # learned, and the mislabelled images count
    # The ranks' shares of the test predictions gathered: each of the 21 images once, as test_acc counted them.
    gathered = read_test_predictions(ddp_run.dir)
    assert len(gathered) == len({file for file, _, _ in gathered}) == 21
    assert 100 * sum(true == predicted for _, true, predicted in gathered) / 21 == pytest.approx(results["test_acc"])
    code, out, err = run_cli(
        "--data_dir",
        ddp_run.data,
        "--checkpoint_name",
        ddp_run.name,
        "--evaluate",
        *FAST,
        checkpoint_dir=ddp_run.checkpoints,
    )
    assert code == 0, err
    assert f"test accuracy {results['test_acc']:.2f}% on 21 images, test loss {results['test_loss']:.4f}" in out, (
        out,
        results["test_acc"],
        results["test_loss"],
    )
    assert read_test_predictions(ddp_run.dir) == gathered  # one process, the same answers image by image


def test_ddp_sigterm_stops_every_rank_and_resume_ends_with_the_same_weights(ddp_run, tmp_path):
    # SIGTERM to torchrun after step 3 (of 4), as a cluster preempting the job: torchrun hands it
    # to both ranks, which may see it a step apart, agree on a step, save and exit.
    cut_dir = tmp_path / "checkpoints" / ddp_run.name
    flags = ["--data_dir", ddp_run.data, "--checkpoint_dir", cut_dir.parent, "--checkpoint_name", ddp_run.name]
    proc, seconds = torchrun(PROBE, *flags, *DDP_FLAGS, env={"PROBE_SIGTERM_STEP": "3"})
    assert proc.returncode != 0 and seconds < TIME_LIMIT
    assert proc.stderr.count("SIGTERM: saved") == 1, proc.stderr[-3000:]  # rank 0 says it, once
    assert "continue with: torchrun [the same options] main.py" in proc.stderr
    stopped = load(cut_dir / "last.pt")
    assert (stopped["epoch"], stopped["scheduler"]["last_epoch"]) in ((1, 3), (1, 4))  # inside epoch 2
    assert not read_results(cut_dir)["finished"]

    proc, _ = torchrun(MAIN, "--resume", *flags, "--num_workers", "0", "--no_progress", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"resuming {ddp_run.name}: epoch 2, after batch") == 1
    full, cut = read_results(ddp_run.dir), read_results(cut_dir)
    assert [e["epoch"] for e in cut["epochs"]] == [1, 2] and cut["finished"]
    for a, b in zip(full["epochs"], cut["epochs"]):
        assert a["lr"] == b["lr"] and a["val_acc"] == b["val_acc"]
        # Epoch 2's sums over both ranks were saved mid-epoch and continued: counted once.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["train_acc"] == b["train_acc"]
    assert cut["test_acc"] == full["test_acc"]
    full_pt, cut_pt = load(ddp_run.dir / "last.pt"), load(cut_dir / "last.pt")
    for part in ("model", "ema"):  # the same weights and EMA, bit for bit
        for key, value in full_pt[part].items():
            assert torch.equal(cut_pt[part][key], value), (part, key)


def test_ddp_ranks_agree_on_stopping_once_per_log_interval_at_the_same_step(ddp_data, tmp_path):
    # 45 train images, 2 a rank and micro-batch: 11 optimizer steps an epoch (each rank's odd 23rd
    # image is dropped). The stop agreement (a collective) comes every --log_interval 4 steps and
    # at the epoch's last, by the global step: 4, 8, 11, and again at the epoch's end.
    flags = [
        "--data_dir",
        ddp_data,
        "--checkpoint_dir",
        tmp_path / "ck",
        "--checkpoint_name",
        "agree",
        *FAST,
        *SMALL_MODEL,
        "--epochs",
        "1",
        "--val_fraction",
        "0.25",
        "--batch_size",
        "4",
        "--log_interval",
        "4",
    ]
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    stopped.mkdir(), resumed.mkdir()
    proc, _ = torchrun(PROBE, *flags, env={"PROBE_SIGTERM_STEP": "5", "PROBE_AGREEMENTS_DIR": str(stopped)})
    assert proc.returncode != 0 and proc.stderr.count("SIGTERM: saved") == 1, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((stopped / f"agreements_rank{r}.json").read_text()) for r in (0, 1))
    # The same agreements on both ranks, at due steps only (none at steps 1-3, 5-7: before, one a
    # step); the signal sent after step 5 is agreed on at the next due step, and every rank stops there.
    assert rank0 == rank1, (rank0, rank1)
    steps = [step for step, _ in rank0]
    assert steps[0] == 4 and set(steps) <= {4, 8, 11} and len(steps) == len(set(steps)), rank0
    assert [signum for _, signum in rank0] == [0] * (len(rank0) - 1) + [signal.SIGTERM], rank0
    stop_step = steps[-1]
    assert load(tmp_path / "ck" / "agree" / "last.pt")["scheduler"]["last_epoch"] == stop_step

    resume = ["--resume", *flags[:6], "--num_workers", "0", "--no_progress", "--device", "cpu", "--log_interval", "4"]
    proc, _ = torchrun(PROBE, *resume, env={"PROBE_AGREEMENTS_DIR": str(resumed)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((resumed / f"agreements_rank{r}.json").read_text()) for r in (0, 1))
    # Resumed, the agreements keep to the same global steps: the epoch's last, then its end.
    assert rank0 == rank1 == [[11, 0]] * (2 if stop_step < 11 else 1), (rank0, rank1)


def test_ddp_failure_on_one_rank_at_start_up_stops_every_rank(demo_data, tmp_path):
    # Only rank 0 reads the ImageNet weights; rank 1 would wait for them in DDP's first broadcast.
    missing = tmp_path / "missing.pth"
    pretrained = [flag for flag in FAST if flag != "--no_pretrained"]
    proc, seconds = torchrun(
        MAIN, "--data_dir", demo_data, "--checkpoint_dir", tmp_path / "ck", *pretrained, "--pretrained_path", missing
    )
    assert proc.returncode != 0 and seconds < TIME_LIMIT
    assert proc.stderr.count("error: rank") == 1  # said once, by the rank that hit it
    assert f"error: rank 0: weights file not found: {missing}" in proc.stderr
    assert "[rank1]" not in proc.stderr  # rank 1 left quietly, not by a crash in a collective


def test_ddp_ranks_are_one_writer_and_are_refused_together_by_a_folder_another_holds(demo_data, tmp_path):
    run_dir = tmp_path / "ck" / "baseline"
    utils.hold_run_folder(run_dir)  # this process: a live holder (an flock, as a training process's)
    try:
        proc, seconds = torchrun(MAIN, "--data_dir", demo_data, "--checkpoint_dir", tmp_path / "ck", *FAST)
        after = os.listdir(run_dir)
    finally:
        utils.release_run_folders()
    assert proc.returncode != 0 and seconds < TIME_LIMIT
    refusal = f"{run_dir} is being trained by another process (pid {os.getpid()} on "
    assert proc.stderr.count(refusal) == 1, proc.stderr  # said once, for the job
    # torchrun's report: the first rank to end (rank 1 too, unless the agent stopped it first) ended
    # with a user error's exit code, not a crash
    assert "Root Cause (first observed failure):" in proc.stderr
    assert "exitcode  : 2 " in proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr  # (a rank's traceback)
    assert after == [utils.LOCK_FILE]  # nothing written into the folder


def test_ddp_crash_mid_training_brings_the_group_down(demo_data, tmp_path):
    # Rank 1 dies as training starts while rank 0 waits for it in the first gradient all-reduce.
    proc, seconds = torchrun(
        PROBE, "--data_dir", demo_data, "--checkpoint_dir", tmp_path / "ck", *FAST, env={"PROBE_CRASH_RANK": "1"}
    )
    assert proc.returncode != 0 and seconds < TIME_LIMIT
    assert "RuntimeError: probe: rank 1 crashed" in proc.stderr


# --------------------------------------------------------------------------- the helpers, two processes
def test_distributed_helpers_share_results_and_errors(tmp_path):
    from ddp_probe import helpers_worker

    mp.start_processes(helpers_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # from_main_process: rank 0's result on every rank; its error raised on every rank, printed once.
    assert rank0["main_result"]["result"] == rank1["main_result"]["result"] == "made by rank 0"
    for seen in (rank0, rank1):
        assert seen["main_user_error"]["error"] == "no checkpoint here" and seen["main_user_error"]["exit_code"] == 2
        assert seen["main_bug"]["error"] == "ValueError: boom" and seen["main_bug"]["exit_code"] == 1
        assert seen["rank1_user_error"]["error"] == "data missing on this node"
        assert seen["rank1_user_error"]["exit_code"] == 2
    assert (
        rank0["main_user_error"]["printed"] == "error: no checkpoint here\n" and not rank1["main_user_error"]["printed"]
    )
    assert "ValueError: boom" in rank0["main_bug"]["printed"] and not rank1["main_bug"]["printed"]
    # on_all_ranks: each rank's own result; one rank's error raised on every rank, printed by it.
    assert (rank0["all_result"]["result"], rank1["all_result"]["result"]) == (0, 1)
    assert rank1["rank1_user_error"]["printed"] == "error: data missing on this node\n"
    assert not rank0["rank1_user_error"]["printed"]
    # GracefulStop.requested: a signal one rank has seen stops every rank, with its number.
    for seen in (rank0, rank1):
        assert seen["signal_on_rank1"]["result"] == [True, signal.SIGTERM]
        assert seen["no_signal"]["result"] == [False, None]
        # Between the agreements every --log_interval steps a rank's signal waits for the next one.
        assert seen["agreed_only_when_asked"]["result"] == [False, True, True]


# --------------------------------------------------------------------------- in this process
@pytest.fixture
def one_process_group():
    """A gloo group of one process, so DDP can be built here; left again afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_no_gradient_all_reduce_on_accumulating_micro_batches(demo_data, tmp_path, one_process_group):
    cfg = config.parse_config(["--data_dir", demo_data, *FAST, "--epochs", "1", "--accum_steps", "2"])[0]
    train_loader, val_loader, test_loader, class_names = build_loaders(cfg, "cpu")
    assert len(train_loader) == 3  # micro-batches: 2 (accumulated, then synced) + 1 (synced)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, len(class_names)),
    )
    ddp = wrap_ddp(model, "cpu")
    all_reduces = []

    def counting_hook(state, bucket):  # DDP's gradient all-reduce, one call per bucket (one here)
        all_reduces.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = WarmupCosineLR(optimizer, total_steps=2, warmup_steps=0)
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        (train_loader, val_loader, test_loader),
        cfg,
        str(tmp_path),
        class_names,
        setup_logging(),
        train_model=ddp,
    )
    trainer.train_one_epoch(0)
    assert scheduler.last_epoch == 2 and len(all_reduces) == 2  # one all-reduce per optimizer step, not 3


def test_sync_bn_converts_batchnorm_and_keeps_a_plain_state_dict(monkeypatch):
    # DDP takes SyncBatchNorm on GPUs only: stand in for it to see what wrap_ddp gives it.
    monkeypatch.setattr(
        distributed, "DistributedDataParallel", lambda module, device_ids: SimpleNamespace(module=module)
    )
    wrapped = wrap_ddp(resnet18(num_classes=3), "cpu", sync_bn=True)
    norms = [m for m in wrapped.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 20 and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    resnet18(num_classes=3).load_state_dict(wrapped.module.state_dict())  # strict: same keys, no prefix
    plain = wrap_ddp(resnet18(num_classes=3), "cpu")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.module.modules())


def test_torchrun_settings_are_checked_before_joining(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match="global batch and must split evenly over the 2 processes"):
        config.parse_config(["--batch_size", "15", "--device", "cpu"])
    with pytest.raises(UserError, match="--sync_bn needs CUDA"):
        config.parse_config(["--sync_bn", "--device", "cpu"])
    with pytest.raises(UserError, match="--benchmark times one GPU"):
        config.parse_config(["--benchmark", "--device", "cpu"])
    # main reports it on one line that names the rank, exit code 2, and joins no group.
    assert main_module.main(["--batch_size", "15", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: rank 1: --batch_size 15 is the global batch")
    assert not dist.is_initialized()


def test_epoch_sampler_shards_like_a_distributed_sampler():
    def shards(pad, epoch=0):
        samplers = [EpochSampler(7, pad, seed=3, rank=r, world_size=2, pad=pad) for r in (0, 1)]
        for s in samplers:
            s.set_epoch(epoch)
        return [list(s) for s in samplers]

    # Evaluation: every image on exactly one rank, none twice (7 = 4 + 3).
    a, b = shards(pad=False)
    assert sorted(a + b) == list(range(7)) and len(a) == 4
    # Training: shuffled, padded so both ranks take the same number of batches, all images used.
    a, b = shards(pad=True)
    assert len(a) == len(b) == 4 and set(a + b) == set(range(7))
    # set_epoch reshuffles, identically on every rank (the permutation depends on seed and epoch).
    assert shards(pad=True, epoch=1) != [a, b] and shards(pad=True, epoch=1) == shards(pad=True, epoch=1)
