"""One process trains into a run folder at a time: a second start (fresh or --resume) into a
folder a live process trains in refuses in one line naming it, exit 2, touching nothing; the lock
dies with its holder, so a resume after a SIGKILL is not blocked. Real processes."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import FAST, ROOT, SMALL_MODEL, main_command

import utils

pytestmark = pytest.mark.usefixtures("forkserver")

LOCK = ".training.lock"


def cli(data, ckdir, *flags):
    return main_command(data, ckdir, "run", *FAST, *SMALL_MODEL, "--epochs", "2", "--save_every_steps", "1", *flags)


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


def holder(run_dir, *lines):
    """A plain python process that holds `run_dir` and then runs `lines` (each printing a line at
    most), prints "held" and sleeps; returned once it has said so."""
    code = "\n".join(["import os, sys, time, utils", f"utils.hold_run_folder({str(run_dir)!r})", *lines])
    code += "\nprint('held', flush=True)\ntime.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return process


def read_until_held(process):
    lines = []
    while (line := process.stdout.readline().strip()) != "held":
        assert line, "the holder ended early"
        lines.append(line)
    return lines


def test_a_forked_child_of_a_killed_holder_does_not_keep_the_folder_held(tmp_path):
    # (A DataLoader worker is such a child: forked after the folder was held, it lives on for
    # seconds after its trainer is SIGKILLed, until it notices.)
    process = holder(tmp_path / "run", "child = os.fork()", "child or time.sleep(120)", "print(child, flush=True)")
    (child,) = read_until_held(process)
    try:
        process.kill()
        process.wait()
        os.kill(int(child), 0)  # (alive)
        start = time.monotonic()
        utils.hold_run_folder(tmp_path / "run")  # a resume at once
        assert time.monotonic() - start < 1.0
        os.kill(int(child), 0)  # (still alive: it held nothing)
    finally:
        os.kill(int(child), signal.SIGKILL)
        utils.release_run_folders()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_is_one_line_naming_the_file(tmp_path, monkeypatch, code):
    def flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    opened = len(os.listdir("/proc/self/fd"))
    with pytest.raises(utils.UserError) as refused:
        utils.hold_run_folder(tmp_path / "run")
    assert str(refused.value) == (
        f"cannot lock {tmp_path / 'run' / LOCK}: its file system does not support file locks "
        f"({os.strerror(code)}); put --checkpoint_dir on one that does"
    )
    assert len(os.listdir("/proc/self/fd")) == opened  # (the lock file was closed)


def test_a_holder_that_cannot_write_its_line_holds_the_folder_and_its_first_write_says_the_disk_is_full(
    tmp_path, monkeypatch
):
    # RLIMIT_FSIZE 0 (SIGXFSZ ignored): every write fails, as on a full disk, the lock file's first.
    process = holder(
        tmp_path / "run",
        "import resource, signal",
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)",
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))",
        "utils.release_run_folders()",  # (held again below, under the limit)
        f"utils.hold_run_folder({str(tmp_path / 'run')!r})",
        f"try: utils.atomic_write_text({str(tmp_path / 'run' / 'x.json')!r}, 'x')",
        "except utils.WriteFailed as exc: print(exc.filename, exc.strerror.split(' (')[0], flush=True)",
    )
    try:
        assert read_until_held(process) == [f"{tmp_path / 'run' / 'x.json'} File too large"]
        assert (tmp_path / "run" / LOCK).read_bytes() == b""  # held, its holder unnamed
        monkeypatch.setattr(utils, "LOCK_GRACE_SECONDS", 0.1)
        with pytest.raises(utils.UserError) as refused:
            utils.hold_run_folder(tmp_path / "run")
        assert "being trained by another process (one that has not said which: it has just started, or its " in str(
            refused.value
        )
    finally:
        process.kill()
        process.wait()


def test_a_holder_on_another_host_is_named_with_how_to_free_its_folder_if_that_host_is_down(tmp_path, monkeypatch):
    run = tmp_path / "run"
    process = holder(run)
    try:
        read_until_held(process)
        monkeypatch.setattr(utils, "LOCK_GRACE_SECONDS", 0.1)
        with pytest.raises(utils.UserError) as refused:
            utils.hold_run_folder(run)
        assert f"(pid {process.pid} on {socket.gethostname()}, since " in str(refused.value)
        assert "is down" not in str(refused.value)  # (this host: it is not down)
        monkeypatch.setattr(socket, "gethostname", lambda: "elsewhere")
        with pytest.raises(utils.UserError) as refused:
            utils.hold_run_folder(run)
        assert str(refused.value).endswith(
            f"(one process trains into a run folder at a time); if {os.uname().nodename} is down, remove {run / LOCK}"
        )
    finally:
        process.kill()
        process.wait()


def test_a_new_run_checks_again_for_a_run_to_clobber_once_it_holds_the_folder(tmp_path):
    # (A run of the same name may have finished into the folder between the first check and the hold.)
    import types

    import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    cfg = types.SimpleNamespace(checkpoint_dir=str(tmp_path), checkpoint_name="run", overwrite=False)
    try:
        with pytest.raises(utils.UserError, match="already holds a run \\(results.json\\)"):
            main.start_run_dir(str(run_dir), True, cfg)
        assert (run_dir / "results.json").read_text() == "{}"
        main.start_run_dir(str(run_dir), True, types.SimpleNamespace(**{**vars(cfg), "overwrite": True}))
        assert not (run_dir / "results.json").exists()
    finally:
        utils.release_run_folders()
