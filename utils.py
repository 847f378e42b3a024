"""Small helpers the other files share, in four sections: user errors (one line, exit 2),
seeding, atomic file writes and safe loading, and the run's log (console and train.log).
(torch is imported by the two functions that use it: config.py reads the flags with this
file's UserError before torch loads.)"""

import errno
import json
import logging
import logging.handlers
import os
import random
import sys
import tempfile


class UserError(Exception):
    """A mistake in the user's input (data, flags, files): main.py prints one line and exits 2."""

    exit_code = 2
    prefix = "error: "


class RunStopped(UserError):
    """The run stopped for a reason that is not a bug (a signal, divergence, a failed write):
    one line, and an exit code of its own."""

    prefix = ""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- seeding
def seed_everything(seed, deterministic=False):
    import torch

    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this set before its first call to be reproducible.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def derived_seed(*parts):
    """A 63-bit seed that depends only on `parts` (seed, epoch, step, ...), so any batch's
    randomness can be recreated after a resume without saving generator states."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# --------------------------------------------------------------------------- files
_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteFailed(OSError):
    """A file the disk refused (full, or over a size limit, or read-only): its `filename` and, in
    its `strerror`, why and how much room is left there (measured as it is made: make it again
    after cleaning up, see `again`). The callers say it in one line."""

    def __init__(self, errno_, reason, path):
        super().__init__(errno_, f"{reason} ({room_there(path, errno_)})", path)
        self.reason = reason

    def again(self):
        """The same failure with the room measured now (after the temporary files are gone)."""
        return WriteFailed(self.errno, self.reason, self.filename)


def room_there(path, errno_):
    """How much room a write to `path` had: the free space there, and for a file over a size limit
    (EFBIG) the limit of this process (ulimit -f), which the free space does not explain."""
    import resource
    import shutil

    try:
        room = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6:,.1f} MB free there"
    except OSError:
        room = "free space unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if errno_ == errno.EFBIG and limit != resource.RLIM_INFINITY:
        room = f"this process may write files of at most {limit / 1e6:,.1f} MB: ulimit -f; {room}"
    return room


# The errors of a write the disk or the file system refused: full (ENOSPC, EDQUOT), over a size
# limit (EFBIG), read-only or not ours (EROFS, EACCES, EPERM), or failing (EIO).
REFUSED_WRITE_ERRNOS = frozenset(
    (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
)


def write_failure(path, exc, *temporary):
    """The WriteFailed for `exc`, raised while writing `path` (through the `temporary` files), if
    a refused write caused it: an OSError with one of REFUSED_WRITE_ERRNOS about one of those
    files (or no file), or an error raised while cleaning up after one, as torch's zip writer
    does when its file stops growing. None for anything else (a bug: the caller raises it)."""
    cause = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if cause is None:
        return None
    if isinstance(cause, WriteFailed):
        return cause
    ours = {os.path.abspath(os.fsdecode(p)) for p in (path, *temporary) if p is not None}
    about = cause.filename
    if cause.errno not in REFUSED_WRITE_ERRNOS or not (
        about is None or (isinstance(about, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(about)) in ours)
    ):
        return None
    return WriteFailed(cause.errno, cause.strerror or str(cause), path)


def _atomic_write(path, write):
    """Write through `write(file)` into a temporary file beside `path`, fsync, then rename it
    over `path`: a crash or a full disk leaves the old file as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        failure = write_failure(path, exc, tmp) if isinstance(exc, Exception) else None
        if failure is None:
            raise
        raise failure from None


def atomic_write_files(directory, files):
    """{name: bytes} into `directory`, all or nothing. Every file is written to a temporary file
    and fsynced first; only then does each new one take its old one's place, in one rename, while
    a hard link (or a copy) keeps the old one aside: a file is never missing, even after a crash.
    If any step fails (full disk, read-only folder, a failed rename), the old files are put back:
    the folder holds the old set, never a new file beside an old one, and no temporary file.
    (A crash between two renames can still leave a mix: the kernel has no rename of several
    files at once.)"""
    staged, aside, moved = {}, {}, []  # name -> its new version's / its old version's temporary file
    try:
        for name, data in files.items():
            path = os.path.join(directory, name)
            try:
                fd, staged[name] = tempfile.mkstemp(dir=directory, prefix="." + name + ".", suffix=".tmp")
                os.chmod(staged[name], 0o666 & ~_UMASK)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if os.path.exists(path):
                    aside[name] = staged[name][: -len(".tmp")] + ".old.tmp"  # (remove_stale_temp_files reads it)
                    _keep_aside(path, aside[name])
            except Exception as exc:
                failure = write_failure(path, exc, staged.get(name), aside.get(name))
                raise exc if failure is None else failure from None
        for name in files:  # (only these renames change what the folder holds)
            os.replace(staged[name], os.path.join(directory, name))
            del staged[name]
            moved.append(name)
    except BaseException as exc:
        lost, kept = [], set()  # what could not be put back: where the previous files are
        for name in reversed(moved):  # back as it was: the old file, or none (the others are the old ones still)
            path = os.path.join(directory, name)
            try:
                if name in aside:
                    os.replace(aside[name], path)
                    del aside[name]
                else:  # (there was no old one)
                    os.unlink(path)
            except OSError as undo:
                kept.add(aside.get(name))
                lost.append(
                    f"the previous {name} is {aside[name]}" if name in aside else f"{path} is new (there was none)"
                )
                error = undo
        for tmp in [*staged.values(), *aside.values()]:
            if tmp not in kept:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if isinstance(exc, WriteFailed) and not lost:
            raise exc.again() from None  # (the free space without this write's temporary files)
        if lost and isinstance(exc, Exception):
            said = getattr(exc, "strerror", None) or exc
            raise OSError(
                error.errno,
                f"{said}; putting the previous files back failed too ({error.strerror}): {'; '.join(lost)}",
                getattr(exc, "filename", None),
            ) from exc
        raise
    for tmp in aside.values():
        os.unlink(tmp)


def _keep_aside(path, aside):
    """`aside`: the file at `path` as it is, which stays there (a hard link; a copy where the file
    system has none)."""
    import shutil

    try:
        os.link(path, aside)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        shutil.copy2(path, aside)
        with open(aside, "rb+") as f:
            os.fsync(f.fileno())


# --------------------------------------------------------------------------- one writer per run folder
LOCK_FILE = ".training.lock"  # hidden, and no file of the run's: a folder holding it alone holds no run
LOCK_GRACE_SECONDS = 2.0  # how long a start waits for a holder that may be ending before refusing
_held_locks = {}  # run folder -> the open lock file (its flock lives as long as it stays open)


def hold_run_folder(run_dir):
    """Make this process the one that trains into `run_dir` (creating the folder), or raise a
    UserError naming the process that is. An flock on the folder's lock file: the kernel drops it
    when its holder ends, SIGKILL included, so a restart or a resume after a crash finds it free.
    Called again for the same folder, it does nothing."""
    import socket
    import time

    run_dir = os.path.abspath(run_dir)
    if run_dir in _held_locks:
        return
    path = os.path.join(run_dir, LOCK_FILE)
    while True:
        try:
            os.makedirs(run_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as exc:
            raise UserError(f"cannot prepare {run_dir}: {exc.strerror or exc}") from None
        if not _lock(fd, time.monotonic() + LOCK_GRACE_SECONDS, path):
            holder = os.read(fd, 1000).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(_refusal(run_dir, path, holder))
        try:  # the file it locked is still the folder's (not one a releasing holder unlinked just before)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    since = time.strftime("%Y-%m-%d %H:%M:%S %z")
    try:  # (who holds it is for the refusal's line only: a full disk is said by the run's first real write)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode())
    except OSError:
        pass
    _held_locks[run_dir] = fd


def _refusal(run_dir, path, holder):
    """The line refusing a start into `run_dir`, whose lock file `path` says `holder` holds it."""
    import re
    import socket

    host = re.fullmatch(r"pid \d+ on (\S+), since .*", holder)
    down = ""
    if host and host[1] != socket.gethostname():  # (a network file system keeps a lost node's lock for its lease)
        down = f"; if {host[1]} is down, remove {path}"
    holder = holder or "one that has not said which: it has just started, or its disk is full"
    return (
        f"{run_dir} is being trained by another process ({holder}); wait for it to end or stop it "
        f"first (one process trains into a run folder at a time){down}"
    )


def _lock(fd, deadline, path):
    """Whether this process got the lock on `fd` by `deadline` (a holder that is ending, killed a
    moment ago, lets it go within milliseconds). A file system without locks is a UserError."""
    import fcntl
    import time

    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError as exc:  # ENOLCK (NFSv3 without lockd), ENOSYS (Lustre without -o flock), EOPNOTSUPP
            os.close(fd)
            raise UserError(
                f"cannot lock {path}: its file system does not support file locks ({exc.strerror or exc}); "
                "put --checkpoint_dir on one that does"
            ) from None


def _close_held_locks_in_child():
    """In a forked child (a DataLoader worker): close its copies of the lock files. An flock
    belongs to the open file, which a fork shares: a child outliving a killed trainer would keep
    the folder held until it noticed (seconds). Closing the child's copy leaves the parent's lock."""
    for fd in _held_locks.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held_locks.clear()  # (so the child's release_run_folders neither unlinks nor unlocks)


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def release_run_folders():
    """Give up the run folders this process holds (the lock file goes, then the lock)."""
    for run_dir, fd in list(_held_locks.items()):
        try:
            os.unlink(os.path.join(run_dir, LOCK_FILE))
        except OSError:  # (a folder removed meanwhile): the lock goes with the file descriptor
            pass
        os.close(fd)
        del _held_locks[run_dir]


def remove_stale_temp_files(directory):
    """Delete the temporary files a killed write left behind (see _atomic_write), except an old
    version kept aside (atomic_write_files' `.NAME.XXXXXXXX.old.tmp`) whose file is missing: that
    one goes back in its place."""
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            tmp = os.path.join(directory, name)
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            if name.endswith(".old.tmp"):  # (mkstemp's 8 random characters hold no dot)
                path = os.path.join(directory, name[1 : -len(".old.tmp")].rsplit(".", 1)[0])
                if not os.path.exists(path):
                    os.replace(tmp, path)
                    continue
            os.unlink(tmp)


def atomic_torch_save(obj, path):
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    data = text.encode()
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_savefig(figure, path):
    """A matplotlib figure as a PNG; a picture redrawn every epoch is never seen half-written."""
    _atomic_write(path, lambda f: figure.savefig(f, format="png"))


def torch_load_error(exc):
    """One line on why torch.load(weights_only=True) refused a file, without torch's advice to
    retry with weights_only=False (that would let a pickle run code)."""
    text = str(exc)
    if "Weights only load failed" in text:
        if "Unsupported operand" in text:  # not a pickle at all: a text, JSON or image file
            return "not a PyTorch file (its bytes are not a saved checkpoint's)"
        return "it holds Python objects besides tensors, which are not loaded for safety"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"truncated or not a PyTorch file ({first})"


def load_json(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- logging
def progress_bar(iterable, description, total=None):
    """`iterable` with a progress bar named `description` on a terminal (none for ''), for the
    passes that can take a while besides training's epochs: checking or caching the images,
    validation and test, precise BatchNorm. It disappears when done."""
    from tqdm import tqdm  # (here: config.py reads the flags before anything heavy loads)

    return tqdm(
        iterable, desc=description, total=total, leave=False, disable=not description or None, dynamic_ncols=True
    )


class _ConsoleHandler(logging.StreamHandler):
    """The log on stdout. When its reader has gone (`python main.py ... | head`), stop writing
    there quietly instead of printing a logging traceback for every line after."""

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            silence_stdout()
        else:
            super().handleError(record)


class _LogFileHandler(logging.FileHandler):
    """The log in the run's train.log. When the disk refuses a line (full, over a size limit),
    say so in one line on stderr, once, and go on logging to the console alone (instead of
    logging's traceback for every line after): the run's own files are what stop a run."""

    failed = False

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def handleError(self, record):
        failure = write_failure(self.baseFilename, sys.exc_info()[1])
        if failure is None:
            super().handleError(record)
            return
        self.failed = True
        try:
            self.stream.close()  # (what it holds back it cannot write either)
        except OSError:
            pass
        self.stream = None  # (close() then has nothing to flush)
        print(
            f"cannot write {failure.filename}: {failure.strerror}; the log goes on on the console only",
            file=sys.stderr,
            flush=True,
        )


def silence_stdout():
    """Point stdout at /dev/null, so later writes (and Python's final flush) find no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def setup_logging(main_process=True):
    """Log to stdout (in the main process only; the others stay silent). Lines are also held
    back until `log_to_file` names the run's log file, so nothing is written into a run folder
    before the run can start."""
    logger = logging.getLogger("amp")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not main_process:
        logger.addHandler(logging.NullHandler())
        return logger
    console = _ConsoleHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    logger.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    return logger


def log_to_file_only(logger, message):
    """Add `message` to the run's log file alone (it was printed already, on stderr)."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def log_to_file(logger, log_file):
    """From now on also log to `log_file` (appending), starting with the lines held back.
    Only the process that logs (see setup_logging) writes the file."""
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        return
    handler = _LogFileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(handler)
        held.flush()
        logger.removeHandler(held)
    logger.addHandler(handler)
