"""Elastic torchrun (issue 19), on the CPU with gloo: a worker killed under `--max-restarts 1`
restarts the group, which resumes from the run's own last.pt (or starts again without one);
two torchrun agents (two "nodes" on 127.0.0.1, c10d rendezvous) train what one agent with two
processes trains; a checkpoint folder a rank cannot see stops the job in one line.

One uninterrupted two-process run is the reference every test compares its weights with. The
runs are tiny (ShuffleNetV2 x0.5, 32 px, 30 training images, batch 8: 4 steps an epoch, FP32,
--deterministic); tests/elastic_probe.py plants the faults."""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from conftest import FORKSERVER, PYTHON, ROOT, make_colour_dataset

pytestmark = pytest.mark.usefixtures("forkserver")  # torchrun and its workers are forked from it

TORCHRUN = [*PYTHON, "-m", "torch.distributed.run"]
PROBE = os.path.join(ROOT, "tests", "elastic_probe.py")
MAIN = os.path.join(ROOT, "main.py")
FLAGS = [
    "--image_size",
    "32",
    "--batch_size",
    "8",
    "--no_pretrained",
    "--num_workers",
    "0",
    "--no_progress",
    "--device",
    "cpu",
    "--model",
    "shufflenet_v2_x0_5",
    "--epochs",
    "2",
    "--deterministic",
    "--save_every_steps",
    "2",
    "--checkpoint_name",
    "elastic",
]
TIME_LIMIT = 120  # seconds a job may take here (they take ~10-25 s); a hang fails the test


def start(launcher, script, data, checkpoints, env=None):
    """A torchrun job in its own process group (so that a hung one can be killed whole)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    argv = [*TORCHRUN, *launcher, FORKSERVER, script, "--data_dir", data, "--checkpoint_dir", checkpoints, *FLAGS]
    return subprocess.Popen(
        list(map(str, argv)),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(*procs):
    """[(exit code, stdout, stderr)] of the jobs; any still running after TIME_LIMIT is killed
    (its whole process group: torchrun and its workers) and fails the test."""
    deadline, results, hung = time.monotonic() + TIME_LIMIT, [], []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchrun stops its workers (each in a session of its own, out of
            # reach of the process group's SIGKILL) before it exits.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            hung.append(err[-3000:])
        results.append((proc.returncode, out, err))
    assert not hung, f"a job hung for {TIME_LIMIT} s: {hung}"
    return results


def standalone(script, data, checkpoints, max_restarts=0, env=None):
    launcher = ["--standalone", "--nproc-per-node", "2", "--max-restarts", str(max_restarts)]
    return finish(start(launcher, script, data, checkpoints, env))[0]


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["model"]


def assert_same_weights(run_dir, reference):
    trained = weights(run_dir)
    assert trained.keys() == reference.keys()
    for key, value in reference.items():  # parameters and BatchNorm statistics, bit for bit
        assert torch.equal(trained[key], value), key


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("elastic_colours"), train_per_class=12, test_per_class=4)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: one torchrun agent, two processes; its final weights."""
    checkpoints = tmp_path_factory.mktemp("elastic_reference")
    code, out, err = standalone(MAIN, data, checkpoints)
    assert code == 0, err[-3000:]
    yield SimpleNamespace(weights=weights(checkpoints / "elastic"), out=out)
    shutil.rmtree(checkpoints, ignore_errors=True)


def test_a_killed_worker_restarts_the_group_from_last_pt_with_the_same_weights(data, reference, tmp_path):
    # Rank 1 is SIGKILLed after step 3 of epoch 1 (last.pt was written after step 2). torchrun
    # restarts both workers; they find the job's own last.pt and go on from it.
    started = time.monotonic()
    code, out, err = standalone(PROBE, data, tmp_path, max_restarts=1, env={"PROBE_KILL_AFTER_STEP": "3"})
    assert code == 0, err[-3000:]
    assert time.monotonic() - started < 100  # the survivor left its collective at once, no --dist_timeout (600 s) wait
    log = (tmp_path / "elastic" / "train.log").read_text()
    assert log.count("torchrun restart 1: resuming elastic from last.pt: epoch 1, after batch 2 of 4 (step 2)") == 1
    assert out.count("torchrun restart 1:") == 1  # one line, from rank 0
    assert_same_weights(tmp_path / "elastic", reference.weights)
    # One run: epochs 1 and 2 once each, finished and tested.
    assert log.count("epoch   1/2") == log.count("epoch   2/2") == 1 and "test accuracy" in log


def test_a_worker_killed_before_any_checkpoint_starts_the_run_again(data, reference, tmp_path):
    # Killed after step 1, before the first last.pt (step 2): the restart starts the run again in
    # its own folder (not refused as an existing run) and trains what the reference trained.
    code, out, err = standalone(PROBE, data, tmp_path, max_restarts=1, env={"PROBE_KILL_AFTER_STEP": "1"})
    assert code == 0, err[-3000:]
    log = (tmp_path / "elastic" / "train.log").read_text()
    assert "torchrun restart 1: elastic failed before its first checkpoint: starting it again" in log
    assert_same_weights(tmp_path / "elastic", reference.weights)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_restart_never_takes_over_an_earlier_jobs_run_of_the_same_rdzv_id(data, tmp_path):
    # (Found by review.) An earlier job, killed for good after its last.pt, under an --rdzv-id a
    # later job reuses (docs/distributed.md's fixed one, or torchrun's default "none"). The later
    # job is refused at its first start (not --resume); its restart must not take the folder
    # for its own and resume the earlier job's run.
    def job(script, max_restarts, env=None):
        launcher = [
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            str(max_restarts),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--rdzv-id",
            "same",
        ]
        return finish(start(launcher, script, data, tmp_path, env))[0]

    code, _, _ = job(PROBE, 0, env={"PROBE_KILL_AFTER_STEP": "3"})
    assert code != 0 and (tmp_path / "elastic" / "last.pt").exists()
    earlier = (tmp_path / "elastic" / "last.pt").read_bytes()
    code, out, err = job(MAIN, 1)
    assert code != 0
    # Both attempts fail the same way: the line is printed once (issue 19: "printing the error once").
    assert err.count("already holds a run (last.pt); pass --resume to continue it") == 1, err[-3000:]
    assert "torchrun restart" not in out + (tmp_path / "elastic" / "train.log").read_text()
    assert (tmp_path / "elastic" / "last.pt").read_bytes() == earlier


def test_two_nodes_train_what_one_node_with_two_processes_trains(data, reference, tmp_path):
    # Two torchrun agents, one process each, meet at a c10d rendezvous as two machines would.
    launcher = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        "elastic_two_nodes",
    ]
    nodes = [start(launcher, MAIN, data, tmp_path) for _ in range(2)]
    results = finish(*nodes)
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    assert "".join(out for _, out, _ in results).count("DistributedDataParallel: 2 processes (gloo)") == 1
    assert_same_weights(tmp_path / "elastic", reference.weights)


def test_two_nodes_restart_together_when_only_one_counts_the_restart(data, reference, tmp_path):
    # (Found by review.) Rank 1 dies on one node while rank 0, on the other, is busy outside any
    # collective (a long step). Rank 1's agent counts a restart; rank 0's agent restarts its worker
    # for the new round without counting one (a membership change): TORCHELASTIC_RESTART_COUNT is
    # 1 on one node and 0 on the other. The restarted workers must still meet and resume.
    launcher = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--max-restarts",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        "elastic_uncounted",
    ]
    faults = {
        "PROBE_KILL_AFTER_STEP": "3",
        "PROBE_SLEEP_AFTER_STEP": "3",
        "PROBE_FIRST_MARK": str(tmp_path / "mark"),
        "LOGLEVEL": "INFO",
    }  # (torchrun's agents say why they restart)
    checkpoints = tmp_path / "checkpoints"
    results = finish(*[start(launcher, PROBE, data, checkpoints, faults) for _ in range(2)])
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    agents = "".join(err for _, _, err in results)
    # One agent restarted for the failure (counted), the other for the new round (not counted).
    assert agents.count("Worker group FAILED. 1/1 attempts left; will restart worker group") == 1, agents[-5000:]
    assert agents.count("new nodes from group_rank=") == 1, agents[-5000:]
    log = (checkpoints / "elastic" / "train.log").read_text()
    assert log.count("torchrun restart 1: resuming elastic from last.pt: epoch 1, after batch 2 of 4 (step 2)") == 1
    assert_same_weights(checkpoints / "elastic", reference.weights)


def test_a_checkpoint_folder_a_rank_cannot_see_is_refused_in_one_line(data, tmp_path):
    # Rank 1 looks for rank 0's token and cannot see it, as a node without the shared folder.
    code, out, err = standalone(PROBE, data, tmp_path, env={"PROBE_UNSHARED_RANK": "1"})
    assert code != 0 and "exitcode  : 2" in err, err[-3000:]  # (torchrun itself exits 1)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: rank 1: the checkpoint folder {tmp_path} is not shared with rank 1's node "
        f"({socket.gethostname()}): it cannot see the file rank 0 wrote there. Under torchrun every "
        "node needs the same --checkpoint_dir (a shared file system), since a restart may put rank 0, "
        "which writes and reads the checkpoints, on any node"
    ], err[-3000:]
    assert "[rank0]:" not in err and "[rank1]:" not in err  # no worker's traceback: both left quietly
    assert os.listdir(tmp_path) == []  # nothing written (the token is gone again)


@pytest.mark.parametrize(
    "text",
    [
        '{"sessions": "x"}',
        '{"sessions": {"a": 1}}',
        '{"sessions": []}',
        "[1]",
        "{",
        '{"sessions": [{"started": "earlier, without torchrun"}]}',
    ],
)
def test_a_restart_takes_a_config_json_it_cannot_read_for_another_runs(tmp_path, monkeypatch, text):
    # Not this job's run (refused as usual, one line), never a traceback on a restart.
    import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    (tmp_path / "config.json").write_text(text)
    assert main.restart_of_own_run(str(tmp_path), "elastic") == (None, False)


# ------------------------------------------- torchrun's job-long store, in one process (fast)
def job_store():
    """A store like the one torchrun's agent keeps for a job, and the environment it gives workers."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


def as_torchrun_worker(monkeypatch, store, rank=0):
    for name, value in {
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }.items():
        monkeypatch.setenv(name, value)


def test_an_error_is_printed_once_a_job_by_whichever_rank_hits_it_first(monkeypatch, capsys):
    import distributed
    from utils import UserError

    store = job_store()
    as_torchrun_worker(monkeypatch, store)
    for rank in (0, 1, 0, 1):  # both ranks of the first attempt, then of a restart
        monkeypatch.setenv("RANK", str(rank))
        distributed.print_error(UserError("--epochs must be at least 1"))
    distributed.print_error(UserError("no training images at /data (on this node)"))  # rank 1's own
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 0: --epochs must be at least 1",
        "error: rank 1: no training images at /data (on this node)",
    ]
    # Nothing answers at the store's address (the agent is gone): every line is printed, at once.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    started = time.monotonic()
    distributed.print_error(UserError("--epochs must be at least 1"))
    assert capsys.readouterr().err == "error: rank 1: --epochs must be at least 1\n"
    assert time.monotonic() - started < 2


def test_a_restarted_rank_joins_rank_0s_new_attempt_not_the_failed_ones(monkeypatch):
    # The failed attempt's rank 0 left its store's port in the job's store, and is gone. A rank
    # of the next attempt that starts before the new rank 0 must wait for it, not join the old.
    import distributed

    job = job_store()
    as_torchrun_worker(monkeypatch, job)
    job.set(distributed._ATTEMPT_KEY, f"{free_port()} failed_attempts_nonce")
    timeout, joined = timedelta(seconds=20), {}
    rank_1 = threading.Thread(target=lambda: joined.update(rank_1=distributed._join_attempt(job, 1, timeout)))
    rank_1.start()
    time.sleep(0.5)
    store, attempt = distributed._join_attempt(job, 0, timeout)
    rank_1.join(timeout=20)
    assert attempt == joined["rank_1"][1] == 0
    store.set("rank_0_address", "here")
    assert joined["rank_1"][0].get("rank_0_address") == b"here"  # the same store
    # The next attempt has the next number, on both ranks.
    _, attempt = distributed._join_attempt(job, 0, timeout)
    assert attempt == distributed._join_attempt(job, 1, timeout)[1] == 1
