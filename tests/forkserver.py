"""Start `python main.py ...` in tests without paying for `import torch` each time.

Each Python process of main.py spends ~5 CPU seconds importing torch, torchvision and the
project before it does anything; the tests start ~70 of them (signals, kills and resumes, the
torchrun jobs). A server (one per test process, started by conftest's `forkserver` fixture)
imports all of that once; for each run it forks a child that takes the caller's standard
streams, working folder, environment and arguments and runs the script as `__main__`, as a
fresh `python SCRIPT ARGS` would: same exit code, same output, same files.

    python tests/forkserver.py SCRIPT ARGS...        # in place of: python SCRIPT ARGS...
    python tests/forkserver.py -m MODULE ARGS...     # in place of: python -m MODULE ARGS...

That command is the launcher: a light process (no torch) that stands for the child. Signals sent
to it (SIGINT, SIGTERM, ...) are passed on to the child; when the child ends, the launcher ends
the same way (its exit code, or killed by the same signal); when the launcher is SIGKILLed, the
server SIGKILLs the child at once. Without a server (no $AMP_TEST_FORKSERVER, or none answers)
the launcher simply becomes `python SCRIPT ARGS`; `AMP_TEST_FORKSERVER=off python -m pytest ...`
runs the tests so, with no server at all (slower: to tell whether a failure is the server's).
In `ps` a child has the server's command line (`forkserver.py --serve SOCKET`) and the server as
its parent; the test's own process is the launcher (`forkserver.py SCRIPT ARGS`).

A child ends as a fresh process ends: its script returns (or raises) into the interpreter's own
shutdown (non-daemon threads joined, atexit functions, the final flush and its exit code 120,
__del__ of what the script's globals held, modules torn down), then the C library's exit (its
handlers, C++ static destructors): a crash or an abort at exit shows as it would. That costs
~0.5 s of CPU a child (tearing down ~2500 modules copies the server's memory pages they sit on);
the server freezes its objects out of the garbage collector before each fork, or it would be ~2 s.

What differs from a fresh process, and why it does not matter to the tests:
- the child's parent is the server, not the launcher: a test probe that signals its parent
  (tests/ddp_probe.py) reads $AMP_TEST_LAUNCHER_PARENT, the launcher's parent;
- variables read only as Python starts or torch loads are the server's. The server refuses (and
  the launcher starts a real process) when such a variable (the thread pools' OMP_*, MKL_*,
  OPENBLAS_*..., ATEN_CPU_CAPABILITY, see LOAD_TIME_VARIABLES) is set in the launcher's
  environment other than in the server's own as it started, or when the launcher's interpreter
  started differently (flags, PYTHON* variables, path, encodings, umask). The child applies two
  itself: OMP_NUM_THREADS (torch.set_num_threads: see become()) and LOGLEVEL (torchrun's loggers);
- the server imports main.py before torch, and compares with its environment from before that
  import: were main.py to set such a variable before torch loads (it sets none now), torch would
  load in the server as in a fresh `python main.py`, and in a child main.py runs again and would
  set it in os.environ the same way; a script that loads torch without main.py (torchrun's agent,
  the probes) would get main.py's settings too;
- a warning issued while the modules imported is not issued again (importing them issues none);
- the children of one server share its str hash seed (set orders); numpy and torch are reseeded;
- the child is in the server's session, not the launcher's process group: signal the launcher;
- a SIGKILLed launcher's child is killed by the server a moment (~1-20 ms) after, not with it.
"""

import gc
import json
import os
import signal
import socket
import struct
import sys

ENV = "AMP_TEST_FORKSERVER"  # the server's socket
SITE_PATH = []  # the server's sys.path without its script's folder
PARENT_ENV = "AMP_TEST_LAUNCHER_PARENT"
NO_SERVER_FILE = "no-server.log"  # beside the socket: the launchers that found no server there
# Read once, as torch loads (or at its first kernel): a caller that sets them other than the server
# has them needs a real process. (The debugging ones too: TORCH_DISTRIBUTED_DEBUG=DETAIL set for one
# child would be silently dropped. PYTHON* variables: see interpreter().)
LOAD_TIME_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "TORCH_DISTRIBUTED_DEBUG",
    "TORCH_LOGS",
    "TORCH_CPP_LOG_LEVEL",
)
# The thread pools' (OpenMP's: GNU's and Intel's, MKL's, OpenBLAS's), all read as they load:
# OMP_WAIT_POLICY, OMP_PROC_BIND, GOMP_SPINCOUNT, KMP_BLOCKTIME, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS...
# OMP_NUM_THREADS alone a child applies itself (see become()).
THREAD_POOL_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "GOTO_")
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def send_message(sock, obj, fds=()):
    data = json.dumps(obj).encode()
    header = struct.pack("!I", len(data))
    if fds:
        socket.send_fds(sock, [header + data], list(fds))
    else:
        sock.sendall(header + data)


def receive_message(sock, with_fds=0):
    """The next message (and the file descriptors that came with it); None at end of stream."""
    fds = []
    if with_fds:
        chunk, fds, _, _ = socket.recv_fds(sock, 1 << 20, with_fds)
    else:
        chunk = sock.recv(4)
    while 0 < len(chunk) < 4:
        chunk += sock.recv(4 - len(chunk))
    if not chunk:
        return None
    (length,) = struct.unpack("!I", chunk[:4])
    data = chunk[4:]
    while len(data) < length:
        more = sock.recv(length - len(data))
        if not more:
            return None
        data += more
    return (json.loads(data), fds) if with_fds else json.loads(data)


# --------------------------------------------------------------------------- the launcher
def launch(args):
    """Run `args` (SCRIPT ARGS or -m MODULE ARGS) in a child of the server; end as it ended."""
    path = os.environ.get(ENV) if script_or_module(args) and os.environ.get(ENV) != "off" else None
    ignored = [signum for signum in RELAYED_SIGNALS if signal.getsignal(signum) == signal.SIG_IGN]  # (inherited)
    # Every one, the inherited-ignored too (as in `cmd &` from a script): the child starts with those
    # ignored, as a fresh Python would, but may install a handler (main.py does, for SIGINT).
    pending = []  # signals that came before the child's pid: passed on once it is known
    for signum in RELAYED_SIGNALS:
        signal.signal(signum, lambda signum, frame: pending.append(signum))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        env = {**os.environ, PARENT_ENV: str(os.getppid())}
        request = {
            "args": args,
            "cwd": os.getcwd(),
            "env": env,
            "unbuffered": unbuffered(),
            "ignored": ignored,
            "interpreter": interpreter(),
        }
        send_message(sock, request, fds=(0, 1, 2))
        reply = receive_message(sock)
    except (OSError, TypeError):  # no server: a process of its own, as without the launcher
        reply = None
    if path and reply is None:  # (not a refusal: the server is gone) recorded for conftest's teardown
        try:
            with open(os.path.join(os.path.dirname(path), NO_SERVER_FILE), "a") as record:
                record.write(f"pid {os.getpid()}: {' '.join(args)}\n")
        except OSError:
            pass
    if not reply or "pid" not in reply:
        sock.close()
        import subprocess

        flags = [*subprocess._args_from_interpreter_flags(), *(["-u"] if unbuffered() else [])]  # (-W, -X, -O, ...)
        for signum in RELAYED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
        for signum in pending:
            os.kill(os.getpid(), signum)
        os.environ.pop(PARENT_ENV, None)  # (one inherited from a forked torchrun agent names the agent's parent)
        os.execv(sys.executable, [sys.executable, *flags, *args])
    child = reply["pid"]
    for signum in RELAYED_SIGNALS:  # first: a signal from here on is relayed, not pending
        signal.signal(signum, lambda signum, frame: relay(child, signum))
    for signum in pending:
        relay(child, signum)
    status = receive_message(sock)
    sock.close()  # (else a ResourceWarning at exit, shown under PYTHONWARNINGS=default, joins the child's stderr)
    if status is None:  # the server died
        sys.exit(1)
    code = status["returncode"]
    if code < 0:  # killed by a signal: so is the launcher
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def unbuffered():
    """Whether this launcher was started with python -u (or PYTHONUNBUFFERED), as torchrun starts workers."""
    return bool(getattr(sys.stdout, "write_through", False))


def interpreter():
    """What this interpreter took from its command line and environment as it started (flags,
    warning filters, -X options, path, encodings), and the umask: a child of the server has the
    server's. (-u and PYTHONUNBUFFERED excepted: a child sets up its streams itself.)"""
    umask = os.umask(0)
    os.umask(umask)
    python_env = {k: v for k, v in os.environ.items() if k.startswith("PYTHON") and k != "PYTHONUNBUFFERED"}
    streams = [(s.encoding, s.errors) if s else None for s in (sys.stdin, sys.stdout, sys.stderr)]
    return json.loads(
        json.dumps(
            [
                list(sys.flags),
                sys.warnoptions,
                sys._xoptions,
                sys.path[1:],
                python_env,
                sys.getfilesystemencoding(),
                streams,
                umask,
            ]
        )
    )


def relay(child, signum):
    try:
        os.kill(child, signum)
    except ProcessLookupError:  # it has just ended: the server is telling us how
        pass


# --------------------------------------------------------------------------- the server
def serve(path):
    """Accept requests on the socket `path` until SIGTERM; fork a child for each. Returns only in
    a child, with its request (its standard streams already in place)."""
    import selectors
    import shutil

    global SITE_PATH
    SITE_PATH = sys.path[1:]  # without this file's folder: a child puts its script's there
    started_as = interpreter()  # (a child gets this, whatever its launcher's)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    # What a fresh process would have found as torch loaded: the server's own variables, taken
    # before main.py may set some (it runs again in each child, which then sets the same ones).
    loaded = load_time_variables(os.environ)
    import main  # noqa: F401, I001  (first: torch loads as main.py has it load; with it torchvision and the project)
    import torch.distributed.launcher.api  # noqa: F401  (torchrun's agent, but for run.py: runpy runs that)

    # numpy's OpenBLAS started a thread pool as it loaded, and stops it before each fork (its own
    # fork handler; a child starts one at its first BLAS call): after one fork, any thread left
    # is one a child would miss (see the assertion below).
    if os.fork() == 0:
        os._exit(0)
    os.wait()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    os.rename(path + ".new", path)  # (the socket appears ready to connect to)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children = {}  # pid -> connection to its launcher

    def stop(signum, frame):  # (conftest's teardown) no child outlives the server
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    parent = os.getppid()
    while True:
        if os.getppid() != parent:  # the test process died without its teardown: so does the server, and its folder
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            stop(None, None)
        for key, _ in selector.select(timeout=0.02):
            if key.fileobj is listener:
                connection, _ = listener.accept()
                message = read_request(connection, loaded, started_as)
                if message is None:
                    continue
                request, fds = message
                sys.stdout.flush()
                sys.stderr.flush()
                # A fork copies the calling thread alone: a thread pool (OpenMP's, after a parallel
                # torch op here) would be missing in the child, whose next parallel op then hangs.
                threads = len(os.listdir("/proc/self/task"))
                if threads != 1:  # (not an assert: python -O would drop it)
                    raise SystemExit(f"the fork server has {threads} threads: a forked child would miss them")
                request["server_loglevel"] = os.environ.get("LOGLEVEL", "WARNING")
                # The garbage collector leaves the server's objects alone in a child: else its
                # passes (and the one at exit) write to every object's header, and a child copies
                # all the server's memory pages (~1.5 s at each child's exit).
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (become sets it as the caller had it)
                    selector.close()
                    listener.close()
                    for other in children.values():
                        other.close()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    send_message(connection, {"pid": os.getpid()})
                    connection.close()  # (the server keeps its end: the launcher's life)
                    return request
                for fd in fds:
                    os.close(fd)
                children[pid] = connection
                selector.register(connection, selectors.EVENT_READ, data=pid)
            else:  # a launcher's end closed: it was killed, so its child is killed too
                pid = key.data
                selector.unregister(key.fileobj)
                if pid in children:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    children.pop(pid).close()
        report_ended(children, selector)


def read_request(connection, loaded, started_as):
    """(the request, its standard streams' descriptors) of a launcher the server can serve; None
    (the connection closed, any refusal sent) for one it cannot."""
    try:
        message = receive_message(connection, with_fds=3)
    except (OSError, ValueError):  # a launcher gone mid-request (or not a launcher): not the server's end
        message = None
    if message is None:
        connection.close()
        return None
    request, fds = message
    env = request.get("env", {})
    threads = env.get("OMP_NUM_THREADS", "1")
    differs = load_time_variables(env) != loaded or not (threads.isdigit() and int(threads) > 0)
    if differs or request.get("interpreter") != started_as:
        try:
            send_message(connection, {"refused": "a variable read while torch or Python loads differs"})
        except OSError:  # (the launcher is gone)
            pass
        connection.close()
        for fd in fds:
            os.close(fd)
        return None
    return request, fds


def load_time_variables(env):
    """The variables of `env` read as Python, torch or its thread pools load (OMP_NUM_THREADS aside)."""
    return {
        name: value
        for name, value in env.items()
        if name in LOAD_TIME_VARIABLES or name.startswith(THREAD_POOL_PREFIXES) and name != "OMP_NUM_THREADS"
    }


def report_ended(children, selector):
    """Tell the launchers of the children that ended how each ended."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is None:
            continue
        selector.unregister(connection)
        try:
            send_message(connection, {"returncode": os.waitstatus_to_exitcode(status)})
        except OSError:
            pass
        connection.close()


def become(request):
    """Turn this forked child into `python ARGS` as the request describes it."""
    import io
    import logging
    import runpy

    import numpy as np
    import torch

    for signum in RELAYED_SIGNALS:  # as a fresh Python sets them, from what its parent left ignored
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, signal.SIG_IGN if signum in request["ignored"] else default)
    os.chdir(request["cwd"])
    import multiprocessing.process  # (torch loaded it, in the server's folder)

    multiprocessing.process.ORIGINAL_DIR = request["cwd"]  # spawn's children find a relative script from there
    os.environ.clear()
    os.environ.update(request["env"])
    import tempfile

    tempfile.tempdir = None  # (the server's imports fixed it from the server's $TMPDIR)
    loaded_level = logging.getLevelName(request["server_loglevel"])
    if os.environ.get("LOGLEVEL", "WARNING") != request["server_loglevel"]:  # torchrun's loggers took the server's
        for name, logger in logging.Logger.manager.loggerDict.items():
            if name.startswith("torch.distributed") and getattr(logger, "level", None) == loaded_level:
                logger.setLevel(os.environ.get("LOGLEVEL", "WARNING"))
    # OMP_NUM_THREADS (torchrun sets it to 1 for each worker) was read as torch loaded, by OpenMP
    # and MKL, in the server, which has none (conftest). Setting it now is what loading would have
    # done: OpenMP starts its pool at the first parallel op (the server has made none: one thread),
    # sized by the nthreads ICV that omp_set_num_threads sets as OMP_NUM_THREADS does; torch's own
    # count and MKL's are set with it. (Not numpy's OpenBLAS pool: its size stays the server's,
    # which changes how many threads a numpy matrix product uses, not what it gives.) A value
    # other than one number (a list, "4,2") is refused.
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    np.random.seed()  # a fresh process's numpy draws from the OS, not from the server's state;
    torch.seed()  # so does torch's default generator (its first seed is random too)
    unbuffered = request["unbuffered"] or bool(os.environ.get("PYTHONUNBUFFERED"))
    for name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "rb" if fd == 0 else "wb", closefd=False)
        raw.name = f"<{name}>"  # (as Python names them: in its messages, e.g. a failed final flush)
        stream = raw if unbuffered and fd else (io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw))
        line_buffering = fd == 2 or (fd == 1 and os.isatty(1))
        new = io.TextIOWrapper(
            stream,
            encoding=old.encoding,
            errors=old.errors,
            line_buffering=line_buffering,
            write_through=unbuffered and fd != 0,
        )
        new.mode = "r" if fd == 0 else "w"
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)
    args = request["args"]
    try:
        if args[0] == "-m":  # as `python -m MODULE`: the working folder first on the path
            sys.argv = [args[1], *args[2:]]
            sys.path[:] = [request["cwd"], *SITE_PATH]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:  # as `python SCRIPT`: the script's folder first, its __file__ absolute
            sys.argv = list(args)
            sys.path[:] = [os.path.dirname(os.path.abspath(args[0])), *SITE_PATH]
            runpy.run_path(os.path.abspath(args[0]), run_name="__main__")
    except SystemExit:
        raise  # Python's own handling: its exit code (and message), then its shutdown
    except BaseException as exc:
        print_uncaught(exc)
        if not isinstance(exc, KeyboardInterrupt):
            sys.exit(1)
        # Python dies of SIGINT, after its shutdown, when a KeyboardInterrupt reaches the top:
        # this one does, silently (it is printed already, without this file's frames).
        sys.excepthook = lambda *_: None
        raise
    # Returning, the child ends as any Python process ends: the interpreter's own shutdown, then
    # the C library's exit (its handlers, C++ static destructors).


def print_uncaught(exc):
    """The traceback Python prints, from the script's frame on: without this file's and runpy's."""
    tb = exc.__traceback__
    while tb and tb.tb_next and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
        tb = tb.tb_next
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # (Python prints the exception's own)


def script_or_module(args):
    """Whether `args` are a command the server runs: SCRIPT ... or -m MODULE ...; anything else
    (-c CODE, interpreter options) gets a process of its own."""
    return bool(args) and (args[0] == "-m" and len(args) > 1 or not args[0].startswith("-"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        become(serve(sys.argv[2]))
    else:
        launch(sys.argv[1:])
