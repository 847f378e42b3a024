"""A run's checkpoints: where a run stands (RunState), what a checkpoint holds and how a run goes
on from one (Checkpoints: the one place the saved keys are named), loading one safely, and
stopping into one on Ctrl-C or SIGTERM (GracefulStop)."""

import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from distributed import agreed_by_main, agreed_signal, is_main_process, world_size
from utils import UserError, torch_load_error


def run_command(name, checkpoint_dir="checkpoints", *flags, demo=False):
    """The command line that names run `name` (with its --checkpoint_dir where not the default),
    `flags` added: what the hints tell a user to run next, e.g. run_command("early", "checkpoints",
    "--resume") -> "python main.py --checkpoint_name early --resume". `demo`: a --demo run, named
    as --demo names its FP32 and AMP runs where it is one of them ("python main.py --demo --amp")."""
    if demo and name in ("demo", "demo_amp"):
        run = ["--demo", *(["--amp"] if name == "demo_amp" else [])]
    else:
        run = [*(["--demo"] if demo else []), "--checkpoint_name", name]
    where = [] if os.path.normpath(checkpoint_dir) == "checkpoints" else ["--checkpoint_dir", str(checkpoint_dir)]
    # Quoted as a shell reads them: a folder or run name with a space is still one argument.
    return " ".join(["python", "main.py", *(shlex.quote(part) for part in [*run, *where, *flags])])


def existing_runs(checkpoint_dir):
    """The names of the runs in `checkpoint_dir` (folders holding a last.pt or best.pt), sorted."""
    try:
        folders = sorted(entry.name for entry in os.scandir(checkpoint_dir) if entry.is_dir())
    except OSError:
        return []
    return [
        name
        for name in folders
        if any(os.path.exists(os.path.join(checkpoint_dir, name, f)) for f in ("last.pt", "best.pt"))
    ]


def no_such_run(checkpoint_dir):
    """The end of the line that says a run is missing: which runs there are."""
    runs = existing_runs(checkpoint_dir)
    if not runs:
        return f"{checkpoint_dir} holds no runs yet"
    shown = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
    return f"the runs in {checkpoint_dir}: {shown}"


# The keys every checkpoint of this template has had; a file without them is not one.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "class_names", "config")


@dataclass
class RunState:
    """Where a run stands, besides its weights and the optimizer's, schedule's and scaler's state.
    Every checkpoint saves all of it except `best_weights` (best.pt's "weights" records that)."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of epoch `epoch` already trained (a mid-epoch checkpoint)
    epoch_state: dict | None = None  # that unfinished epoch's meter, seconds and step counts
    best_val_acc: float = -1.0  # best.pt's validation accuracy
    best_weights: str = "raw"  # what best.pt holds: "raw", or "ema" when the EMA validated better
    history: list = field(default_factory=list)  # one record per finished epoch
    total_train_seconds: float = 0.0

    def finish_epoch(self, record, seconds):
        """Record a finished epoch (its history `record`, `seconds` of it in this session). True
        when it validated best so far: best.pt, due then, holds the epoch's better weights by
        validation accuracy, raw or EMA (the raw ones on a tie)."""
        self.epoch = record["epoch"]
        self.history.append(record)
        self.total_train_seconds += seconds
        weights = "ema" if record.get("val_acc_ema", -1.0) > record["val_acc"] else "raw"
        val_acc = record["val_acc_ema" if weights == "ema" else "val_acc"]
        if val_acc <= self.best_val_acc:
            return False
        self.best_val_acc, self.best_weights = val_acc, weights
        return True

    def position(self, batches_per_epoch):
        """Where the run stands, as the save and resume messages say it."""
        if self.batch_in_epoch:
            return f"epoch {self.epoch + 1}, after batch {self.batch_in_epoch} of {batches_per_epoch}"
        return f"after epoch {self.epoch}"


class Checkpoints:
    """What a checkpoint holds, and putting it back: the model, optimizer, LR schedule, GradScaler
    and EMA given here, the RunState and the StepHealth counts. "model" holds the raw weights,
    except in best.pt, where it holds the weights that validated best ("weights": raw or EMA).
    With --ema_decay, "ema" is the EMA's state (weights, BatchNorm statistics, update count)."""

    def __init__(self, model, optimizer, scheduler, scaler, ema, cfg, class_names):
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.cfg = cfg
        self.class_names = class_names

    def contents(self, state, health, weights="raw"):
        """The checkpoint of `state` (a RunState) and `health` (a StepHealth), with the raw or
        the EMA weights as "model"."""
        contents = {
            "model": (self.ema.module if weights == "ema" else self.model).state_dict(),
            "weights": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "class_names": self.class_names,
            "config": vars(self.cfg),
            "batch_in_epoch": state.batch_in_epoch,
            "epoch_state": state.epoch_state,
            "best_val_acc": state.best_val_acc,
            "history": state.history,
            **health.state_dict(),  # skipped_steps, bad_streak
            "total_train_seconds": state.total_train_seconds,
            "world_size": world_size(),
        }
        if self.ema is not None:
            contents["ema"] = self.ema.state_dict()
        return contents

    def restore(self, checkpoint, health, steps_per_epoch):
        """Load `checkpoint` (made by `contents`) into the objects and `health`; return its
        RunState. The run goes on at the batch where it was saved: main.py loads last.pt and
        merges its settings (config.merge_resumed), Trainer.restore calls this, and the epoch's
        sampler skips the batches already trained (Trainer.train_one_epoch, start_epoch)."""
        self.check_resumable(checkpoint)
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        # load_state_dict also restores each group's implementation flags: keep this session's
        # (a run saved with the slower unfused Adam continues with the fused one).
        implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group, flags in zip(self.optimizer.param_groups, implementation):
            group.update(flags)
        match_parameter_layouts(self.optimizer)
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        state = RunState(
            epoch=checkpoint["epoch"],
            batch_in_epoch=checkpoint["batch_in_epoch"],
            epoch_state=checkpoint["epoch_state"],
            best_val_acc=checkpoint["best_val_acc"],
            history=list(checkpoint["history"]),
            total_train_seconds=checkpoint["total_train_seconds"],
        )
        if not state.batch_in_epoch:
            # At an epoch's end the position is this session's steps per epoch times the epochs
            # done: under another number of processes an epoch may take more or fewer steps.
            self.scheduler.go_to(state.epoch * steps_per_epoch)
        health.load_state_dict(checkpoint)
        return state

    def check_resumable(self, checkpoint):
        """One line for a checkpoint this session cannot go on from."""
        name = checkpoint["config"].get("checkpoint_name", "the run")
        if checkpoint["class_names"] != self.class_names:
            raise UserError(
                f"--resume: the run was trained on classes {checkpoint['class_names']}, "
                f"but the data now has {self.class_names}"
            )
        saved_world = checkpoint.get("world_size", 1)
        if checkpoint["batch_in_epoch"] and saved_world != world_size():
            raise UserError(
                f"--resume: {name} was saved in the middle of an epoch by {saved_world} process(es); "
                f"continue it with {saved_world}, not {world_size()}"
            )
        if self.ema is not None and "ema" not in checkpoint:
            raise UserError(
                f"--resume: the checkpoint of {name} has no EMA weights for its --ema_decay; it was not "
                "written by a run of this template with that flag"
            )


def match_parameter_layouts(optimizer):
    """Give each optimizer state tensor (Adam's moments) its parameter's memory layout. Loaded
    state keeps the strides it was saved with; if the model's layout changed since
    (--channels_last on resume) the fused kernels, which walk memory flat, would pair each
    weight with another element's moments."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_checkpoint(path):
    """A checkpoint written by Trainer, loaded with weights_only=True (no code can run)."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, a foreign format, or a pickle that would run code
        raise UserError(f"{path} is not a readable checkpoint: {torch_load_error(exc)}") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of this template (it lacks {', '.join(CHECKPOINT_KEYS)})")
    return checkpoint


class SaveTimer:
    """--save_every_minutes: whether a last.pt is due by time. Asked at the steps where the ranks
    compare notes anyway (every --log_interval steps, see Trainer.save_if_due); rank 0's clock
    decides for all, so every rank saves at the same step."""

    def __init__(self, minutes):
        self.seconds = (minutes or 0) * 60
        self.restart()

    def restart(self):
        """A last.pt was just written: the next is due `minutes` from now."""
        self.last = time.monotonic()

    def due(self):
        if not self.seconds:
            return False
        return agreed_by_main(time.monotonic() - self.last >= self.seconds)


class GracefulStop:
    """SIGINT (Ctrl-C), SIGTERM (preemption) and SIGHUP (the terminal closed, an ssh connection
    lost) ask the trainer to stop after the current step, save, and exit; a second Ctrl-C exits at
    once (atomic writes keep the files whole). A SIGHUP ignored as the process started (nohup)
    stays ignored."""

    def __init__(self):
        self.signal = None
        self.finishing = None  # set to what is being finished when stopping would only lose it (the test)
        self.agreed = False  # under torchrun: the ranks' last agreement
        self._previous = {}

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # (nohup: the user asked the run to outlive the terminal)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, agree=True):
        """Whether to stop now. In one process: whether a signal has arrived. Under torchrun the
        ranks agree on the signal any of them has seen (see agreed_signal), a collective over the
        host, and only where `agree` is set: the trainer asks every --log_interval global optimizer
        steps, at each epoch's last step and after each epoch, so at the same steps on every rank,
        in a resumed run too.
        Between agreements this returns the last one, so no rank stops a step before the rest
        and no step waits for the others."""
        if world_size() == 1:
            return self.signal is not None
        if agree:
            agreed = agreed_signal(self.signal or 0)
            self.signal = self.signal or agreed or None
            self.agreed = agreed != 0
        return self.agreed

    def resume_hint(self, saved, position, cfg):
        """The one line a stop prints: what was saved, and the command that goes on from it."""
        name = signal.Signals(self.signal).name
        command = run_command(cfg.checkpoint_name, cfg.checkpoint_dir, "--resume")
        if world_size() > 1:
            command = command.replace("python main.py", "torchrun [the same options] main.py", 1)
        return f"{name}: saved {saved} ({position}); continue with: {command}"

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            print("second interrupt: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        if not is_main_process():
            return
        # (A second SIGINT exits at once; a second SIGTERM or SIGHUP changes nothing.)
        at_once = "press Ctrl-C again" if signum == signal.SIGINT else "a Ctrl-C (SIGINT)"
        if self.finishing:
            print(
                f"\n{signal.Signals(signum).name}: training is done and saved; finishing {self.finishing} "
                f"first ({at_once} to stop now; --resume then runs the test)",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"\n{signal.Signals(signum).name}: stopping after the current step ({at_once} to exit at once)",
                file=sys.stderr,
                flush=True,
            )
