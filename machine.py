"""The CPU threads a run uses and how busy the machine was while it was timed. (No torch here:
passive_openmp must run before torch loads.)

OpenMP's threads, which PyTorch's CPU operators run on, by default spin for a while after each
parallel region instead of sleeping. On a machine with no core to spare (a laptop, a shared
server, a data-loading worker beside them) the spinning threads take the cores that the working
ones need, and a step can take 20-30 times as long. Sleeping at once (OMP_WAIT_POLICY=PASSIVE)
costs a few percent on an idle machine and avoids that; see benchmarks/threads.py."""

import os

# Settings with which a user chose how OpenMP threads wait; any of them set: we leave it alone.
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def passive_openmp(environ=os.environ):
    """Make OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE) unless the user set how they
    wait. libgomp reads it once, when it loads with torch: call this before `import torch`.
    Data-loading workers inherit it (PyTorch gives each of them one thread)."""
    if not any(name in environ for name in WAIT_SETTINGS):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def wait_policy():
    """How this process's OpenMP threads wait: "passive" (sleep at once) or "active" (spin first)."""
    return "passive" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else "active"


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


class LoadWatch:
    """The load average before and after a timed phase, and the cores:
    `{"load_before": 0.4, "load_after": 3.1, "cpus": 2}` (record()) for the JSON files."""

    def __init__(self):
        self.before = load_average()

    def record(self):
        return {"load_before": self.before, "load_after": load_average(), "cpus": os.cpu_count()}


def busy_note(record):
    """'' when the load stayed within the cores during a timed phase (a LoadWatch record, or a
    dict holding its keys); else why its times may be slow, e.g. "the machine was busy while it
    was timed: load average 0.4 before, 3.1 after, on 2 cores (this process's threads included)"."""
    loads = [record.get(key) for key in ("load_before", "load_after")]
    cpus = record.get("cpus")
    if not cpus or not any(load is not None and load > cpus for load in loads):
        return ""
    shown = ", ".join(f"{load} {when}" for load, when in zip(loads, ("before", "after")) if load is not None)
    return (
        f"the machine was busy while it was timed: load average {shown}, on {cpus} cores "
        "(this process's threads included), so these times may be slow"
    )
