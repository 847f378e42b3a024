"""tests/forkserver.py stands in for `python SCRIPT` in the tests that start processes: a process
it starts must end, print and answer signals as a fresh `python` does, or those tests would stop
testing what they say. Each case runs the same small script both ways and compares."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PYTHON

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = """
import os, signal, sys, time
what = sys.argv[1]
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


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("forkserver") / "script.py"
    path.write_text(SCRIPT)
    return str(path)


def both(script, *args, **kwargs):
    """(through the server, plain python): each a completed process."""
    return [
        subprocess.run([*python, script, *args], capture_output=True, text=True, timeout=60, **kwargs)
        for python in (PYTHON, [sys.executable])
    ]


def last_line(text):
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("what", ["exit3", "message", "bug", "ctrl_c", "ok"])
def test_exit_code_and_output_are_those_of_a_fresh_python(script, tmp_path, what):
    env = {**os.environ, "CASE": what, "TMPDIR": str(tmp_path)}
    served, plain = both(script, what, "--flag", "x y", cwd=tmp_path, env=env)
    assert served.returncode == plain.returncode
    assert served.stdout == plain.stdout  # arguments, working folder, environment, sys.path[0], temporary folder
    assert served.stderr.splitlines()[0] == "err" and last_line(served.stderr) == last_line(plain.stderr)


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
