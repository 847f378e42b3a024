"""main.py under torchrun, with hooks for tests/test_ddp.py that only observe or break a run.

Started like main.py (`torchrun ... tests/ddp_probe.py FLAGS`); the environment picks the hooks:

PROBE_DUMP_DIR      every rank saves the weights it trained (its model's state dict) just before
                    the final test, as rank<R>.pt, and with --ema_decay its EMA's state as
                    ema_rank<R>.pt (only rank 0 saves anything otherwise)
PROBE_SIGTERM_STEP  after that optimizer step rank 0 sends SIGTERM to torchrun, as a cluster
                    preempting the job would; torchrun hands it on to every rank
PROBE_CRASH_RANK    that rank crashes as training starts, while the others wait in a collective
PROBE_AGREEMENTS_DIR every rank writes agreements_rank<R>.json as it exits: [optimizer step, signal
                    agreed on] for each stop agreement (GracefulStop's collective) it took part in

It also holds `helpers_worker`, a process of the two-process test of the distributed helpers.
"""

import io
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def install_hooks():
    import torch

    import trainer
    from distributed import is_main_process, rank
    from scheduler import WarmupCosineLR

    agreements_dir = os.environ.get("PROBE_AGREEMENTS_DIR")
    dump_dir = os.environ.get("PROBE_DUMP_DIR")
    sigterm_step = os.environ.get("PROBE_SIGTERM_STEP")
    crash_rank = os.environ.get("PROBE_CRASH_RANK")
    Trainer = trainer.Trainer

    if dump_dir:
        test = Trainer.test

        def dumping_test(self):
            torch.save(self.model.state_dict(), os.path.join(dump_dir, f"rank{rank()}.pt"))
            if self.ema is not None:
                torch.save(self.ema.state_dict(), os.path.join(dump_dir, f"ema_rank{rank()}.pt"))
            return test(self)

        Trainer.test = dumping_test

    if sigterm_step:
        step = WarmupCosineLR.step

        def signalling_step(self, *args, **kwargs):
            step(self, *args, **kwargs)
            if self.last_epoch == int(sigterm_step) and is_main_process():
                # The parent is torchrun's agent (under tests/forkserver.py, the launcher's parent).
                os.kill(int(os.environ.get("AMP_TEST_LAUNCHER_PARENT", os.getppid())), signal.SIGTERM)

        WarmupCosineLR.step = signalling_step

    if agreements_dir:
        record_agreements(agreements_dir)

    if crash_rank is not None:
        train_one_epoch = Trainer.train_one_epoch

        def crashing_train_one_epoch(self, epoch):
            if rank() == int(crash_rank):
                raise RuntimeError(f"probe: rank {rank()} crashed")
            return train_one_epoch(self, epoch)

        Trainer.train_one_epoch = crashing_train_one_epoch


def record_agreements(out_dir):
    """Log each stop agreement with the optimizer step it was made at; written at exit."""
    import atexit

    import checkpoint
    from scheduler import WarmupCosineLR

    agreements, agree, step = [], checkpoint.agreed_signal, WarmupCosineLR.step

    def counted_agreement(local_signal):
        agreed = agree(local_signal)
        agreements.append([last_step[0], agreed])
        return agreed

    last_step = [None]

    def noted_step(self, *args, **kwargs):
        step(self, *args, **kwargs)
        last_step[0] = self.last_epoch

    def write():
        with open(os.path.join(out_dir, f"agreements_rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(agreements, f)

    checkpoint.agreed_signal = counted_agreement
    WarmupCosineLR.step = noted_step
    atexit.register(write)


def helpers_worker(rank, store, out_dir):
    """One of two processes: runs each distributed helper through success and failure on a
    gloo group and writes what it saw (results, errors, what it printed) to rank<R>.json."""
    import torch.distributed as dist

    import distributed
    from checkpoint import GracefulStop
    from utils import UserError

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    def fail(exc):
        raise exc

    def stop_seen_by(signalled_rank):
        stop = GracefulStop()
        if rank == signalled_rank:
            stop.signal = signal.SIGTERM
        return [stop.requested(), stop.signal]

    def agreed_only_when_asked():
        stop = GracefulStop()
        if rank == 1:
            stop.signal = signal.SIGTERM
        # Between agreements: the last one (none yet), no collective; then the agreement itself.
        return [stop.requested(agree=False), stop.requested(agree=True), stop.requested(agree=False)]

    cases = {
        "main_result": lambda: distributed.from_main_process(lambda: f"made by rank {distributed.rank()}"),
        "main_user_error": lambda: distributed.from_main_process(fail, UserError("no checkpoint here")),
        "main_bug": lambda: distributed.from_main_process(fail, ValueError("boom")),
        "all_result": lambda: distributed.on_all_ranks(lambda: distributed.rank()),
        "rank1_user_error": lambda: distributed.on_all_ranks(
            lambda: distributed.rank() == 1 and fail(UserError("data missing on this node"))
        ),
        "signal_on_rank1": lambda: stop_seen_by(1),
        "no_signal": lambda: stop_seen_by(None),
        "agreed_only_when_asked": agreed_only_when_asked,
    }
    seen = {}
    for name, case in cases.items():
        stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            seen[name] = {"result": case()}
        except distributed.PeerError as exc:
            seen[name] = {"error": str(exc), "exit_code": exc.exit_code}
        finally:
            printed, sys.stderr = sys.stderr.getvalue(), stderr
        seen[name]["printed"] = printed
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    install_hooks()
    import main

    sys.exit(main.main())
