"""Training: the Trainer runs the epochs (train, validate, save) and then tests the best weights.
One optimizer step is step.py's; what a checkpoint holds is checkpoint.py's; the steps' health
checks are metrics.py's; the files a run writes as it goes are outputs.py's."""

import math
import os
import time

import torch
from tqdm import tqdm

from checkpoint import Checkpoints, GracefulStop, RunState, SaveTimer, load_checkpoint
from dataset import DeviceTransform, loader_files, training_inputs
from distributed import agreed_failure, broadcast_buffers, from_main_process, gradient_sync, is_main_process, rank
from machine import CpuThreads, LoadWatch
from metrics import ClassificationMeter, EpochClock, ImagePredictions, PeakMemory, StepHealth
from model import recompute_batchnorm_statistics
from outputs import RunOutputs
from step import (
    AmpUpdate,
    BatchMix,
    WeightEMA,
    accumulation_group,
    autocast_for,
    batch_seeds,
    classification_loss,
    scaler_for,
    training_step,
)
from utils import RunStopped, atomic_torch_save, progress_bar


class Trainer:
    """Runs the epochs. `model` is the plain module (saved and evaluated); `train_model` may
    wrap it (DistributedDataParallel, torch.compile) and is what the training step calls. With
    --ema_decay, `ema` averages the plain module (see WeightEMA)."""

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        loaders,
        cfg,
        run_dir,
        class_names,
        logger,
        train_model=None,
        stop=None,
        threads=None,
    ):
        self.model = model
        self.train_model = model if train_model is None else train_model  # (a compiled module has no truth value)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader, self.val_loader, self.test_loader = loaders
        self.batches_per_epoch = len(self.train_loader)  # a whole epoch's, before any resume skips
        self.cfg = cfg
        self.run_dir = run_dir
        self.class_names = list(class_names)
        self.log = logger
        self.device = torch.device(cfg.device)
        # The step (step.py): autocast, GradScaler (float16 only), the update, mixing, the EMA.
        self.scaler = scaler_for(cfg)
        self.update = AmpUpdate(optimizer, self.scaler, cfg.clip_grad_norm)
        self.autocast = autocast_for(cfg)
        self.label_smoothing = getattr(cfg, "label_smoothing", 0.0)  # the training loss's only: evaluation's is plain
        self.transform = DeviceTransform(self.device, getattr(cfg, "channels_last", False))
        self.mix = BatchMix.from_config(cfg, len(class_names))  # None: plain class-index targets
        self.ema = WeightEMA.from_config(cfg, model)  # None without --ema_decay
        # Around it: the steps' health, where the run stands, its checkpoints and files, stopping.
        self.health = StepHealth(model, self.scaler, self.device)
        self.memory = PeakMemory(self.device)  # each epoch's peak GPU memory, overall and steady-state
        self.state = RunState()
        self.checkpoints = Checkpoints(model, optimizer, scheduler, self.scaler, self.ema, cfg, self.class_names)
        self.outputs = RunOutputs(cfg, run_dir, self.device, self.class_names, logger)
        self.stop = stop or GracefulStop()  # its .signal is set when SIGINT/SIGTERM arrive
        self.save_timer = SaveTimer(getattr(cfg, "save_every_minutes", 0))
        # PyTorch's CPU threads: main.py's may follow other programs' load (machine.CpuThreads).
        self.threads = threads or CpuThreads(torch.get_num_threads, torch.set_num_threads, fixed="the caller's")

    def fit(self):
        """Train the epochs left, validating and saving after each, then test."""
        sizes = [len(loader.dataset) for loader in (self.train_loader, self.val_loader, self.test_loader)]
        self.outputs.announce(sizes, self.steps_per_epoch(), self.scaler.is_enabled())
        self.outputs.open_tensorboard(self.scheduler.last_epoch)
        for epoch in range(self.state.epoch, self.cfg.epochs):
            self.run_epoch(epoch)
        # A Ctrl-C from here on would only lose the test: finish it unless asked twice.
        self.stop.finishing = "the final test"
        return self.test()

    def run_epoch(self, epoch):
        """Train and validate epoch `epoch` (0-based), then save best.pt (if it validated best),
        last.pt, results.json and the curves."""
        state, started = self.state, time.perf_counter()
        # A resumed epoch's seconds before the stop (training and checkpoint writes) count in the total too.
        earlier = state.epoch_state or {}
        seconds_before = earlier.get("seconds", 0.0) + earlier.get("checkpoint_seconds", 0.0)
        record = {"epoch": epoch + 1, "lr": self.scheduler.lr_at(epoch * self.steps_per_epoch())}
        watch = LoadWatch()
        self.threads.start()
        record.update(self.train_one_epoch(epoch))
        record.update(watch.record())  # how busy the machine was while the epoch's images/s were timed
        if self.device.type == "cpu":
            record.update(self.threads.record())  # and with how many threads (on average)
        record.update(self.validate())
        best = state.finish_epoch(record, time.perf_counter() - started + seconds_before)
        saving = time.perf_counter()
        if best:
            self.save_checkpoint("best.pt")  # (the epoch validated best so far)
        self.save_checkpoint("last.pt")
        state.total_train_seconds += time.perf_counter() - saving  # (last.pt's total lacks its own write)
        self.outputs.epoch_done(state, int(self.health.skipped_steps), self.scheduler.last_epoch)
        self.exit_if_signalled()

    def train_one_epoch(self, epoch):
        """Train epoch `epoch` (0-based) from batch `state.batch_in_epoch` on, so an epoch cut
        by a mid-epoch checkpoint continues with the same batches; returns its history fields."""
        cfg, start = self.cfg, self.state.batch_in_epoch
        self.train_model.train()
        self.train_loader.sampler.set_epoch(epoch, skip=start * self.train_loader.batch_size)
        num_batches = start + len(self.train_loader)
        meter, clock = self.start_epoch()
        self.outputs.start_rate(meter.count)  # (rank 0 holds a resumed epoch's count)
        bar = tqdm(
            initial=start,
            total=num_batches,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (cfg.progress and is_main_process()) or None,
            dynamic_ncols=True,
        )
        for i, (images, targets) in enumerate(self.train_loader, start=start):
            seeds = batch_seeds(cfg.seed, epoch, i, rank())
            images = self.transform(images, flip_seed=seeds.flip)
            targets = labels = targets.to(self.device, non_blocking=True)
            if self.mix is not None:  # soft targets; accuracy counts each image's dominant class
                images, targets = self.mix(images, labels, seeds.mix)
                labels = targets.argmax(dim=1)
            group = accumulation_group(i, cfg.accum_steps, num_batches)  # an optimizer step every accum_steps
            if group.first:
                self.health.before_step()
            torch.manual_seed(seeds.forward)  # dropout, stochastic depth: drawn again alike on resume
            with gradient_sync(self.train_model, group.last):
                loss, logits, outcome = training_step(
                    self.train_model,
                    images,
                    targets,
                    self.autocast,
                    self.update,
                    group.size,
                    group.last,
                    self.label_smoothing,
                )
            meter.update(loss, logits, labels)
            bar.update()
            self.threads.poll()  # (fewer threads while other programs keep cores busy; main.py's)
            self.health.record(loss, outcome)  # (puts a skipped step's BatchNorm statistics back)
            if group.last:
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                self.state.batch_in_epoch = i + 1
                # The loop's host reads, and under torchrun the stop agreement: the same steps on every rank.
                due = self.scheduler.last_epoch % cfg.log_interval == 0 or i == num_batches - 1
                self.log_progress(meter, bar, loss, outcome, due)
                self.save_if_due(meter, clock, due)
        bar.close()
        self.state.batch_in_epoch, self.state.epoch_state = 0, None  # the next call starts a fresh epoch
        seconds = clock.stop()
        stats = meter.compute()
        return {
            "train_loss": stats["loss"],
            "train_acc": stats["acc"],
            "seconds": seconds,  # training alone: the checkpoint writes are checkpoint_seconds
            "checkpoint_seconds": clock.checkpoint_seconds,
            "first_in_session": self.memory.epochs == 1,  # (its start-up is in it: see report.steady_epochs)
            "images_per_sec": stats["count"] / seconds if seconds > 0 else None,
            **self.memory.epoch_numbers(),  # peak_mem_mb, steady_peak_mem_mb
            **self.health.epoch_numbers(),  # what AMP did: loss scale, skipped steps, the true gradient norm
        }

    def validate(self):
        """The epoch's validation numbers: the raw weights', and with --ema_decay the EMA's. Each
        is validated (and saved) with rank 0's BatchNorm statistics on every rank. With
        --precise_bn those statistics are first recomputed over training batches (model.py)."""
        if getattr(self.cfg, "precise_bn", 0):
            inputs = training_inputs(self.train_loader, self.transform, self.cfg, self.state.epoch, rank())
            recompute_batchnorm_statistics(
                [self.model, *([self.ema.module] if self.ema else [])], inputs, self.autocast
            )
        broadcast_buffers(self.model)
        val = self.evaluate(self.val_loader)
        numbers = {"val_loss": val["loss"], "val_acc": val["acc"]}
        if self.ema is not None:
            broadcast_buffers(self.ema.module)
            val = self.evaluate(self.val_loader, self.ema.module)
            numbers.update(val_loss_ema=val["loss"], val_acc_ema=val["acc"])
        return numbers

    def test(self):
        """Test the best-validation weights (best.pt's "model": raw or EMA); with --ema_decay also
        the EMA weights of the same epoch. Record and print the results."""
        # Rank 0 wrote best.pt: it reads it and hands it to the others (no race, no shared disk needed).
        best = from_main_process(load_checkpoint, os.path.join(self.run_dir, "best.pt"))
        self.model.load_state_dict(best["model"])
        predictions = ImagePredictions(loader_files(self.test_loader))
        test = self.evaluate(self.test_loader, predictions=predictions)
        self.outputs.test_predictions(predictions.rows())  # (rows(): a collective, on every rank)
        ema = {}
        if self.ema is not None and "ema" in best:  # (a best.pt from before the EMA existed has none)
            self.ema.load_state_dict(best["ema"])
            ema_test = test if best["weights"] == "ema" else self.evaluate(self.test_loader, self.ema.module)
            ema = dict(best_weights=best["weights"], test_acc_ema=ema_test["acc"], test_loss_ema=ema_test["loss"])
        return self.outputs.test_done(
            self.state, int(self.health.skipped_steps), best, test, ema, self.scheduler.last_epoch
        )

    def evaluate(self, loader, model=None, predictions=None):
        """`model` (default: the raw weights) over `loader` (each image's prediction into `predictions`)."""
        model = self.model if model is None else model
        progress = "evaluating" if self.cfg.progress and is_main_process() else ""
        return evaluate(model, loader, self.transform, self.autocast, len(self.class_names), predictions, progress)

    def log_progress(self, meter, bar, loss, outcome, due):
        """At a `due` step (every --log_interval global steps and the epoch's last): the divergence
        check, the progress bar and TensorBoard, the loop's only host reads."""
        if not due:
            return
        step = self.scheduler.last_epoch
        self.check_not_diverged()
        stats = meter.compute()
        bar.set_postfix(
            loss=f"{stats['loss']:.4f}", acc=f"{stats['acc']:.2f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}"
        )
        # (The LR this step trained with: the optimizer already holds the next.)
        self.outputs.log_step(step, stats["count"], loss, self.scheduler.lr_at(step - 1), self.health, outcome)

    def save_if_due(self, meter, clock, due):
        """On a signal (under torchrun agreed at `due` steps only: see GracefulStop), every
        --save_every_steps, or at a `due` step --save_every_minutes after the last save: last.pt
        with the epoch's progress so far, then stop if signalled."""
        step, every = self.scheduler.last_epoch, self.cfg.save_every_steps
        timed = due and self.save_timer.due()  # (a collective at `due` steps: asked on every rank)
        if not (self.stop.requested(agree=due) or (every and step % every == 0) or timed):
            return
        with clock.writing():  # not in the epoch's training seconds
            self.state.epoch_state = {
                "meter": meter.state_dict(),
                "seconds": clock.elapsed(),
                "checkpoint_seconds": clock.checkpoint_seconds,
                **self.health.epoch_state(),
            }
            self.save_checkpoint("last.pt")
        self.exit_if_signalled(agree=False)  # (on the agreement just made)

    def checkpoint(self, name="last.pt"):
        """What `name` holds (see checkpoint.Checkpoints): best.pt the weights that validated best."""
        weights = self.state.best_weights if name == "best.pt" else "raw"
        return self.checkpoints.contents(self.state, self.health, weights)

    def save_checkpoint(self, name):
        """Write `name` atomically, never with diverged weights; a failed write leaves the
        previous file as it was and stops the run with one line (on every rank under DDP)."""
        self.check_not_diverged()
        self.outputs.flush()  # every TensorBoard event up to this checkpoint is on disk before it
        path = os.path.join(self.run_dir, name)

        def kept():  # (said if the write fails; asked on the rank that writes, before it writes)
            return f"; the previous {name} is intact" if os.path.exists(path) else f"; no {name} was saved before"

        self.outputs.write(path, lambda: atomic_torch_save(self.checkpoint(name), path), kept)
        if name == "last.pt":
            self.save_timer.restart()

    def restore(self, checkpoint):
        """Continue from a checkpoint made by `checkpoint()`, at the batch where it was saved."""
        self.state = self.checkpoints.restore(checkpoint, self.health, self.steps_per_epoch())

    def check_not_diverged(self):
        bfloat16 = self.cfg.amp and self.cfg.amp_dtype == "bfloat16"
        self.health.check(
            f"epoch {self.state.epoch + 1}, step {self.scheduler.last_epoch}",
            os.path.join(self.run_dir, "last.pt"),
            suggest_bfloat16=not bfloat16,
        )

    def exit_if_signalled(self, agree=True):
        if self.stop.requested(agree):
            hint = self.stop.resume_hint(os.path.join(self.run_dir, "last.pt"), self.position(), self.cfg)
            raise agreed_failure(RunStopped(hint, exit_code=128 + self.stop.signal))

    def position(self):
        return self.state.position(self.batches_per_epoch)

    def start_epoch(self):
        """The epoch's meter and clock: from zero, or from where a mid-epoch checkpoint cut the
        epoch (the step counts too)."""
        meter, state = ClassificationMeter(len(self.class_names), self.device), self.state.epoch_state or {}
        self.health.start_epoch(state)
        if state:
            meter.load_state_dict(state["meter"])
        self.memory.start_epoch()
        return meter, EpochClock(self.device, state.get("seconds", 0.0), state.get("checkpoint_seconds", 0.0))

    def steps_per_epoch(self):
        return math.ceil(self.batches_per_epoch / self.cfg.accum_steps)


@torch.no_grad()
def evaluate(model, loader, transform, autocast, num_classes, predictions=None, progress=""):
    """Loss, accuracy (percent), count and confusion matrix of `model` over `loader`, under
    `autocast()` (the same precision as training); each image's prediction into `predictions`
    (an ImagePredictions), if given; `progress` names its progress bar ('': none)."""
    model.eval()
    meter = ClassificationMeter(num_classes, transform.device)
    for images, targets in progress_bar(loader, progress):
        images = transform(images)
        targets = targets.to(transform.device, non_blocking=True)
        with autocast():
            logits = model(images)
            loss = classification_loss(logits, targets)
        meter.update(loss, logits, targets)
        if predictions is not None:
            predictions.update(logits, targets)
    return meter.compute()
