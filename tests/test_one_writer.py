"""One process trains into a run folder at a time: a second start (fresh or --resume) into a
folder a live process trains in refuses in one line naming it, exit 2, touching nothing; the lock
dies with its holder, so a resume after a SIGKILL is not blocked. Real processes."""

import os
import signal
import subprocess
import time

import pytest
from conftest import FAST, PYTHON, ROOT, SMALL_MODEL

pytestmark = pytest.mark.usefixtures("forkserver")

LOCK = ".training.lock"


def cli(data, ckdir, *flags):
    return [
        *PYTHON,
        os.path.join(ROOT, "main.py"),
        "--data_dir",
        data,
        "--checkpoint_dir",
        str(ckdir),
        "--checkpoint_name",
        "run",
        *FAST,
        *SMALL_MODEL,
        "--epochs",
        "2",
        "--save_every_steps",
        "1",
        *flags,
    ]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def snapshot(run_dir):
    return {name: (run_dir / name).stat().st_mtime_ns for name in os.listdir(run_dir)}


def test_a_second_writer_is_refused_and_a_killed_holder_blocks_nothing(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(cli(demo_data, tmp_path), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists() and holder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    text = (run_dir / LOCK).read_text()
    pid = int(text.split()[1])  # the process that trains (under the fork server: the launcher's child)
    os.kill(pid, signal.SIGSTOP)  # frozen mid-training, lock held: the folder stays as it is
    try:
        before = snapshot(run_dir)
        for flags in ([], ["--resume"], ["--overwrite"]):
            second = subprocess.run(cli(demo_data, tmp_path, *flags), env=env(), capture_output=True, text=True)
            assert second.returncode == 2, second.stderr
            assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
            assert f"being trained by another process (pid {pid} on {os.uname().nodename}, since " in second.stderr
            assert snapshot(run_dir) == before  # nothing touched
    finally:
        os.kill(pid, signal.SIGKILL)
    holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    # The lock died with it (its file stays, held by no one): the resume goes ahead and finishes.
    resumed = subprocess.run(cli(demo_data, tmp_path, "--resume"), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stdout
    assert not (run_dir / LOCK).exists()  # a run that ends lets go of its folder, and leaves no lock file
