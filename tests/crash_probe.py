"""main.py with a planted fault, for tests of what a failure leaves behind:
- PROBE_WORKER_BUG=1: resizing an image raises in the data-loading workers (a failed run with
  worker processes must exit, not wait for them forever);
- PROBE_KILL_AT_BEST=1: the process SIGKILLs itself when it first writes best.pt (after the
  epoch's last step was checkpointed, before the epoch's last.pt);
- PROBE_KILL_AFTER_STEP=N: the process SIGKILLs itself right after optimizer step N (and its
  checkpoint, if one was due): a kill at a known place, for bit-exact resume tests."""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dataset  # noqa: E402
import main  # noqa: E402
import trainer  # noqa: E402


def broken_resize(self, image):
    raise RuntimeError("probe: a bug in a data-loading worker")


def kill_at_best(obj, path):
    if os.path.basename(path) == "best.pt":
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, path)


def kill_after_step(self, *args):
    real_save_if_due(self, *args)
    if self.scheduler.last_epoch == int(os.environ["PROBE_KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if os.environ.get("PROBE_WORKER_BUG"):
        dataset.ResizeUint8.__call__ = broken_resize
    if os.environ.get("PROBE_KILL_AT_BEST"):
        real_save = trainer.atomic_torch_save
        trainer.atomic_torch_save = kill_at_best
    if os.environ.get("PROBE_KILL_AFTER_STEP"):
        real_save_if_due = trainer.Trainer.save_if_due
        trainer.Trainer.save_if_due = kill_after_step
    sys.exit(main.main())
