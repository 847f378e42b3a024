"""What a run measures: loss, accuracy and the confusion matrix (kept on the device, summed over
processes), the health of the optimizer steps (skipped steps, bad streaks, gradient norms, the
divergence check), wall time that waits for the GPU, peak GPU memory, and the device's name."""

import contextlib
import os
import time

import torch

from distributed import agreed_failure, all_gather_lists, all_reduce_max, all_reduce_sum, is_main_process
from step import SkippedStepGuard
from utils import RunStopped

# Steps in a row whose loss is not finite (or whose update GradScaler skipped) before we stop.
MAX_BAD_STEPS = 20


class ClassificationMeter:
    """Accumulates loss, accuracy and a confusion matrix on the device, so that the training
    loop never waits for the GPU; `compute()` is the only place that syncs."""

    def __init__(self, num_classes, device):
        self.num_classes = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.one = torch.ones((), dtype=torch.int64, device=device)  # what each image adds to its cell

    @torch.no_grad()
    def update(self, loss, logits, targets):
        """`loss` is the batch mean; rows of the confusion matrix are true classes. Each image adds
        one to its (true, predicted) cell with scatter_add_, not torch.bincount: CUDA's bincount
        reads the pairs' min and max back to the host (two blocking copies a batch). Integer
        additions give the same counts in any order, so the atomics stay deterministic; under
        --deterministic on CUDA PyTorch routes scatter_add_ through a sorted index_put_ instead
        (the same counts; that path may check the indices' range on the host, a sync)."""
        self.loss_sum += loss.detach().double() * targets.numel()
        pairs = targets * self.num_classes + logits.argmax(dim=1)
        self.confusion.scatter_add_(0, pairs, self.one.expand_as(pairs))

    def count(self):
        """The images counted so far by this process (a host read: it waits for the GPU)."""
        return int(self.confusion.sum())

    def state_dict(self):
        """The sums over all processes (a collective under DDP)."""
        return {
            "loss_sum": all_reduce_sum(self.loss_sum.clone()).cpu(),
            "confusion": all_reduce_sum(self.confusion.clone()).cpu(),
        }

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


class ImagePredictions:
    """Each evaluated image's true class, predicted class and confidence (the softmax probability
    of the prediction), kept on the device in loader order; `rows()` names them by file and
    gathers every process's share."""

    def __init__(self, files):
        self.files = files  # this process's images, in the order its loader yields them (loader_files)
        self.batches = []

    @torch.no_grad()
    def update(self, logits, targets):
        confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
        self.batches.append(torch.stack([targets.double(), predicted.double(), confidence.double()], dim=1))

    def rows(self):
        """[(file, true class index, predicted class index, confidence)] of all processes,
        sorted by file, each file once (a collective under DDP)."""
        values = torch.cat(self.batches).cpu().tolist() if self.batches else []
        if len(values) != len(self.files):
            raise RuntimeError(f"{len(values)} predictions for {len(self.files)} files")
        mine = [
            (file, int(true), int(predicted), confidence)
            for file, (true, predicted, confidence) in zip(self.files, values)
        ]
        return sorted(dict((row[0], row) for row in all_gather_lists(mine)).values())


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


class EpochClock:
    """An epoch's training seconds, its checkpoint writes timed apart (`writing()`), both
    continued from a resumed epoch's: the seconds images/s is computed over are training alone."""

    def __init__(self, device, seconds=0.0, checkpoint_seconds=0.0):
        self.device, self.seconds_before = device, seconds
        self.checkpoint_seconds = checkpoint_seconds  # this epoch's writes, earlier sessions' included
        self.written_here = 0.0
        self.watch = Stopwatch(device)

    @contextlib.contextmanager
    def writing(self):
        synchronize(self.device)  # the GPU work queued before counts as training (the save waits for it anyway)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.checkpoint_seconds += seconds
            self.written_here += seconds

    def elapsed(self):
        """Training seconds so far, without waiting for the GPU (for checkpoints)."""
        return self.seconds_before + self.watch.elapsed() - self.written_here

    def stop(self):
        return self.seconds_before + self.watch.stop() - self.written_here


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """Peak CUDA memory allocated by tensors since the last reset, or None on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


class PeakMemory:
    """Peak CUDA memory allocated by tensors during each epoch's training, in MiB (None on the
    CPU), two ways. `peak_mem_mb`: the whole epoch's. `steady_peak_mem_mb`: the same, but only for
    epochs after this session's first; the first (None) also holds the warm-up: with
    cudnn.benchmark cuDNN tries its algorithms, workspaces and all, once for each new batch shape
    (the last, smaller batch included), and DDP and torch.compile set up. Later epochs see only
    shapes already tuned. The allocator's statistics live on the host: reading and resetting them
    never waits for the GPU."""

    def __init__(self, device):
        self.device = device
        self.epochs = 0  # epochs started in this session

    def start_epoch(self):
        reset_peak_memory(self.device)
        self.epochs += 1

    def epoch_numbers(self):
        peak = peak_memory_mb(self.device)
        return {"peak_mem_mb": peak, "steady_peak_mem_mb": peak if self.epochs > 1 else None}


class GradNormMeter:
    """The mean and max of the optimizer steps' true global gradient norms, kept on the device.
    Steps whose gradients overflowed (inf/NaN: GradScaler skips them) are left out. Under DDP
    every rank holds the same averaged gradients, so nothing is summed over processes."""

    def __init__(self, device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.max = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, grad_norm):
        finite = torch.isfinite(grad_norm)
        value = torch.where(finite, grad_norm.double(), 0.0)
        self.total += value
        self.count += finite
        torch.maximum(self.max, value, out=self.max)

    def state_dict(self):
        return {"total": self.total.cpu(), "count": self.count.cpu(), "max": self.max.cpu()}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def compute(self):
        """(mean, max) of the finite norms, or (None, None) if there were none."""
        count = int(self.count)
        return (float(self.total) / count, float(self.max)) if count else (None, None)


class StepHealth:
    """Whether the optimizer steps stay healthy, counted on the device so that the loop never
    waits for the GPU: the steps GradScaler skipped (in the run and in this epoch), bad steps in
    a row (a non-finite loss in any micro-batch of a step, or an update GradScaler skipped), and
    the true gradient norms. A skipped step's BatchNorm statistics are put back (see
    SkippedStepGuard). `record()` after every micro-batch; `check()` stops a run that diverged."""

    def __init__(self, model, scaler, device):
        self.model = model
        self.scaler = scaler
        self.guard = SkippedStepGuard(model, scaler.is_enabled())
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_streak = torch.zeros((), dtype=torch.int64, device=device)  # bad steps in a row
        self.group_bad = torch.zeros((), dtype=torch.bool, device=device)  # this step's micro-batches so far
        self.epoch_skipped = torch.zeros((), dtype=torch.int64, device=device)  # this epoch's skipped steps
        self.grad_norms = GradNormMeter(device)  # this epoch's

    def before_step(self):
        """At a step's first micro-batch: keep the buffers a skipped step must put back."""
        self.guard.save()

    def record(self, loss, outcome):
        """Count a micro-batch's non-finite loss, and at an optimizer step (`outcome`, None for a
        micro-batch that only accumulated) a skipped update and the gradient norm."""
        self.group_bad |= ~torch.isfinite(loss.detach())
        if outcome is None:
            return
        if outcome.skipped is not None:
            self.guard.restore_if(outcome.skipped)
            self.skipped_steps += outcome.skipped
            self.epoch_skipped += outcome.skipped
            self.group_bad |= outcome.skipped
        self.grad_norms.update(outcome.grad_norm)
        self.bad_streak = (self.bad_streak + 1) * self.group_bad
        self.group_bad = torch.zeros_like(self.group_bad)

    def check(self, where, last_checkpoint, suggest_bfloat16=True):
        """Stop (on every rank alike) when the loss has not been finite, or GradScaler skipped
        every update, for MAX_BAD_STEPS steps in a row, or when the weights or BatchNorm
        statistics went non-finite. `where` says when, in the message; `last_checkpoint` is the
        run's last.pt, which the stop leaves as it is."""
        bad_steps = int(all_reduce_max(self.bad_streak.clone()))  # the worst rank's, so all stop together
        state = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        # Each tensor's largest magnitude (inf or NaN if any element is), in one foreach pass.
        weights_ok = bool(torch.stack(torch._foreach_norm(state, float("inf"))).isfinite().all())
        if bad_steps < MAX_BAD_STEPS and weights_ok:
            return
        what = (
            "the weights are no longer finite"
            if not weights_ok
            else (f"the loss was not finite (or GradScaler skipped the update) for {bad_steps} steps in a row")
        )
        hint = " or --amp --amp_dtype bfloat16" if suggest_bfloat16 else ""
        kept = (
            f"The last good checkpoint, {last_checkpoint}, is untouched"
            if os.path.exists(last_checkpoint)
            else "No checkpoint was written: the weights were never finite at a save"
        )
        raise agreed_failure(
            RunStopped(f"training diverged: {what} ({where}); try a lower --learning_rate{hint}. {kept}")
        )

    def start_epoch(self, epoch_state=None):
        """This epoch's counts from zero, or from where a mid-epoch checkpoint cut the epoch."""
        state = epoch_state or {}
        self.grad_norms = GradNormMeter(self.epoch_skipped.device)
        self.epoch_skipped.fill_(state.get("skipped_steps", 0))
        if "grad_norms" in state:
            self.grad_norms.load_state_dict(state["grad_norms"])

    def epoch_state(self):
        """This epoch's counts so far, for a mid-epoch checkpoint (see start_epoch)."""
        return {"skipped_steps": int(self.epoch_skipped), "grad_norms": self.grad_norms.state_dict()}

    def loss_scale(self):
        """GradScaler's scale now (a host read), or None without a scaler."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def epoch_numbers(self):
        """The epoch's history fields: the loss scale at its end, steps skipped, mean and max
        gradient norm."""
        grad_norm_mean, grad_norm_max = self.grad_norms.compute()
        return {
            "loss_scale": self.loss_scale(),
            "skipped_steps": int(self.epoch_skipped),
            "grad_norm_mean": grad_norm_mean,
            "grad_norm_max": grad_norm_max,
        }

    def state_dict(self):
        return {"skipped_steps": int(self.skipped_steps), "bad_streak": int(self.bad_streak)}

    def load_state_dict(self, state):
        self.skipped_steps.fill_(state["skipped_steps"])
        self.bad_streak.fill_(state["bad_streak"])
