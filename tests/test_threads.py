"""A training run's CPU threads follow other programs' load (issue 31): on 2 cores one other busy
program leaves one core, and one thread then trains faster than two that fight it for both
(benchmarks/threads.py measures it); a quiet machine gets them all back. A user's own thread count,
--deterministic and a GPU run keep the count fixed; results.json's epochs and the epoch line say
how many threads trained."""

import json

import pytest
import torch
from conftest import FAST, SMALL_MODEL

import machine
import main as main_module


@pytest.mark.parametrize(
    "most, cpus, other, threads",
    [
        (2, 2, 0.0, 2),
        (2, 2, 0.49, 2),
        (2, 2, 0.5, 1),
        (2, 2, 1.0, 1),
        (2, 2, 1.8, 1),
        (2, 2, 3.0, 1),
        (16, 16, 1.2, 15),
        (16, 16, 1.5, 14),
        # Hyperthreading: PyTorch starts a thread a core, 2 CPUs each; 2 busy CPUs take a core's share.
        (8, 16, 2.0, 7),
        (8, 16, 6.0, 5),
    ],
)
def test_threads_left_count_other_programs_as_was_busy_does(most, cpus, other, threads):
    assert machine.threads_left(most, cpus, other) == threads
    if most == cpus:  # half a core or more is a busy machine, and a thread taken from this run
        assert (threads < most) == machine.was_busy({"other_cpus": other, "cpus": cpus}) or threads == 1


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fake_load(monkeypatch, clock, others):
    """LoadWatch records whose other_cpus are `others`' values, one a look, on a 2-core machine."""
    looks = iter(others)

    class FakeWatch:
        def __init__(self):
            self.started, self.cpus = clock(), [0, 1]

        def record(self, restart=False):
            if restart:
                self.started = clock()
            return {"other_cpus": next(looks)}

    monkeypatch.setattr(machine, "LoadWatch", FakeWatch)
    monkeypatch.setattr(machine.time, "monotonic", clock)


def test_threads_follow_other_programs_and_come_back(monkeypatch):
    clock, counts = Clock(), [2]
    fake_load(monkeypatch, clock, [0.0, 0.9, 1.0, None, 0.6, 0.1])
    threads = machine.CpuThreads(lambda: counts[-1], counts.append, "", interval=2.0)
    seen = []
    for _ in range(6):
        clock.now += 1.0
        threads.poll()  # (too soon: no look)
        clock.now += 1.0
        threads.poll()
        seen.append(counts[-1])
    # quiet: 2; busy: 1; still busy; no answer from /proc: back to all; busy; quiet again
    assert seen == [2, 1, 1, 2, 1, 2]
    threads.restore()
    assert counts[-1] == 2


def test_the_epochs_thread_count_is_time_weighted_and_never_above_the_start(monkeypatch):
    clock, counts = Clock(), [2]
    fake_load(monkeypatch, clock, [1.0, 0.0])
    threads = machine.CpuThreads(lambda: counts[-1], counts.append, "", interval=2.0)
    threads.start()
    clock.now += 2.0
    threads.poll()  # busy: 2 s at 2 threads, then 1
    clock.now += 2.0
    assert threads.record() == {"threads": 1.5}
    threads.start()
    clock.now += 2.0
    threads.poll()  # quiet: 2 s at 1 thread, then 2
    clock.now += 1.0
    assert threads.record() == {"threads": 1.3}
    clock, counts = Clock(), [1]
    fake_load(monkeypatch, clock, [0.0])
    one = machine.CpuThreads(lambda: counts[-1], counts.append, "", interval=2.0)
    clock.now += 2.0
    one.poll()
    assert counts == [1]  # a quiet machine gives no more than the run started with


def test_without_adapt_the_count_stays(monkeypatch):
    clock, counts = Clock(), [2]
    fake_load(monkeypatch, clock, [1.0] * 5)
    threads = machine.CpuThreads(lambda: counts[-1], counts.append, "--deterministic", interval=2.0)
    for _ in range(5):
        clock.now += 3.0
        threads.poll()
    assert counts == [2] and threads.record() == {"threads": 2.0}


@pytest.mark.parametrize(
    "device, deterministic, compiled, environ, fixed",
    [
        ("cpu", False, False, {}, ""),
        ("cuda", False, False, {}, "a GPU run"),
        ("cpu", True, False, {}, "--deterministic"),
        ("cpu", False, True, {}, "--compile"),  # (torch.compile would compile again for each count)
        ("cpu", False, False, {"OMP_NUM_THREADS": "2"}, "OMP_NUM_THREADS is set"),
        ("cpu", False, False, {"MKL_NUM_THREADS": "1"}, "MKL_NUM_THREADS is set"),
        ("cpu", False, False, {"OMP_NUM_THREADS": "4,2"}, "OMP_NUM_THREADS is set"),
        # What OpenMP ignores (with a warning) is no choice of the user's: the count still follows the load.
        ("cpu", False, False, {"OMP_NUM_THREADS": ""}, ""),
        ("cpu", False, False, {"OMP_NUM_THREADS": "abc"}, ""),
    ],
)
def test_a_users_thread_count_and_deterministic_runs_keep_the_threads_fixed(
    device, deterministic, compiled, environ, fixed
):
    assert machine.fixed_threads_reason(device, deterministic, compiled, environ=environ) == fixed


@pytest.fixture
def two_threads(monkeypatch):
    """This process at 2 PyTorch threads on 2 CPUs, with no thread setting of the user's; put back after."""
    before = torch.get_num_threads()
    for name in machine.THREAD_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(machine, "usable_cpus", lambda: [0, 1])
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def other_programs_keep(monkeypatch, cores):
    """Every LoadWatch finds other programs keeping `cores` cores busy (the rest of its record real)."""
    record = machine.LoadWatch.record
    monkeypatch.setattr(
        machine.LoadWatch, "record", lambda self, restart=False: {**record(self, restart), "other_cpus": cores}
    )


@pytest.mark.parametrize("other, threads", [(1.0, 1), (0.0, 2)])
def test_a_run_beside_a_busy_program_trains_with_the_core_left_and_says_so(
    demo_data, run_cli, tmp_path, monkeypatch, two_threads, other, threads
):
    other_programs_keep(monkeypatch, other)
    started = machine.LoadWatch()
    started.started -= 3  # as if main.py had loaded 3 s ago, in a fresh process: the start-up's look
    monkeypatch.setattr(main_module, "_startup", started)
    code, out, err = run_cli("--data_dir", demo_data, "--checkpoint_name", "run", "--epochs", "2", *FAST, *SMALL_MODEL)
    assert code == 0, err
    with open(tmp_path / "checkpoints" / "run" / "results.json") as f:
        epochs = json.load(f)["epochs"]
    assert [e["threads"] for e in epochs] == [threads, threads]
    now = "1 of 2" if threads == 1 else "2"  # (the first look, over the start-up, finds the load)
    assert f"CPU threads: {now} now, one fewer for each core other programs keep busy" in out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    if threads == 1:
        assert all(
            "(busy: other programs kept 1.0 of 2 cores busy while it was timed; trained with 1 thread)" in line
            for line in lines
        ), lines
    else:
        assert not any("busy" in line for line in lines), lines
    assert torch.get_num_threads() == 2  # (as it was: the process goes on)


def test_a_users_thread_count_wins_even_beside_a_busy_program(demo_data, run_cli, tmp_path, monkeypatch, two_threads):
    other_programs_keep(monkeypatch, 1.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    code, out, err = run_cli("--data_dir", demo_data, "--checkpoint_name", "run", "--epochs", "1", *FAST, *SMALL_MODEL)
    assert code == 0, err
    with open(tmp_path / "checkpoints" / "run" / "results.json") as f:
        assert [e["threads"] for e in json.load(f)["epochs"]] == [2]
    assert "CPU threads: 2 (fixed: OMP_NUM_THREADS is set)" in out


@pytest.mark.parametrize(
    "device, threads, cpus, workers",
    [("cpu", 2, 2, 0), ("cpu", 1, 2, 1), ("cpu", 8, 16, 8), ("cuda", 2, 2, 2), ("cuda", 8, 32, 8)],
)
def test_default_workers_take_the_cpus_training_threads_leave(monkeypatch, device, threads, cpus, workers):
    monkeypatch.setattr(machine, "usable_cpus", lambda: list(range(cpus)))
    assert machine.default_workers(device, threads, {}) == workers
    assert machine.default_workers(device, threads, {"LOCAL_WORLD_SIZE": "2"}) == min(
        8, cpus // 2 if device == "cuda" else max(0, cpus // 2 - threads)
    )


def test_a_look_restarts_the_watch_from_its_own_readings(monkeypatch):
    reads = []
    monkeypatch.setattr(machine, "_own_ticks", lambda: reads.append("own") or 100 * len(reads))
    watch = machine.LoadWatch()
    started = watch.started
    watch.record(restart=True)
    assert watch.started > started and watch.own == 200  # the window now starts at this look
    assert reads == ["own", "own"]  # one /proc walk a look, not two
