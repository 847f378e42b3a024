"""Small helpers shared by the other files: user errors, seeding, metrics, timing, memory,
atomic file writes, logging, and the torch.distributed set-up, teardown and collectives a run
needs under torchrun."""
import json
import logging
import logging.handlers
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM (preemption) ask the trainer to stop after the current step,
    save, and exit; a second Ctrl-C exits at once (atomic writes keep the files whole)."""

    def __init__(self):
        self.signal = None
        self.finishing = None  # set to what is being finished when stopping would only lose it (the test)
        self._previous = {}

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self):
        """Whether to stop after this step. torchrun hands a signal on to every rank, but they may
        see it a step apart: under DDP every rank takes the first one any of them has seen."""
        if world_size() > 1:
            seen = torch.tensor(self.signal or 0)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=_host_group)  # CPU: no wait for the GPU
            # Decide on the agreed value alone: a signal that lands after the all-reduce counts at
            # the next step, on every rank alike (else one rank could stop a step before the rest).
            agreed = int(seen)
            self.signal = self.signal or agreed or None
            return agreed != 0
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            print("second interrupt: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        if not is_main_process():
            return
        if self.finishing:
            print(f"\n{signal.Signals(signum).name}: training is done and saved; finishing {self.finishing} "
                  "first (press Ctrl-C again to stop now; --resume then runs the test)", file=sys.stderr, flush=True)
        else:
            print(f"\n{signal.Signals(signum).name}: stopping after the current step "
                  "(press Ctrl-C again to exit at once)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- distributed
def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process():
    return rank() == 0


def all_reduce_sum(tensor):
    """Sum a tensor over all processes in place (a no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor):
    """The maximum of a tensor over all processes, in place (a no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP does so at the start of each
    forward only, so after an epoch each rank holds the statistics of its own last batch."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


_host_group = None  # None: the default group, which is gloo itself on the CPU


def launched_by_torchrun():
    """torchrun (and launchers like it) give every process these before it starts."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def launched_world_size():
    """The number of processes launched, known before any group is joined (1 without torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def local_rank():
    """This process's index on its node: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device, timeout_seconds):
    """Under torchrun, join the process group: NCCL between GPUs, gloo on the CPU. A collective
    that waits longer than `timeout_seconds` for a dead or stuck rank fails instead of hanging.
    Without torchrun nothing happens and everything stays single-process."""
    if not launched_by_torchrun():
        return False
    device = torch.device(device)
    options = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options["device_id"] = device  # binds the group to this GPU (no device guessing in barriers)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds), **options)
    global _host_group
    # Small host-side agreements (stop on a signal) go over gloo, so they never wait for a GPU.
    _host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return True


def leave_distributed():
    global _host_group
    _host_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model, device, sync_bn=False):
    """DistributedDataParallel around `model` (already on `device`). With `sync_bn` BatchNorm
    becomes SyncBatchNorm first, so its statistics cover the global batch. Save and evaluate the
    wrapper's `.module`: its state dict has no `module.` prefix."""
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = torch.device(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def print_error(exc):
    """A user error's one line on stderr; under torchrun it names the rank."""
    where = f"rank {os.environ.get('RANK', '?')}: " if launched_world_size() > 1 else ""
    print(f"{exc.prefix}{where}{exc}", file=sys.stderr, flush=True)


class PeerError(UserError):
    """A failure of a set-up step that is already printed, by this rank or the one that hit it:
    exit with its code and say nothing more."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def agreed_failure(exc):
    """`exc` to raise where all ranks stop together on a decision they share (divergence, a
    signal): rank 0 reports it, the others exit with its code quietly."""
    return exc if is_main_process() else PeerError(str(exc), exc.exit_code)


def _fail(exc):
    """Print `exc` (one line for a UserError, else its traceback) before the other ranks hear of
    it, since torchrun ends this process as soon as one of them exits. (message, exit code)."""
    if isinstance(exc, UserError):
        print_error(exc)
        return str(exc), exc.exit_code
    traceback.print_exc()
    return f"{type(exc).__name__}: {exc}", 1


def from_main_process(fn, *args):
    """`fn(*args)` run by rank 0 alone and its result handed to every rank (pickled).

    For file work the ranks must not race on (creating the run folder, reading a checkpoint
    rank 0 has just written) or that only rank 0's node may be able to do. It is also a barrier.
    If it fails on rank 0 every rank raises, so none is left waiting for the others.
    """
    if world_size() == 1:
        return fn(*args)
    outcome = [None]
    if is_main_process():
        try:
            outcome[0] = (fn(*args), None)
        except Exception as exc:
            failure = _fail(exc)
            dist.broadcast_object_list([(None, failure)], src=0)
            raise PeerError(*failure) from exc
    dist.broadcast_object_list(outcome, src=0)
    result, failure = outcome[0]
    if failure is not None:
        raise PeerError(*failure)
    return result


def on_all_ranks(fn, *args):
    """`fn(*args)` on every rank; if it fails on any rank, every rank raises, so none goes on to
    wait in a collective for a rank that has quit. For set-up steps that can fail on some ranks
    only (a file missing on one node, weights read by rank 0 alone)."""
    if world_size() == 1:
        return fn(*args)
    try:
        result, failure = fn(*args), None
    except Exception as exc:
        result, failure = None, _fail(exc)
    failures = [None] * world_size()
    dist.all_gather_object(failures, failure)
    failure = failure or next((f for f in failures if f is not None), None)
    if failure is not None:
        raise PeerError(*failure)
    return result


# --------------------------------------------------------------------------- seeding
def seed_everything(seed, deterministic=False):
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


# --------------------------------------------------------------------------- metrics
class ClassificationMeter:
    """Accumulates loss, accuracy and a confusion matrix on the device, so that the training
    loop never waits for the GPU; `compute()` is the only place that syncs."""

    def __init__(self, num_classes, device):
        self.num_classes = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, loss, logits, targets):
        """`loss` is the batch mean; rows of the confusion matrix are true classes."""
        self.loss_sum += loss.detach().double() * targets.numel()
        pairs = targets * self.num_classes + logits.argmax(dim=1)
        self.confusion += torch.bincount(pairs, minlength=self.num_classes ** 2)

    def state_dict(self):
        """The sums over all processes (a collective under DDP)."""
        return {"loss_sum": all_reduce_sum(self.loss_sum.clone()).cpu(),
                "confusion": all_reduce_sum(self.confusion.clone()).cpu()}

    def load_state_dict(self, state):
        """Rank 0 takes the saved sums and the other ranks start from zero, so they count once."""
        if is_main_process():
            self.loss_sum.copy_(state["loss_sum"])
            self.confusion.copy_(state["confusion"])

    def compute(self):
        """Loss, accuracy (percent), count and confusion matrix summed over all processes."""
        loss_sum = all_reduce_sum(self.loss_sum.clone())
        confusion = all_reduce_sum(self.confusion.clone()).view(self.num_classes, -1).cpu()
        count = int(confusion.sum())
        correct = int(confusion.diag().sum())
        return {
            "loss": float(loss_sum) / max(count, 1),
            "acc": 100.0 * correct / max(count, 1),
            "count": count,
            "confusion": confusion,
        }


# --------------------------------------------------------------------------- timing, memory
def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds that include the GPU work queued before `stop()`."""

    def __init__(self, device):
        self.device = device
        synchronize(device)
        self.start = time.perf_counter()

    def stop(self):
        synchronize(self.device)
        return time.perf_counter() - self.start

    def elapsed(self):
        """Seconds so far, without waiting for the GPU (for checkpoints, not for benchmarks)."""
        return time.perf_counter() - self.start


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """Peak CUDA memory allocated by tensors since the last reset, or None on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


# --------------------------------------------------------------------------- files
_UMASK = os.umask(0)
os.umask(_UMASK)


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
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temp_files(directory):
    """Delete the temporary files a killed write left behind (see _atomic_write)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))


def atomic_torch_save(obj, path):
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
        return "it holds Python objects besides tensors, which are not loaded for safety"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"truncated or not a PyTorch file ({first})"


def load_json(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- logging
class _ConsoleHandler(logging.StreamHandler):
    """The log on stdout. When its reader has gone (`python main.py ... | head`), stop writing
    there quietly instead of printing a logging traceback for every line after."""

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            silence_stdout()
        else:
            super().handleError(record)


def silence_stdout():
    """Point stdout at /dev/null, so later writes (and Python's final flush) find no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def setup_logging():
    """Log to stdout (main process only). Lines are also held back until `log_to_file` names
    the run's log file, so nothing is written into a run folder before the run can start."""
    logger = logging.getLogger("amp")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not is_main_process():
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
    """From now on also log to `log_file` (appending), starting with the lines held back."""
    if not is_main_process():
        return
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(handler)
        held.flush()
        logger.removeHandler(held)
    logger.addHandler(handler)
