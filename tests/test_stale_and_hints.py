"""What tripped a new user (issue 31): an export of an unfinished run warns, and one that a later
--resume made stale says so (at the end of the resume, and in --compare); every hint names a
command that works from the state the run is in; an empty class folder is one line that says what
to do; how busy the machine was is recorded beside each epoch's time; OpenMP's wait policy is the
user's (the threads' count follows other programs' load instead: test_threads.py)."""

import io
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import FAST, FEW_TIMING_RUNS, ROOT, SMALL_MODEL, SimulatedCrash, assert_user_error, crash_in_epoch

import inference
import machine
import trainer
from outputs import format_epoch


def command_flags(line, command_start="python main.py "):
    """The flags of the `python main.py ...` command a message names (up to its closing parenthesis
    or the end of the line)."""
    text = line[line.index(command_start) + len(command_start) :]
    return shlex.split(text.split(")")[0].rstrip(";. \n"))


def better_each_epoch(monkeypatch):
    """Make every epoch validate better than the one before, so best.pt is rewritten each epoch
    (whatever the tiny data makes of it)."""
    original = trainer.Trainer.validate

    def validate(self):
        numbers = original(self)
        return {**numbers, "val_acc": 10.0 * (self.state.epoch + 1)}

    monkeypatch.setattr(trainer.Trainer, "validate", validate)


def test_an_unfinished_export_warns_and_a_resume_that_improves_best_pt_marks_it_stale(
    demo_data, run_cli, tmp_path, monkeypatch
):
    run = ["--data_dir", demo_data, "--checkpoint_name", "early", *FAST, "--model", "squeezenet1_1"]
    better_each_epoch(monkeypatch)
    undo = crash_in_epoch(monkeypatch, 1)  # stopped after epoch 1 of 2
    with pytest.raises(SimulatedCrash):
        run_cli(*run, "--epochs", "2")
    undo()
    for name, value in FEW_TIMING_RUNS.items():
        monkeypatch.setattr(inference, name, value)
    code, out, err = run_cli(*run, "--export", "--calibration_images", "8")
    assert code == 0, err
    warning = next(line for line in out.splitlines() if line.startswith("warning: early has not finished"))
    assert "(epoch 1 of 2)" in warning and "epoch 1)" in warning
    report = json.loads((tmp_path / "checkpoints" / "early" / "inference.json").read_text())
    assert report["run_progress"] == {"epoch": 1, "epochs": 2, "finished": False}
    assert {"load_before", "load_after", "cpus", "threads", "openmp_wait"} <= report.keys()

    # The command the warning names finishes the run; its last lines say the export is stale and where the files are.
    code, out, err = run_cli(*command_flags(warning), "--num_workers", "0", "--no_progress")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-2].startswith("warning: early's model.onnx holds epoch 1's weights, but its best.pt has changed")
    assert "(now epoch 2's)" in lines[-2]
    runs = str(tmp_path / "checkpoints")  # (not the default folder: the hint names it)
    assert command_flags(lines[-2]) == ["--checkpoint_name", "early", "--checkpoint_dir", runs, "--export"]
    assert lines[-1].startswith(f"early's files are in {tmp_path / 'checkpoints' / 'early'}: best.pt, last.pt")

    code, out, err = run_cli("--compare", "early")
    assert code == 0, err
    assert "| early (stale) | fp32 | pytorch |" in out
    assert "stale: early's model.onnx holds epoch 1's weights" in out

    # Each epoch's images/s is recorded with how busy the machine was while it was timed.
    results = json.loads((tmp_path / "checkpoints" / "early" / "results.json").read_text())
    assert all({"load_before", "load_after", "cpus"} <= epoch.keys() for epoch in results["epochs"])


def test_a_run_holding_only_last_pt_is_told_to_resume_by_every_command_that_needs_best_pt(
    demo_data, run_cli, tmp_path, monkeypatch
):
    run = ["--data_dir", demo_data, "--checkpoint_name", "early", *FAST, *SMALL_MODEL]

    def crash(self):
        raise SimulatedCrash  # in epoch 1's validation: last.pt (from --save_every_steps), no best.pt

    original = trainer.Trainer.validate
    monkeypatch.setattr(trainer.Trainer, "validate", crash)
    with pytest.raises(SimulatedCrash):
        run_cli(*run, "--epochs", "1", "--save_every_steps", "2")
    monkeypatch.setattr(trainer.Trainer, "validate", original)
    assert sorted(f for f in os.listdir(tmp_path / "checkpoints" / "early") if f.endswith(".pt")) == ["last.pt"]
    hints = []
    for mode in ("--evaluate", "--predict", "--export"):
        result = run_cli(*run, mode)
        assert_user_error(result, "early stopped in its first epoch", "--resume")
        hints.append(command_flags(result[2]))
    assert hints[0] == hints[1] == hints[2]
    code, out, err = run_cli(*hints[0], "--num_workers", "0", "--no_progress")
    assert code == 0, err
    code, out, err = run_cli(*run, "--evaluate")
    assert code == 0 and "test accuracy" in out, err

    # --resume of a run that does not exist names the runs that do, and how to start it.
    result = run_cli("--checkpoint_name", "nosuch", "--resume", *FAST)
    assert_user_error(result, "no run nosuch to resume", "the runs in", "early", "start it with")
    # --evaluate of one: the same list.
    assert_user_error(run_cli("--data_dir", demo_data, "--checkpoint_name", "nosuch", "--evaluate"), "early")


def test_an_empty_class_folder_is_one_line_that_says_what_to_do(demo_data, run_cli, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    (data / "seg_train" / "seg_train" / "zebra").mkdir()
    result = run_cli("--data_dir", data, *FAST, "--epochs", "1")
    assert_user_error(result, "the class folder zebra holds no images", "add its images")
    assert "Found no valid file" not in result[2] and not result[2].endswith(" \n")


def test_each_epoch_records_how_busy_the_machine_was_and_a_busy_one_is_flagged():
    record = {
        "epoch": 1,
        "train_loss": 1.0,
        "train_acc": 50.0,
        "val_loss": 1.0,
        "val_acc": 50.0,
        "lr": 1e-3,
        "seconds": 10.0,
        "images_per_sec": 30.0,
        "peak_mem_mb": None,
    }
    # The load average counts the run's own threads: a quiet 2-core machine training at load 4.2 is
    # not busy; other programs taking a core are.
    quiet = {**record, "load_before": 0.5, "load_after": 4.2, "cpus": 2, "other_cpus": 0.1}
    busy = {**record, "load_before": 0.5, "load_after": 4.2, "cpus": 2, "other_cpus": 1.02}
    assert "busy" not in format_epoch(quiet, 2)
    assert "(busy: other programs kept 1.02 of 2 cores busy while it was timed)" in format_epoch(busy, 2)
    old = {**record, "load_before": 0.5, "load_after": 4.2, "cpus": 2}  # (results.json from before other_cpus)
    assert "(busy: the machine was busier than its 2 cores while it was timed)" in format_epoch(old, 2)


def spin_cpu(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_busy_counts_only_the_cpus_the_run_may_use(monkeypatch):
    # Under a cpuset (taskset, SLURM, a container) other jobs on the other CPUs take nothing from us.
    stat = (
        "cpu  300 0 300 900 0 0 0 0 0 0\ncpu0 100 0 100 300 0 0 0 0 0 0\ncpu1 200 0 200 600 0 0 0 5 0 0\nintr 1 2 3\n"
    )
    monkeypatch.setattr(machine, "open", lambda *args, **kwargs: io.StringIO(stat), raising=False)
    assert machine._busy_ticks([0]) == 200
    assert machine._busy_ticks([1]) == 405  # (a VM's steal counts: the host took that CPU)
    assert machine._busy_ticks([0, 1]) == 605
    assert machine._busy_ticks([2]) is None  # (a CPU /proc/stat does not list: cannot tell)


def test_under_torchrun_the_run_is_the_agents_tree(monkeypatch):
    # (The other ranks are its children, siblings of this one: this run's, not other programs.)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert machine._run_root() == os.getpid()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert machine._run_root() == os.getppid()


def test_other_programs_cpu_is_counted_and_the_runs_own_workers_is_not(tmp_path):
    # LoadWatch's other_cpus is the machine's busy CPU time less this process tree's. Counted in CPU
    # time, not wall time, so that the suite's other worker cannot change the answer.
    half_second = 0.4 * os.sysconf("SC_CLK_TCK")  # (ticks; 0.4 for the tick's rounding)
    own, busy = machine._own_ticks(), machine._busy_ticks(machine.usable_cpus())
    worker = multiprocessing.get_context("fork").Process(target=spin_cpu, args=(0.5,))  # as a loader worker
    worker.start()
    worker.join()
    assert machine._own_ticks() - own >= half_second
    assert machine._busy_ticks(machine.usable_cpus()) - busy >= half_second
    # Another program (started through a shell that exits at once, so outside this process's tree:
    # a descendant's CPU time, once reaped, counts as this process's own).
    done = tmp_path / "done"
    program = (
        f"import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\nopen({str(done)!r}, 'w')"
    )
    own, busy = machine._own_ticks(), machine._busy_ticks(machine.usable_cpus())
    subprocess.run(["sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(program)} &"], check=True)
    deadline = time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.exists()
    assert machine._own_ticks() - own < half_second
    assert machine._busy_ticks(machine.usable_cpus()) - busy >= half_second
    # A grandchild (a worker's own process) is this run's too, while it runs.
    done.unlink()
    own = machine._own_ticks()
    grandchild = subprocess.Popen(["sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(program)} & wait"])
    while not done.exists() and grandchild.poll() is None:
        time.sleep(0.01)
    assert machine._own_ticks() - own >= half_second
    grandchild.wait()
    assert machine.LoadWatch().record().keys() == {"load_before", "load_after", "cpus", "other_cpus"}


def test_openmp_waits_as_the_user_or_openmp_chose():
    # In a fresh process where torch cannot load: what main.py set before it tried (libgomp reads it then).
    probe = (
        "import os, sys; sys.modules['torch'] = None\n"
        "try:\n    import main\nexcept ImportError:\n    print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for extra, expected in (
        ({}, "None"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        ({"GOMP_SPINCOUNT": "0"}, "None"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=60
        )
        assert result.stdout.strip() == expected, result.stderr


def test_predict_and_predict_onnx_break_ties_alike_and_both_name_a_near_tie():
    import runpy

    import numpy as np
    import torch

    import main as main_module

    deploy = runpy.run_path(os.path.join(ROOT, "deploy", "predict_onnx.py"))
    assert deploy["NEAR_TIE"] == main_module.NEAR_TIE
    # An exact tie (classes 1 and 2), and the near-tie (0.3448 against 0.3447).
    probabilities = np.array([[0.2, 0.4, 0.4], [0.3105, 0.3447, 0.3448]], dtype=np.float32)
    ours = main_module.top_two(torch.from_numpy(probabilities))
    theirs = deploy["top_two"](probabilities)
    assert [(a, b) for a, _, b, _ in ours] == [(a, b) for a, _, b, _ in theirs] == [(1, 2), (2, 1)]
    names = ["checkerboard", "squares", "stripes"]
    ties = [("0010.jpg", names[a], p, names[b], q) for a, p, b, q in ours[1:]]
    assert main_module.near_tie_note(ties) == deploy["near_tie_note"](ties)
    assert "0010.jpg: stripes 0.3448, squares 0.3447" in main_module.near_tie_note(ties)


def test_busy_epochs_are_named_run_by_run_in_one_line():
    from report import busy_epochs_note

    def epoch(n, other):
        return {"epoch": n, "load_before": 3.0, "load_after": 3.5, "cpus": 2, "other_cpus": other}

    quiet = {"run": "fp32", "epochs": [epoch(1, 0.1), epoch(2, 0.0)]}
    busy = {"run": "amp", "epochs": [epoch(1, 1.02), epoch(2, 0.2), epoch(3, 0.97)]}
    assert busy_epochs_note([quiet]) == ""
    assert busy_epochs_note([quiet, busy]) == (
        "warning: these epochs' s/epoch and images/s may be slower than this machine's own: "
        "amp epochs 1, 3 of 3 (other programs kept 0.97 to 1.02 of 2 cores busy)."
    )


def test_a_copied_or_touched_run_folder_keeps_its_export_and_a_new_best_pt_makes_it_stale(tmp_path):
    """(review) The export recorded best.pt by size and time only, so `cp -r`, tar or `touch` marked
    an unchanged best.pt's export "(stale)": the sha256 now decides whenever size or time differ."""
    from report import best_pt_identity, stale_export

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "best.pt").write_bytes(b"weights of epoch 3" * 1000)
    (run_dir / "results.json").write_text(json.dumps({"best_epoch": 5}))
    report = {"epoch": 3, "best_pt": best_pt_identity(run_dir)}
    (run_dir / "inference.json").write_text(json.dumps(report))
    assert stale_export(tmp_path / "runs", "r", report) == ""

    shutil.copytree(tmp_path / "runs", tmp_path / "copy", copy_function=shutil.copy)  # as `cp -r`: new times
    assert os.stat(tmp_path / "copy" / "r" / "best.pt").st_mtime_ns != report["best_pt"]["mtime_ns"]
    assert stale_export(tmp_path / "copy", "r", report) == ""
    os.utime(run_dir / "best.pt", ns=(time.time_ns(), time.time_ns() + 10**9))  # touch
    assert stale_export(tmp_path / "runs", "r", report) == ""

    (run_dir / "best.pt").write_bytes(b"weights of epoch 5" * 1000)  # the same size, other bytes
    assert "r's model.onnx holds epoch 3's weights, but its best.pt has changed since (now epoch 5's)" in (
        stale_export(tmp_path / "runs", "r", report)
    )
    # An export from before the sha256 was kept: a different size or time still means stale.
    old = {"epoch": 3, "best_pt": {k: v for k, v in report["best_pt"].items() if k != "sha256"}}
    assert "has changed since" in stale_export(tmp_path / "copy", "r", old)


def test_the_export_hints_name_the_runs_folder_even_with_a_space_in_it(tmp_path):
    """(review) The stale-export and "not exported" hints wrote their own command, without a
    non-default --checkpoint_dir; they come from checkpoint.run_command now, which quotes paths."""
    from checkpoint import run_command
    from report import best_pt_identity, inference_section, stale_export

    runs = tmp_path / "my runs"
    for name in ("r", "other run"):
        (runs / name).mkdir(parents=True)
        (runs / name / "best.pt").write_bytes(b"weights")
    report = {"epoch": 1, "rows": [], "best_pt": best_pt_identity(runs / "r")}
    (runs / "r" / "inference.json").write_text(json.dumps(report))
    (runs / "r" / "best.pt").write_bytes(b"new weights")
    stale = stale_export(runs, "r", report)
    assert command_flags(stale) == ["--checkpoint_name", "r", "--checkpoint_dir", str(runs), "--export"]
    text = inference_section(runs, ["r", "other run"])
    line = next(line for line in text.splitlines() if line.startswith("not exported: other run ("))
    assert command_flags(line) == ["--checkpoint_name", "other run", "--checkpoint_dir", str(runs), "--export"]
    assert run_command("r", "checkpoints", "--resume") == "python main.py --checkpoint_name r --resume"
