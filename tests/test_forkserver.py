"""tests/forkserver.py stands in for `python SCRIPT` in the tests that start processes: a process
it starts must end, print and answer signals as a fresh `python` does, or those tests would stop
testing what they say. Each case runs the same small script both ways and compares."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FORKSERVER, PYTHON

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = """
import os, signal, sys, time
what = sys.argv[1]
if what == "parent":  # and the thread count of the torch it has loaded, if any
    print(open(f"/proc/{os.getppid()}/cmdline").read().split(chr(0))[1:3])
    print("torch" in sys.modules and sys.modules["torch"].get_num_threads())
    sys.exit()
print("out", flush=True)
print("err", file=sys.stderr)
if what == "exit3":
    sys.exit(3)
if what == "message":
    sys.exit("a message")
if what == "bug":
    raise ValueError("a bug")
if what == "ctrl_c":
    raise KeyboardInterrupt
if what == "wait":  # until a signal; SIGTERM is handled (as main.py's GracefulStop does)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    print(os.getpid(), flush=True)
    time.sleep(60)
import tempfile
print(sys.argv[2:], os.getcwd(), os.environ.get("CASE"), os.path.basename(sys.path[0]), tempfile.gettempdir())
"""


# What a process does as it ends: each argument one thing, in the order Python does them.
AT_EXIT = """
import atexit, ctypes, os, sys, threading, time
class Noisy:
    def __del__(self):
        print("__del__ of a global")  # (after the final flush: printed by the second)
        print("__del__ on stderr", file=sys.stderr)
class Abrupt:
    def __del__(self):
        os._exit(3)  # (output still buffered is lost, as in any process)
def late():
    time.sleep(0.3)
    print("a non-daemon thread, joined at exit")
print("start")
for what in sys.argv[1:]:
    if what == "atexit":
        atexit.register(print, "an atexit function")
    if what == "del":
        noisy = Noisy()
    if what == "del_exit":
        abrupt = Abrupt()
    if what == "thread":
        threading.Thread(target=late).start()
    if what == "c_stdio":  # flushed by the C library's exit(), after Python's shutdown
        libc = ctypes.CDLL(None)
        libc.fdopen.restype = ctypes.c_void_p
        libc.fputs(b"C stdio, buffered\\n", ctypes.c_void_p(libc.fdopen(1, b"w")))
    if what == "exit5":
        sys.exit(5)
    if what == "bug":
        raise ValueError("a bug")
    if what == "ctrl_c":
        raise KeyboardInterrupt
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("forkserver") / "script.py"
    path.write_text(SCRIPT)
    return str(path)


@pytest.fixture(scope="module")
def at_exit_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("forkserver") / "at_exit.py"
    path.write_text(AT_EXIT)
    return str(path)


def both(script, *args, **kwargs):
    """(through the server, plain python): each a completed process."""
    return [
        subprocess.run([*python, script, *args], capture_output=True, text=True, timeout=60, **kwargs)
        for python in (PYTHON, [sys.executable])
    ]


def test_the_server_runs_the_script(script, forkserver):
    """Else every test here compares plain python with itself: a server that refuses or fails
    each request is invisible, as the launcher then starts a process of its own."""
    if forkserver is None:
        pytest.skip("no server (AMP_TEST_FORKSERVER=off)")
    served = subprocess.run([*PYTHON, script, "parent"], capture_output=True, text=True, timeout=60)
    assert served.stdout.split("'")[1:4:2] == [FORKSERVER, "--serve"], served.stderr


@pytest.mark.parametrize(
    "env, served",
    [({"OMP_NUM_THREADS": "1"}, True), ({"OMP_NUM_THREADS": "4,2"}, False), ({"GOMP_SPINCOUNT": "12345"}, False)],
)
def test_a_variable_read_as_torch_loads_is_applied_or_refused(script, forkserver, env, served):
    """OMP_NUM_THREADS (each torchrun worker's) the child applies as loading would have; one the
    server did not load with gets a fresh process."""
    if forkserver is None:
        pytest.skip("no server (AMP_TEST_FORKSERVER=off)")
    proc = subprocess.run(
        [*PYTHON, script, "parent"], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )
    parent, threads = proc.stdout.splitlines()
    assert ("--serve" in parent) == served, proc.stderr
    if served:
        assert threads == "1"


def last_line(text):
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("what", ["exit3", "message", "bug", "ctrl_c", "ok"])
def test_exit_code_and_output_are_those_of_a_fresh_python(script, tmp_path, what):
    env = {**os.environ, "CASE": what, "TMPDIR": str(tmp_path)}
    served, plain = both(script, what, "--flag", "x y", cwd=tmp_path, env=env)
    assert served.returncode == plain.returncode
    assert served.stdout == plain.stdout  # arguments, working folder, environment, sys.path[0], temporary folder
    assert served.stderr.splitlines()[0] == "err" and last_line(served.stderr) == last_line(plain.stderr)


@pytest.mark.parametrize(
    "whats",
    [
        ["atexit", "del", "thread", "c_stdio"],
        ["atexit", "del_exit"],
        ["atexit", "del", "exit5"],
        ["atexit", "del", "thread", "bug"],
        ["atexit", "del", "ctrl_c"],
    ],
    ids="-".join,
)
def test_a_process_ends_as_a_fresh_python_ends(at_exit_script, whats):
    """Interpreter shutdown, whole: threads joined, atexit functions, the final flush, __del__ of
    what the script's globals hold (one that ends the process too), then the C library's exit."""
    served, plain = both(at_exit_script, *whats)
    assert (served.returncode, served.stdout, served.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert plain.stdout.startswith("start\n")  # (and the script got as far as its end)


def sigint(handler):
    """For Popen's preexec_fn: the child starts with SIGINT at `handler`. A process inherits an
    ignored SIGINT (a job started with `&` from a script has one, and so does pytest started so):
    Python then keeps ignoring it, served or not, and a test of Ctrl-C must not depend on that."""
    return lambda: signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_launcher_reaches_the_script(script, signum):
    proc = subprocess.Popen(
        [*PYTHON, script, "wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint(signal.SIG_DFL),  # (as from a terminal, whatever started pytest)
    )
    assert proc.stdout.readline() == "out\n"
    child = int(proc.stdout.readline())  # the process that runs the script
    proc.send_signal(signum)
    proc.communicate(timeout=30)
    # As a fresh python: exit 143 from the handler, death by KeyboardInterrupt's SIGINT, or killed.
    expected = {signal.SIGTERM: 143, signal.SIGINT: -signal.SIGINT, signal.SIGKILL: -signal.SIGKILL}
    assert proc.returncode == expected[signum]
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:  # (the server reaps it)
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{child}")


def test_an_inherited_ignored_sigint_stays_ignored_as_in_plain_python(script):
    for python in (PYTHON, [sys.executable]):
        proc = subprocess.Popen(
            [*python, script, "wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=sigint(signal.SIG_IGN),
        )
        assert proc.stdout.readline() == "out\n"
        proc.stdout.readline()  # (its pid: it is waiting)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 143, python
