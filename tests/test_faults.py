"""A run survives crashes: SIGKILL at random points (also mid-checkpoint-write), SIGINT and
SIGTERM, each followed by --resume, end with exactly the weights of an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, ROOT, SMALL_MODEL, read_results

TIMING_KEYS = {"seconds", "checkpoint_seconds", "images_per_sec", "first_in_session"}


def cli(data, ckdir, name, *flags):
    # The small model: what is tested is the checkpointing, and ResNet-18's 135 MB at each of a
    # run's 12 saves made these the suite's slowest tests.
    return [sys.executable, os.path.join(ROOT, "main.py"), "--data_dir", data, "--checkpoint_dir", str(ckdir),
            "--checkpoint_name", name, *FAST, *SMALL_MODEL, "--deterministic", "--epochs", "3", "--save_every_steps", "1", *flags]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def finished_run(ckdir, name):
    ckpt = torch.load(ckdir / name / "last.pt", weights_only=True)
    history = [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in read_results(ckdir / name)["epochs"]]
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


def wait_for_temp_file(run_dir, proc, timeout=60):
    """Block until a checkpoint write is in progress (its temporary file exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if run_dir.is_dir() and any(n.endswith(".tmp") for n in os.listdir(run_dir)):
            return True
        time.sleep(0.001)
    return False


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(demo_data, tmp_path, reference):
    rng = random.Random(1234)
    run_dir = tmp_path / "cut"
    kills, mid_save_kills, flags = 0, 0, []
    while True:
        proc = subprocess.Popen(cli(demo_data, tmp_path, "cut", *flags), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:
            if kills % 2 == 0:  # during a checkpoint write
                mid_save = wait_for_temp_file(run_dir, proc)
            else:  # anywhere
                time.sleep(rng.uniform(0.5, 4.0))
                mid_save = run_dir.is_dir() and any(n.endswith(".tmp") for n in os.listdir(run_dir))
            if proc.poll() is None:
                proc.kill()
                kills += 1
                mid_save_kills += mid_save
        stderr = proc.communicate(timeout=300)[1].decode()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr
        # Whatever the kill interrupted, the checkpoint on disk is whole.
        flags = ["--resume"] if (run_dir / "last.pt").exists() else ["--overwrite"]
        if flags == ["--resume"]:
            torch.load(run_dir / "last.pt", weights_only=True)
    assert kills >= 3 and mid_save_kills >= 2
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    diff = assert_same_run(reference, finished_run(tmp_path, "cut"))
    print(f"\n{kills} SIGKILLs ({mid_save_kills} during a checkpoint write), max weight difference {diff}")


def test_sigterm_and_sigint_save_then_resume_equals_uninterrupted(demo_data, tmp_path, reference):
    run_dir = tmp_path / "sig"
    for signum, flags in ((signal.SIGTERM, []), (signal.SIGINT, ["--resume"])):
        proc = subprocess.Popen(cli(demo_data, tmp_path, "sig", *flags), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        before = os.path.getmtime(run_dir / "last.pt") if (run_dir / "last.pt").exists() else 0
        while proc.poll() is None and not ((run_dir / "last.pt").exists()
                                           and os.path.getmtime(run_dir / "last.pt") > before):
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
    proc = subprocess.Popen(cli(demo_data, tmp_path, "twice", "--epochs", "50", "--model", "resnet18"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None and not (tmp_path / "twice" / "last.pt").exists():
        time.sleep(0.01)
    wait_for_temp_file(tmp_path / "twice", proc)  # in the middle of a save: the slowest place to stop
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "exiting now" in err.decode()
    torch.load(tmp_path / "twice" / "last.pt", weights_only=True)  # still whole
