"""torchrun and DistributedDataParallel: who this process is (ranks, launch environment),
joining and leaving the process group, wrapping the model, the collectives a run needs, and
rank-0 work and failures that all ranks agree on. In a single process every helper here is a
no-op or returns what one process would, so the rest of the code reads the same either way."""

import contextlib
import hashlib
import os
import socket
import sys
import time
import traceback
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils import UserError


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


def gradient_sync(model, update):
    """Under DDP, skip the gradient all-reduce on micro-batches that only accumulate (`update`
    False): `model.no_sync()`. Elsewhere a no-op context."""
    if update or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_gather_lists(items):
    """Every process's list of picklable `items`, concatenated in rank order (over gloo on the
    host: small host-side data needs no GPU copy)."""
    if world_size() == 1:
        return list(items)
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, list(items), group=_host_group)
    return [item for share in gathered for item in share]


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


def restarts_allowed():
    """Whether torchrun restarts the group when a worker fails (`torchrun --max-restarts N`, N > 0)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0


_job_token = None  # set by init_distributed: this torchrun job's own, kept in torchrun's store
_attempt = 0  # set by init_distributed: see torchrun_attempt


def torchrun_job_id():
    """This torchrun job's id, the same in every restart of the job and no other job's: its
    --rdzv-id (torchrun's default "none" when not given, so not enough alone) and a token the
    job's first start leaves in torchrun's store, which lives as long as the job. None without
    torchrun."""
    if not launched_by_torchrun():
        return None
    return f"{os.environ.get('TORCHELASTIC_RUN_ID')}:{_job_token}"


def torchrun_attempt():
    """How many earlier attempts of this torchrun job (its first start and restarts) had a rank 0
    that began to join the group: 0 on its first start, and the same number on every rank. Not
    TORCHELASTIC_RESTART_COUNT, which is each node's own count (see _join_attempt); it can be
    lower than torchrun's count, when an attempt's rank 0 died before it began to join."""
    return _attempt


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
    timeout = timedelta(seconds=timeout_seconds)
    global _job_token, _attempt
    process_rank, processes = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if agent_shares_store():
        job_store = agent_store(timeout)
        if job_store is None:  # (meeting in some other store would bring back the stale entries)
            raise RuntimeError(
                f"torchrun's store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} does not answer"
            )
        store, _attempt = _join_attempt(job_store, process_rank, timeout)
    else:  # (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 hosts a new store each attempt, so no
        # restart finds its job's token or counts as one, and its run folder is refused as usual)
        store, process_rank, processes = next(dist.rendezvous("env://", timeout=timeout))
        job_store = store
    # The first rank to ask sets it; every rank of every restart reads that one.
    _job_token = job_store.compare_set("amp_pytorch_job_token", "", uuid.uuid4().hex).decode()
    dist.init_process_group(backend, store=store, rank=process_rank, world_size=processes, timeout=timeout, **options)
    global _host_group
    # Small host-side agreements (stop on a signal) go over gloo, so they never wait for a GPU.
    _host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return True


def _store_client(host, port, timeout):
    """A client of the TCPStore at host:port, or None when nothing listens there (a plain socket
    asks first: the store's own client retries until its timeout and logs every try)."""
    try:
        socket.create_connection((host, port), timeout=timeout.total_seconds()).close()
        return dist.TCPStore(host, port, is_master=False, timeout=timeout)
    except (OSError, RuntimeError):  # (torch's DistError is a RuntimeError)
        return None


def agent_shares_store():
    """Whether torchrun's agent lets the workers use the store it keeps for the whole job (it
    does unless launched with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def agent_store(timeout):
    """A client of the store torchrun's agent on the first node keeps for the whole job, every
    attempt and every node; None when torchrun shares none (not torchrun, or
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) or nothing answers there."""
    if not agent_shares_store():
        return None
    return _store_client(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout)


_ATTEMPT_KEY = "amp_pytorch_attempt_store"  # in the job's store: "PORT NONCE" of the latest attempt's


def _join_attempt(job_store, process_rank, timeout):
    """(a store of this attempt's own, hosted by rank 0, for its process group; the attempt's number).

    The job's store outlives the attempts: a restarted group that joined in it would read the
    failed attempt's entries (its ranks' addresses) and wait on ranks that are gone. A key prefix
    per attempt needs a number every node agrees on, and TORCHELASTIC_RESTART_COUNT is not one:
    an agent whose worker was still busy when another node's died restarts it without counting
    (a membership change). So rank 0 counts the attempt, starts a store, and leaves its port and
    a nonce in the job's store; the others take the port once the store there holds that nonce.
    A port left by a failed attempt leads nowhere: torchrun stops every worker of an attempt
    before the next one starts."""
    host = os.environ["MASTER_ADDR"]  # (the first node's: global rank 0 runs there)
    if process_rank == 0:
        attempt = job_store.add("amp_pytorch_attempts", 1) - 1
        store = dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = uuid.uuid4().hex
        store.multi_set(["nonce", "attempt"], [nonce, str(attempt)])
        job_store.set(_ATTEMPT_KEY, f"{store.port} {nonce}")
        return store, attempt
    deadline, tried = time.monotonic() + timeout.total_seconds(), None
    while time.monotonic() < deadline:
        published = job_store.get(_ATTEMPT_KEY).decode()  # (waits for the first attempt's rank 0)
        if published != tried:
            tried = published
            port, nonce = published.split()
            store = _store_client(host, int(port), timedelta(seconds=5))
            with contextlib.suppress(RuntimeError):  # (a store that never gets the nonce: not this attempt's)
                if store is not None and store.get("nonce").decode() == nonce:
                    return store, int(store.get("attempt"))
        time.sleep(0.1)
    raise RuntimeError(f"rank 0 did not publish this attempt's store within {timeout.total_seconds():.0f} s")


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
    """A user error's one line on stderr; under torchrun it names the rank, once a job."""
    where = f"rank {os.environ.get('RANK', '?')}: " if launched_world_size() > 1 else ""
    if first_report(f"{exc.prefix}{exc}"):
        print(f"{exc.prefix}{where}{exc}", file=sys.stderr, flush=True)


def first_report(line):
    """Whether `line` is news in this torchrun job: False when a rank (this attempt's or an
    earlier one's) has printed it already.

    An error that repeats (a bad flag, a missing file) fails every rank of every attempt the
    same way: 8 lines for 2 processes under --max-restarts 3, where one says it. The job's store
    counts each line (the first to count prints); a line only some ranks hit, such as a file
    missing on one node, is still printed by the first of them. Without torchrun's store (no
    torchrun, or nothing answers there within seconds) every line is news."""
    store = agent_store(timedelta(seconds=3))
    if store is None:
        return True
    try:
        return store.add(f"amp_pytorch_printed_{hashlib.sha256(line.encode()).hexdigest()}", 1) == 1
    except RuntimeError:  # (the store went away meanwhile)
        return True


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


def agreed_by_main(decision):
    """Rank 0's `decision` (a bool) on every rank, over the host (a clock only rank 0 reads)."""
    if world_size() == 1:
        return decision
    decided = torch.tensor(int(decision))
    dist.broadcast(decided, src=0, group=_host_group)
    return bool(decided)


def agreed_signal(local_signal):
    """The signal number any rank has seen (0: none). torchrun hands a signal on to every rank,
    but they may see it a step apart: every rank takes the first one any of them has seen."""
    if world_size() == 1:
        return local_signal
    seen = torch.tensor(local_signal)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=_host_group)  # CPU: no wait for the GPU
    return int(seen)


# ----------------------------------------------------------------------------- several nodes
SHARED_FOLDER_WAIT = 3.0  # seconds a rank looks for rank 0's token (a network file system may lag)


def token_visible(path):
    return os.path.exists(path)


def check_shared_folder(folder):
    """Under torchrun on several processes: that every rank sees `folder` (the checkpoint
    folder) as rank 0 does. Rank 0 writes a token file there; after a barrier every rank looks
    for it; a rank that cannot see it stops the job with one line. A restart may put rank 0,
    which writes and reads the checkpoints, on any node, so all of them need the same folder."""
    if world_size() == 1:
        return
    token = from_main_process(_write_token, folder)  # (a barrier: written before anyone looks)
    try:
        on_all_ranks(_look_for_token, folder, token)
    finally:
        if is_main_process():
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, token))


def _write_token(folder):
    token = f".shared_check_{uuid.uuid4().hex}"  # a name no node has looked up (no cached miss)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, token), "w") as f:
            f.write(f"written by rank 0 on {socket.gethostname()}\n")
    except OSError as exc:
        raise UserError(f"cannot write to the checkpoint folder {folder}: {exc.strerror or exc}") from None
    return token


def _look_for_token(folder, token):
    deadline = time.monotonic() + SHARED_FOLDER_WAIT
    while not token_visible(os.path.join(folder, token)):
        if time.monotonic() >= deadline:
            raise UserError(
                f"the checkpoint folder {folder} is not shared with rank {rank()}'s node "
                f"({socket.gethostname()}): it cannot see the file rank 0 wrote there. Under torchrun "
                "every node needs the same --checkpoint_dir (a shared file system), since a restart "
                "may put rank 0, which writes and reads the checkpoints, on any node"
            )
        time.sleep(0.2)
