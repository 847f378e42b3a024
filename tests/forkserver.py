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

What differs from a fresh process, and why it does not matter to the tests:
- the child's parent is the server, not the launcher: a test probe that signals its parent
  (tests/ddp_probe.py) reads $AMP_TEST_LAUNCHER_PARENT, the launcher's parent;
- variables read only as Python starts or torch loads are the server's: the child applies
  OMP_NUM_THREADS (torch.set_num_threads) and LOGLEVEL (torchrun's loggers) itself; the server refuses (and the
  launcher starts a real process) when other such variables differ from its own, or when the
  launcher's interpreter started differently (flags, PYTHON* variables, path, encodings, umask);
- a warning issued while the modules imported is not issued again (importing them issues none);
- the children of one server share its str hash seed (set orders); numpy and torch are reseeded;
- the child is in the server's session, not the launcher's process group: signal the launcher;
- a SIGKILLed launcher's child is killed by the server a moment (~1-20 ms) after, not with it.
"""

import json
import os
import signal
import socket
import struct
import sys

ENV = "AMP_TEST_FORKSERVER"  # the server's socket
SITE_PATH = []  # the server's sys.path without its script's folder
PARENT_ENV = "AMP_TEST_LAUNCHER_PARENT"
# Read once, as torch loads (or at its first kernel): a caller that sets them other than the server
# has them needs a real process. (The debugging ones too: TORCH_DISTRIBUTED_DEBUG=DETAIL set for one
# child would be silently dropped. PYTHON* variables: see interpreter().)
LOAD_TIME_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_NUM_THREADS",
    "KMP_AFFINITY",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "TORCH_DISTRIBUTED_DEBUG",
    "TORCH_LOGS",
    "TORCH_CPP_LOG_LEVEL",
)
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
    import torch.distributed.launcher.api  # noqa: F401  (torchrun's agent, but for run.py: runpy runs that)

    import main  # noqa: F401  (and with it torch, torchvision and the project)

    loaded = {name: os.environ.get(name) for name in LOAD_TIME_VARIABLES}
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
                request["server_loglevel"] = os.environ.get("LOGLEVEL", "WARNING")
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
    differs = any(env.get(name) != value for name, value in loaded.items())
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
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # (read by OpenMP as torch loaded: in the server, which has none set)
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
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except KeyboardInterrupt as exc:
        print_uncaught(exc)
        code = -signal.SIGINT  # Python ends an uncaught Ctrl-C by dying of SIGINT
    except BaseException as exc:
        print_uncaught(exc)
        code = 1
    end(code)


def print_uncaught(exc):
    """The traceback Python prints, from the script's frame on: without this file's and runpy's."""
    tb = exc.__traceback__
    while tb and tb.tb_next and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
        tb = tb.tb_next
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # (Python prints the exception's own)


def exit_code(exc):
    """What the interpreter makes of an uncaught SystemExit."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def end(code):
    """Interpreter shutdown as far as anything outside the process sees it: non-daemon threads
    joined, atexit functions run, output flushed. Then exit without tearing down the ~2500
    modules one by one (a second of CPU, and nothing anyone sees)."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # as Python's final flush: a failed one is exit code 120
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except Exception as exc:
            if stream is sys.stdout:  # (said on stderr: `... | head` with output still buffered)
                print_unraisable(exc, stream)
            code = 120 if code >= 0 else code
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def print_unraisable(exc, obj):
    """What Python prints of an exception it can only ignore."""
    import traceback

    try:
        sys.stderr.write(f"Exception ignored in: {obj!r}\n{''.join(traceback.format_exception_only(type(exc), exc))}")
        sys.stderr.flush()
    except Exception:
        pass


def script_or_module(args):
    """Whether `args` are a command the server runs: SCRIPT ... or -m MODULE ...; anything else
    (-c CODE, interpreter options) gets a process of its own."""
    return bool(args) and (args[0] == "-m" and len(args) > 1 or not args[0].startswith("-"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        become(serve(sys.argv[2]))
    else:
        launch(sys.argv[1:])
