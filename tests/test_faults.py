"""A run survives crashes: SIGKILL at random points (also mid-checkpoint-write), SIGINT,
SIGTERM and SIGHUP, each followed by --resume, end with exactly the weights of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from conftest import FAST, SMALL_MODEL, main_command, read_results

from outputs import MEASUREMENT_KEYS

pytestmark = pytest.mark.usefixtures("forkserver")  # every test here starts main.py processes


def cli(data, ckdir, name, *flags):
    # The small model: what is tested is the checkpointing, and ResNet-18's 135 MB at each of a
    # run's 12 saves made these the suite's slowest tests.
    return main_command(
        data, ckdir, name, *FAST, *SMALL_MODEL, "--deterministic", "--epochs", "3", "--save_every_steps", "1", *flags
    )


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def finished_run(ckdir, name):
    ckpt = torch.load(ckdir / name / "last.pt", weights_only=True)
    history = [{k: v for k, v in e.items() if k not in MEASUREMENT_KEYS} for e in read_results(ckdir / name)["epochs"]]
    return ckpt["model"], history


def assert_same_run(a, b):
    (weights_a, history_a), (weights_b, history_b) = a, b
    diff = max((weights_a[k].double() - weights_b[k].double()).abs().max().item() for k in weights_a)
    assert diff == 0, f"max weight difference {diff}"
    assert history_a == history_b
    return diff


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    ckdir = tmp_path_factory.mktemp("reference")
    subprocess.run(cli(demo_data, ckdir, "ref"), env=env(), check=True, capture_output=True, timeout=300)
    return finished_run(ckdir, "ref")


def checkpoint_writes(run_dir, files=("last.pt", "best.pt")):
    """The temporary files of the checkpoint writes (of `files`) in progress in `run_dir`, or cut
    by a kill (SIGKILL leaves them; the next start deletes them)."""
    names = os.listdir(run_dir) if run_dir.is_dir() else []
    return {n for n in names if n.startswith(tuple(f".{f}." for f in files)) and n.endswith(".tmp")}


def wait_until_training(run_dir, proc, timeout=120):
    """Block until `proc` has written a last.pt of its own (it is past start-up, training)."""
    path, deadline = run_dir / "last.pt", time.monotonic() + timeout
    before = path.stat().st_mtime_ns if path.exists() else 0
    while (
        proc.poll() is None and time.monotonic() < deadline and not (path.exists() and path.stat().st_mtime_ns > before)
    ):
        time.sleep(0.001)


def wait_for_checkpoint_write(run_dir, proc, files=("last.pt", "best.pt"), timeout=60):
    """Block until a checkpoint write (of `files`) of `proc`'s has begun (a new temporary file)."""
    before, deadline = checkpoint_writes(run_dir, files), time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not checkpoint_writes(run_dir, files) - before:
        time.sleep(0.001)


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(demo_data, tmp_path, reference):
    rng = random.Random(1234)
    run_dir = tmp_path / "cut"
    kills, mid_save_kills, flags = 0, 0, []
    while True:
        stale = checkpoint_writes(run_dir)  # cut by the last kill (this start deletes them)
        proc = subprocess.Popen(
            cli(demo_data, tmp_path, "cut", *flags), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # Four kills, every other one in a write of last.pt (the file a resume reads: its write
        # must be atomic); more (up to eight) if a kill meant for a write came after it had ended
        # (a few MB: milliseconds).
        if kills < 4 or (mid_save_kills < 2 and kills < 8):
            wait_until_training(run_dir, proc)
            if kills % 2 == 0:  # in a write of last.pt
                wait_for_checkpoint_write(run_dir, proc, files=("last.pt",))
            else:  # anywhere in the next half second of training
                time.sleep(rng.uniform(0, 0.5))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                # A write that ends renames its temporary file; only a kill leaves one behind.
                mid_save_kills += bool(checkpoint_writes(run_dir, files=("last.pt",)) - stale)
        stderr = proc.communicate(timeout=300)[1].decode()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr
        # Whatever the kill interrupted, the checkpoint on disk is whole, and the run goes on from it.
        torch.load(run_dir / "last.pt", weights_only=True)
        flags = ["--resume"]
    assert kills >= 4 and mid_save_kills >= 2, (kills, mid_save_kills)
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]  # the last start deleted the cut writes' files
    sessions = json.loads((run_dir / "config.json").read_text())["sessions"]
    assert len(sessions) == kills + 1 and sessions[0]["from"] == "start"  # one start, then only resumes
    diff = assert_same_run(reference, finished_run(tmp_path, "cut"))
    print(f"\n{kills} SIGKILLs ({mid_save_kills} during a write of last.pt), max weight difference {diff}")


def test_sigterm_sighup_and_sigint_save_then_resume_equals_uninterrupted(demo_data, tmp_path, reference):
    # SIGHUP: the terminal closed or the ssh connection dropped (without nohup, which ignores it).
    run_dir = tmp_path / "sig"
    for signum, flags in ((signal.SIGTERM, []), (signal.SIGHUP, ["--resume"]), (signal.SIGINT, ["--resume"])):
        proc = subprocess.Popen(
            cli(demo_data, tmp_path, "sig", *flags),
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # As from a terminal, whatever started pytest: under nohup SIGHUP arrives ignored, and a
            # run keeps it ignored (it is asked to outlive the terminal).
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
        )
        before = os.path.getmtime(run_dir / "last.pt") if (run_dir / "last.pt").exists() else 0
        while proc.poll() is None and not (
            (run_dir / "last.pt").exists() and os.path.getmtime(run_dir / "last.pt") > before
        ):
            time.sleep(0.01)  # wait until this process has trained at least one step
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, err.decode()
        err = err.decode()
        assert "--resume" in err and "Traceback" not in err
    proc = subprocess.run(cli(demo_data, tmp_path, "sig", "--resume"), env=env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert_same_run(reference, finished_run(tmp_path, "sig"))


def test_second_ctrl_c_exits_at_once(demo_data, tmp_path):
    # ResNet-18's saves: the small model's first stop (and its save) ends before the second Ctrl-C.
    proc = subprocess.Popen(
        cli(demo_data, tmp_path, "twice", "--epochs", "50", "--model", "resnet18"),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until_training(tmp_path / "twice", proc)
    wait_for_checkpoint_write(tmp_path / "twice", proc)  # in the middle of a save: the slowest place to stop
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "exiting now" in err.decode()
    torch.load(tmp_path / "twice" / "last.pt", weights_only=True)  # still whole
