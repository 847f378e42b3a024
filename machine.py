"""The CPU threads a run uses and how busy the machine was while it was timed. (No torch here:
main.py loads it before torch, to time its start-up.)

PyTorch's CPU operators run on a thread a core. Beside another busy program, those threads fight it
for the cores (OpenMP's threads spin a while at each wait): on a 2-core AMD EPYC (AVX2) that other
work kept busy, a 2-epoch 32 px run took 207 s with the default threads against 25 s with one, and
one image's PyTorch latency 529 ms against 5.6 ms. So a run uses the cores other programs leave
(CpuThreads): all of them on a quiet machine, where spinning is the fastest way to wait, and one
fewer for each core another program keeps busy. Measured: benchmarks/threads.py, docs/benchmarks.md."""

import os
import time


def wait_policy():
    """How this process's OpenMP threads wait: "passive" (sleep at once: OMP_WAIT_POLICY=PASSIVE,
    or a spin count of 0) or "active" (spin first)."""
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or os.environ.get("GOMP_SPINCOUNT") == "0"
    return "passive" if passive else "active"


def threads_note(threads):
    """E.g. "2 threads (OpenMP waiting passive)", for the lines that print times."""
    return f"{threads} thread{'' if threads == 1 else 's'} (OpenMP waiting {wait_policy()})"


def load_average():
    """The 1-minute load average (runnable threads, this process's included), or None where the
    system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def default_workers(device_type, threads, environ=os.environ):
    """--num_workers' default: the CPUs this process may use (under torchrun its share of the
    node's), less on the CPU the `threads` PyTorch trains with, at most 8. On the CPU the training
    threads take the cores a worker would need: on 2 cores, 0, 1 and 2 workers trained the demo
    within noise of each other (benchmarks/threads.py), decoding there being ~25x faster than
    training, and the main process then loads its batches in a few percent of the time."""
    cpus = max(len(usable_cpus()) // int(environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return min(8, cpus if device_type != "cpu" else max(0, cpus - threads))


# Other programs keeping at least this many cores busy on average during a timed phase make its
# times slower than the machine's own: the timings then say so.
BUSY_CPUS = 0.5


def usable_cpus():
    """The CPUs this process may run on (a cpuset, taskset, SLURM or a container's limit), or all
    the machine's where the system cannot tell."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _busy_ticks(cpus):
    """CPU ticks the CPUs `cpus` have spent busy (user, nice, system, interrupts and steal: a VM's
    CPU taken by the host counts as taken), from /proc/stat's per-CPU lines; None where there are
    none. (Only the CPUs the run may use: other jobs on the rest of the machine take nothing.)"""
    wanted, total = {f"cpu{n}" for n in cpus}, 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name in wanted:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                    total += user + nice + system + irq + softirq + steal
                    wanted.discard(name)
    except (OSError, ValueError):
        return None
    return None if wanted else total


def _run_root():
    """The process whose tree is this run: under torchrun its agent (the parent of every rank on
    this machine, so that the other ranks and their workers are this run's, not other programs),
    else this process."""
    return os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()


def _own_ticks():
    """CPU ticks this run's processes have spent (see _run_root): the root's and every living
    descendant's (a data-loading worker, another rank), each with its children that ended; None
    where /proc cannot tell."""
    stats = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # (a process that ended meanwhile)
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3, the state; the name may hold spaces
        # (parent, utime + stime + cutime + cstime)
        stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    root = _run_root()
    if root not in stats:
        return None
    children = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


class LoadWatch:
    """How busy the machine was during a timed phase, for the JSON files (record()):
    `{"load_before": 0.4, "load_after": 3.1, "cpus": 2, "other_cpus": 0.02}`: the 1-minute load
    average before and after (this process's threads included; the whole machine's), the cores
    this run may use, and how many of them other programs kept busy on average meanwhile (the machine's busy CPU time less this run's
    processes': its workers' and, under torchrun, the other ranks'; None where /proc cannot tell)."""

    def __init__(self):
        self.before = load_average()
        self.started = time.monotonic()
        self.cpus = usable_cpus()
        self.busy, self.own = _busy_ticks(self.cpus), _own_ticks()

    def record(self, restart=False):
        """The record of the time since the watch started; `restart`: the watch then starts again
        from these readings (a look every few seconds reads /proc once, not twice)."""
        busy, own, now, load = _busy_ticks(self.cpus), _own_ticks(), time.monotonic(), load_average()
        seconds = now - self.started
        other = None
        if None not in (busy, own, self.busy, self.own) and seconds > 0:
            ticks = (busy - self.busy) - (own - self.own)
            other = round(max(0.0, ticks / os.sysconf("SC_CLK_TCK") / seconds), 2)
        record = {"load_before": self.before, "load_after": load, "cpus": len(self.cpus), "other_cpus": other}
        if restart:
            self.before, self.started, self.busy, self.own = load, now, busy, own
        return record


def was_busy(record):
    """Whether other programs took enough of the machine during a timed phase (a LoadWatch record,
    or a dict holding its keys: results.json's epochs, benchmark.json, inference.json) that its
    times are slower than the machine's own. Records from before other_cpus existed: whether the
    load average exceeded the cores (which counts the run's own threads too)."""
    if record.get("other_cpus") is not None:
        return record["other_cpus"] >= BUSY_CPUS
    cpus, loads = record.get("cpus"), (record.get("load_before"), record.get("load_after"))
    return bool(cpus) and any(load is not None and load > cpus for load in loads)


def busy_note(record, short=False):
    """'' when the machine was quiet enough during a timed phase (was_busy); else what took it, e.g.
    "other programs kept 1.02 of 2 cores busy while it was timed (load average 0.4 before, 3.1
    after, this run's threads included)"; short: without the load averages."""
    if not was_busy(record):
        return ""
    if record.get("other_cpus") is None:
        text = f"the machine was busier than its {record.get('cpus')} cores while it was timed"
    else:
        text = f"other programs kept {record['other_cpus']} of {record.get('cpus')} cores busy while it was timed"
    loads = [(record.get(key), when) for key, when in (("load_before", "before"), ("load_after", "after"))]
    loads = ", ".join(f"{load} {when}" for load, when in loads if load is not None)
    if short or not loads:
        return text
    return f"{text} (load average {loads}, this run's threads included)"


# Settings with which a user chose how many threads PyTorch's CPU operators use: we leave them be.
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def fixed_threads_reason(device, deterministic, compiled=False, environ=os.environ):
    """Why a run keeps its CPU threads fixed ('' when they follow other programs' load: see
    CpuThreads): a GPU run (its CPU threads do little), --deterministic (a thread count that changes
    changes the sums' order, and so the weights' last bits), --compile (torch.compile compiles the
    model again for each new count, ~90 s on 2 cores), or the user's own thread setting."""
    if device != "cpu":
        return "a GPU run"
    if deterministic:
        return "--deterministic"
    if compiled:
        return "--compile"
    # (An empty or malformed value, which OpenMP ignores with a warning, is no choice: "4,2" is 4.)
    chosen = [name for name in THREAD_SETTINGS if environ.get(name, "").split(",")[0].strip().isdigit()]
    return f"{chosen[0]} is set" if chosen else ""


def threads_left(most, cpus, other_cpus):
    """The threads of `most` that other programs' `other_cpus` (of the run's `cpus` CPUs) leave:
    their share of the threads (other_cpus x most / cpus: with hyperthreading PyTorch starts a
    thread a core, two CPUs each) counted as was_busy counts cores (half or more is one), at least 1."""
    return max(1, most - int(other_cpus * most / cpus + 1 - BUSY_CPUS))


def threads_line(threads):
    """A CPU training run's line about its threads (a CpuThreads), e.g. "CPU threads: 1 of 2 now,
    one fewer for each core other programs keep busy (...)" or "CPU threads: 2 (fixed:
    OMP_NUM_THREADS is set)"."""
    now = threads.get()
    if not threads.adapt:
        return f"CPU threads: {now}" + (f" (fixed: {threads.fixed})" if threads.fixed else "")
    return (
        f"CPU threads: {now}{f' of {threads.most}' if now != threads.most else ''} now, one fewer for each core "
        f"other programs keep busy (looked at every {threads.interval:g} s; OMP_NUM_THREADS=N fixes the count)"
    )


class CpuThreads:
    """PyTorch's CPU threads for a run. Unless `fixed` says why not (fixed_threads_reason), it
    looks how many cores other programs kept busy (LoadWatch's other_cpus) and uses the threads
    they leave (threads_left), never more than at the start: with 2 cores and one other busy
    program, one thread runs at its full speed where two fight that program for the cores
    (benchmarks/threads.py). Training looks every `interval` seconds (poll(), at a step); every
    job once as it starts, over the time since `watch` began (main.py's start-up: fit_now()).
    `adapt`: whether it looks at all (not with one thread). `get`/`set`: torch.get_num_threads
    and torch.set_num_threads (this module loads before torch)."""

    # A look over less time than this (a process forked with torch loaded) cannot tell: no change.
    SHORTEST_LOOK = 1.0

    def __init__(self, get, set, fixed, interval=2.0, watch=None):
        self.get, self.set, self.fixed, self.interval = get, set, fixed, interval
        self.most = get()
        self.adapt = not fixed and self.most > 1  # (one thread has nowhere to go)
        self.watch = watch or LoadWatch()
        self.start()

    def poll(self):
        """At a training step: the thread count for the next ones, every `interval` seconds."""
        if self.adapt and time.monotonic() - self.watch.started >= self.interval:
            self.fit_now()

    def fit_now(self):
        """The thread count from other programs' load since the last look (or `watch`'s start)."""
        if not self.adapt or time.monotonic() - self.watch.started < min(self.interval, self.SHORTEST_LOOK):
            return
        other = self.watch.record(restart=True)["other_cpus"]
        threads = self.most if other is None else threads_left(self.most, len(self.watch.cpus), other)
        if threads != self.get():
            self._count()
            self.set(threads)

    def start(self):
        """A timed phase (an epoch's training) starts: record() gives its mean count."""
        self.since, self.thread_seconds, self.seconds = time.monotonic(), 0.0, 0.0

    def record(self):
        """{"threads": the mean count since start(), time-weighted}, for results.json's epochs."""
        self._count()
        mean = self.thread_seconds / self.seconds if self.seconds > 0 else self.get()
        return {"threads": round(mean, 1)}

    def restore(self):
        """The count as it was at the start (a run in a process that goes on: the tests')."""
        if self.adapt:
            self.set(self.most)

    def _count(self):
        now = time.monotonic()
        self.thread_seconds += self.get() * (now - self.since)
        self.seconds += now - self.since
        self.since = now
