"""Shared fixtures: tiny generated datasets in temporary folders and a way to run the CLI."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main as main_module  # noqa: E402

# pytest.ini runs the tests in parallel processes (pytest-xdist): each gets its share of the cores
# (tiny tensors gain little from more than two threads).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))

# pytest-xdist hands out whole files (--dist loadfile), in collection order: the files that take
# longest go first, so that the short ones fill in at the end instead of one long file running
# alone. The order of their measured times on a 2-core CPU; files not named keep theirs, after these.
SLOWEST_FILES_FIRST = [
    "test_every_flag.py",
    "test_off_path.py",
    "test_elastic.py",
    "test_tricks.py",
    "test_ddp.py",
    "test_train.py",
    "test_float16.py",
    "test_export.py",
    "test_robustness.py",
    "test_zoo.py",
    "test_telemetry_report.py",
    "test_new_user.py",
    "test_mix_ema.py",
    "test_benchmark.py",
    "test_faults.py",
    "test_report.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# `python` for the tests that start scripts in processes of their own (`[*PYTHON, "main.py", ...]`,
# `[*PYTHON, "-m", "torch.distributed.run", ...]`, and torchrun's script `[FORKSERVER, "main.py"]`).
# Under the `forkserver` fixture each such process is forked from a server that has torch loaded
# already (~5 CPU seconds saved a process); otherwise it is a plain `python`. See tests/forkserver.py.
FORKSERVER = os.path.join(ROOT, "tests", "forkserver.py")
PYTHON = [sys.executable, FORKSERVER]


def main_command(data, checkpoint_dir, name, *flags):
    """The command line of a `python main.py` process (started through the fork server: PYTHON)
    training run `name` of `checkpoint_dir` on `data`, `flags` added."""
    return [
        *PYTHON,
        os.path.join(ROOT, "main.py"),
        "--data_dir",
        data,
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--checkpoint_name",
        name,
        *flags,
    ]


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir():
    """$TMPDIR, for the processes the tests start, is a folder of this session's that goes when it
    ends: what they leave in it goes too (torchrun's agent leaves an empty /tmp/torchelastic_*
    folder a job). This process keeps its own (pytest's tmp_path folders are kept on failure)."""
    tempfile.gettempdir()  # (fixed now, from the $TMPDIR this process started with)
    folder = tempfile.mkdtemp(prefix="amp-tests-tmp-")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = folder
    yield folder
    if before is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = before
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def forkserver():
    """A fork server for this test process's PYTHON commands, while the session lasts.
    AMP_TEST_FORKSERVER=off: none, each command a plain `python` (to rule the server out)."""
    import forkserver as fs

    if os.environ.get(fs.ENV) == "off":
        yield None
        return
    folder = tempfile.mkdtemp(prefix="amp-forkserver-")
    if len(os.path.join(folder, "socket.new").encode()) > 107:  # (a socket's path's limit: a long $TMPDIR)
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix="amp-forkserver-", dir="/tmp")
    path = os.path.join(folder, "socket")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # a child sets its own
    # A session of its own: a Ctrl-C to pytest's process group reaches the children through their
    # launchers only (once), and does not take the server down under them (the teardown stops it).
    with open(os.path.join(folder, "server.log"), "wb") as log:
        server = subprocess.Popen(
            [sys.executable, FORKSERVER, "--serve", path],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not os.path.exists(path):
        server.kill()
        server.wait()
        log = open(os.path.join(folder, "server.log")).read()[-3000:]
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"the fork server did not start: {log}")
    os.environ[fs.ENV] = path
    yield path
    del os.environ[fs.ENV]
    # A server that died, or a launcher that found none, would leave the rest of the session on
    # plain python unnoticed (the launcher falls back to it): say so, with the server's last words.
    ended = server.poll()
    if ended is None:
        server.terminate()
        server.wait(timeout=30)
    log = open(os.path.join(folder, "server.log"), errors="replace").read()[-3000:]
    no_server = os.path.join(folder, fs.NO_SERVER_FILE)
    fallbacks = open(no_server).read()[-2000:] if os.path.exists(no_server) else ""
    shutil.rmtree(folder, ignore_errors=True)
    if ended is not None:
        pytest.fail(f"the fork server ended (exit code {ended}) before the session did: {log}")
    if fallbacks:
        pytest.fail(f"launchers found no fork server and ran plain python:\n{fallbacks}\nserver.log: {log}")


# Small and fast: 32 px images, random init, no worker processes, no progress bars.
FAST = [
    "--image_size",
    "32",
    "--batch_size",
    "16",
    "--no_pretrained",
    "--num_workers",
    "0",
    "--no_progress",
    "--device",
    "cpu",
    "--learning_rate",
    "2e-3",
]


# For runs whose point is not the model (the AMP machinery, checkpoints and signals, resuming, the
# benchmark's table): on the CPU a ResNet-18 training step at 32 px takes ~7 s in float16 (its
# backward has no fast CPU kernels) and ~3 s in bfloat16 where bfloat16 is emulated (AVX2-only
# CPUs); ShuffleNetV2 x0.5's takes ~0.2 s in both, and its checkpoints a few MB, not 135.
SMALL_MODEL = ["--model", "shufflenet_v2_x0_5"]


# --export's timing loops, shortened for tests (tests check what is measured, not how fast).
FEW_TIMING_RUNS = dict(LATENCY_RUNS=3, LATENCY_WARMUP=1, THROUGHPUT_RUNS=1, THROUGHPUT_WARMUP=1)


def make_colour_dataset(root, train_per_class=20, test_per_class=8, size=32, seed=0):
    """Three easy classes (noisy pictures tinted red, green or blue) in the Kaggle layout: a
    random-init ResNet-18 learns them in a few CPU seconds."""
    rng = np.random.default_rng(seed)
    for split, n in (("seg_train", train_per_class), ("seg_test", test_per_class)):
        for k, name in enumerate(("blue", "green", "red")):
            folder = os.path.join(root, split, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 140, (size, size, 3))
                pixels[..., 2 - k] += 110
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"))
    return str(root)


@pytest.fixture(scope="module", autouse=True)
def drop_checkpoints_after_each_module(tmp_path_factory):
    """When a test module is done, delete the checkpoints (~130 MB each) its runs left under the
    temporary folder, kept or not: a suite run must not fill the disk. Logs and results stay."""
    yield
    for path in tmp_path_factory.getbasetemp().rglob("*.pt"):
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A learnable three-class dataset (20 train + 8 test images a class, 32 px)."""
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture
def run_cli(tmp_path, capsys):
    """run_cli(*flags) -> (exit code, stdout, stderr), with checkpoints under tmp_path."""

    def run(*flags, checkpoint_dir=None):
        argv = ["--checkpoint_dir", str(checkpoint_dir or tmp_path / "checkpoints"), *map(str, flags)]
        if {"--resume", "--evaluate", "--predict"} & set(argv) and "--num_workers" not in argv:
            # In this process, as FAST's runs: (--num_workers is this session's, not the run's.) A
            # worker loader left to a later garbage collection can race its queues' feeder threads
            # and print a traceback into another test's captured stderr.
            argv += ["--num_workers", "0"]
        code = main_module.main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(result, *needles):
    """A run_cli result that is a user error: exit code 2, one line on stderr naming `needles`."""
    code, out, err = result
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


class SimulatedCrash(Exception):
    """A crash main.py does not handle (as a power cut would not be)."""


def crash_in_epoch(monkeypatch, epoch_to_crash):
    """Make Trainer.train_one_epoch crash when it starts `epoch_to_crash` (0-based); returns a
    function that undoes it."""
    import trainer

    original = trainer.Trainer.train_one_epoch

    def train_one_epoch(self, epoch):
        if epoch == epoch_to_crash:
            raise SimulatedCrash
        return original(self, epoch)

    monkeypatch.setattr(trainer.Trainer, "train_one_epoch", train_one_epoch)
    return lambda: monkeypatch.setattr(trainer.Trainer, "train_one_epoch", original)


def read_results(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, and a proxy on a closed loopback port so that any download fails
    at once instead of reaching the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    return tmp_path / "torch_home"
