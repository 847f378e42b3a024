"""Training: the FP32/AMP step, the epoch loop, evaluation, checkpoints and results, and a clean
stop on Ctrl-C or SIGTERM."""
import contextlib
import copy
import math
import os
import signal
import sys
import time
import warnings
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torchvision.transforms import v2
from tqdm import tqdm

from dataset import DeviceTransform, training_inputs
from report import TensorBoardLog, comparison_table, per_class_accuracy, per_class_report, plot_confusion, plot_curves
from distributed import (
    agreed_failure,
    agreed_signal,
    all_reduce_max,
    broadcast_buffers,
    from_main_process,
    is_main_process,
    rank,
    world_size,
)
from model import recompute_batchnorm_statistics
from metrics import ClassificationMeter, GradNormMeter, Stopwatch, device_name, peak_memory_mb, reset_peak_memory
from utils import RunStopped, UserError, atomic_torch_save, atomic_write_json, derived_seed, progress_bar, torch_load_error

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "class_names", "config")
# Steps in a row whose loss is not finite (or whose update GradScaler skipped) before we stop.
MAX_BAD_STEPS = 20
# Mixed into a batch's seed for mixup/cutmix, so its draws are not the flip's of the same batch.
MIX_SEED_TAG = 0x6D6978  # "mix"
# ... and for the random numbers the forward draws itself (dropout, stochastic depth).
FORWARD_SEED_TAG = 0x667764  # "fwd"


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
        """Whether to stop after this step. Decided on the signal any rank has seen (see
        agreed_signal), so a signal that lands after the agreement counts at the next step on
        every rank alike: no rank stops a step before the rest."""
        agreed = agreed_signal(self.signal or 0)
        self.signal = self.signal or agreed or None
        return agreed != 0

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


class StepOutcome(NamedTuple):
    """What an optimizer step did, as device tensors (reading them would wait for the GPU)."""

    skipped: torch.Tensor | None  # bool: GradScaler skipped the step (None without a scaler)
    grad_norm: torch.Tensor  # the true (unscaled) global gradient norm; inf/NaN if it overflowed


class AmpUpdate:
    """backward -> unscale -> [clip] -> optimizer step -> scaler update, in one callable.

    One code path for every precision: with the scaler disabled (FP32, bfloat16) `scale` and
    `unscale_` return their input and `step` is a plain `optimizer.step()`. With float16 the
    scaler multiplies the loss so small gradients survive in half precision, unscales them
    before they are measured and clipped, and skips the step (lowering the scale) when it
    finds inf/NaN.
    """

    def __init__(self, optimizer, scaler, clip_grad_norm=None):
        self.optimizer = optimizer
        self.scaler = scaler
        self.clip_grad_norm = clip_grad_norm
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, loss, update=True):
        """Backpropagate `loss`; when `update`, step the optimizer and return a StepOutcome
        (None for a micro-batch that only accumulates)."""
        self.scaler.scale(loss).backward()
        if not update:
            return None
        self.scaler.unscale_(self.optimizer)  # measure and clip the true gradients, not the scaled ones
        if self.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters if p.grad is not None])
        skipped = None
        if self.scaler.is_enabled():
            # The scale only ever drops when the step was skipped; compare on the device.
            scale_before = self.scaler._get_scale_async().clone()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler._get_scale_async() < scale_before
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(skipped, grad_norm)


class SkippedStepGuard:
    """A float16 step that GradScaler skips had inf/NaN somewhere, and its forward may already
    have written them into BatchNorm's running statistics (which no optimizer step touches).
    `save()` keeps the buffers from before the step's forward; `restore_if(skipped)` puts them
    back when the step was skipped, on the device (no host sync). A no-op without a scaler."""

    def __init__(self, model, enabled):
        self.buffers = list(model.buffers()) if enabled else []
        self.saved = [buffer.clone() for buffer in self.buffers]

    def save(self):
        for saved, buffer in zip(self.saved, self.buffers):
            saved.copy_(buffer)

    def restore_if(self, skipped):
        for saved, buffer in zip(self.saved, self.buffers):
            buffer.copy_(torch.where(skipped, saved, buffer))


def classification_loss(logits, targets, label_smoothing=0.0):
    """Cross-entropy, in float32 whatever autocast computed the logits in (as autocast itself
    would), against class indices or class probabilities (the soft targets of mixup and cutmix);
    `label_smoothing` applies to either."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def training_step(model, images, targets, autocast, update, loss_divisor=1, step=True, label_smoothing=0.0):
    """Forward under autocast, then `update` (an AmpUpdate): backward and, when `step`, the
    optimizer step. `targets` are class indices, or probabilities after BatchMix. Returns the
    loss (see classification_loss), the logits and the step's StepOutcome (None if no step)."""
    with autocast():
        logits = model(images)
        loss = classification_loss(logits, targets, label_smoothing)
    return loss, logits, update(loss / loss_divisor, step)


class BatchMix:
    """--mixup_alpha / --cutmix_alpha: torchvision's MixUp or CutMix on a device batch (one of
    the two, chosen at random per batch, when both are on). Each image is mixed with the one
    before it in the (shuffled) batch, and its class index becomes soft targets: the two
    classes' shares, summing to 1. Each batch draws from its own seed (see derived_seed), so a
    resumed run mixes every batch as the uninterrupted run did. torchvision draws the mixing
    ratio, the box and the choice from torch's global CPU generator: it runs on a fork of it,
    so the run's other random numbers are what they would be without mixing."""

    def __init__(self, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0):
        mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []
        mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha else []
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    @classmethod
    def from_config(cls, cfg, num_classes):
        """cfg's mixing, or None when both alphas are 0 (the targets stay class indices)."""
        mixup, cutmix = getattr(cfg, "mixup_alpha", 0.0), getattr(cfg, "cutmix_alpha", 0.0)
        return cls(num_classes, mixup, cutmix) if mixup or cutmix else None

    def __call__(self, images, labels, seed):
        """(mixed images, soft targets [B, classes]) of a batch and its class indices."""
        with torch.random.fork_rng(devices=[]):  # (the draws are on the CPU, whatever the device)
            torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed the GPUs' too)
            return self.mix(images, labels)


class WeightEMA(torch.nn.Module):
    """--ema_decay: an exponential moving average of a model's weights and buffers (BatchNorm
    statistics), updated in place after every optimizer step with one foreach lerp (swa_utils'
    EMA function): ema = decay * ema + (1 - decay) * weights. The first update copies the
    weights; integer buffers (BatchNorm's step counters, Swin's position indices) are copied,
    never averaged. `.module` is a plain copy of the model, which evaluates and saves like it;
    the state dict has swa_utils.AveragedModel's keys ("module.*", "n_averaged").

    Not AveragedModel itself: its update moves its update counter, which lives on the CPU, to
    the GPU every step, a blocking copy that would make the GPU wait for the host each step."""

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.lerp = get_ema_multi_avg_fn(decay)
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))  # on the CPU: read without a sync

    @torch.no_grad()
    def update_parameters(self, model):
        first = bool(self.n_averaged == 0)
        lerped, copied = ([], []), ([], [])  # (EMA tensors, the model's)
        for ema, now in zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()]):
            ema_list, model_list = lerped if ema.is_floating_point() and not first else copied
            ema_list.append(ema)
            model_list.append(now.detach())
        if lerped[0]:
            self.lerp(*lerped, self.n_averaged)
        if copied[0]:
            torch._foreach_copy_(*copied)
        self.n_averaged += 1


def parameter_groups(model, no_bias_decay=False):
    """The model's parameters as optimizer groups: one, or with `no_bias_decay` two, the weights
    of convolutions and linear layers (decayed) and the parameters of one dimension or less,
    biases and normalization weights (never decayed)."""
    if not no_bias_decay:
        return model.parameters()
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(model, cfg):
    """cfg's optimizer over the model's parameters (see parameter_groups). The fused kernels do
    the whole update in one pass over the parameters: a few launches on CUDA, and on the CPU
    ~7x faster than the default for Adam (7 vs 50 ms a step for ResNet-18: docs/benchmarks.md).
    RAdam has no fused kernel: it gets the foreach one (a launch per group of tensors)."""
    params = parameter_groups(model, getattr(cfg, "no_bias_decay", False))
    common = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    name = getattr(cfg, "optimizer", "adam")
    if name == "adam":
        return torch.optim.Adam(params, **common, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, **common, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, **common, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    if name == "radam":
        return torch.optim.RAdam(params, **common, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}")


class Trainer:
    """Runs the epochs. `model` is the plain module (saved and evaluated); `train_model` may
    wrap it (DistributedDataParallel, torch.compile) and is what the training step calls. With
    --ema_decay, `ema` averages the plain module (see WeightEMA)."""

    def __init__(self, model, optimizer, scheduler, loaders, cfg, run_dir, class_names, logger, train_model=None,
                 stop=None):
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
        # GradScaler only for float16: bfloat16 has float32's range, so gradients don't underflow.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and cfg.amp_dtype == "float16")
        self.update = AmpUpdate(optimizer, self.scaler, cfg.clip_grad_norm)
        self.skip_guard = SkippedStepGuard(model, self.scaler.is_enabled())
        self.autocast = autocast_for(cfg)
        self.label_smoothing = getattr(cfg, "label_smoothing", 0.0)  # the training loss's only: evaluation's is plain
        self.transform = DeviceTransform(self.device, getattr(cfg, "channels_last", False))
        self.mix = BatchMix.from_config(cfg, len(class_names))  # None: plain class-index targets
        self.ema = WeightEMA(model, cfg.ema_decay) if getattr(cfg, "ema_decay", None) else None
        self.stop = stop or GracefulStop()  # its .signal is set when SIGINT/SIGTERM arrive
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches of epoch `self.epoch` already trained (mid-epoch checkpoints)
        self.epoch_state = None  # that unfinished epoch's meter and seconds
        self.best_val_acc = -1.0  # best.pt's validation accuracy
        self.best_weights = "raw"  # what best.pt holds: "raw", or "ema" (with --ema_decay, when those validated better)
        self.history = []
        self.total_train_seconds = 0.0
        # Kept on the device so the loop never waits for the GPU to count them.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_streak = torch.zeros((), dtype=torch.int64, device=self.device)  # bad steps in a row
        self.group_bad = torch.zeros((), dtype=torch.bool, device=self.device)  # this step's micro-batches so far
        self.epoch_skipped = torch.zeros((), dtype=torch.int64, device=self.device)  # this epoch's skipped steps
        self.grad_norms = GradNormMeter(self.device)  # this epoch's
        self.tensorboard = None  # a TensorBoardLog while fit() runs with --tensorboard (rank 0)
        self.last_logged = None  # (time, images) at the last --log_interval step, for images/s

    # ------------------------------------------------------------------ pieces
    def grad_sync(self, update):
        """Under DDP, skip the gradient all-reduce on micro-batches that only accumulate."""
        if update or not hasattr(self.train_model, "no_sync"):
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def steps_per_epoch(self):
        return math.ceil(self.batches_per_epoch / self.cfg.accum_steps)

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ one epoch
    def train_one_epoch(self, epoch):
        """Train epoch `epoch` (0-based) from batch `self.batch_in_epoch` on, so an epoch cut
        by a mid-epoch checkpoint continues with the same batches; returns its history fields."""
        cfg = self.cfg
        self.train_model.train()
        start = self.batch_in_epoch
        self.train_loader.sampler.set_epoch(epoch, skip=start * self.train_loader.batch_size)
        num_batches = start + len(self.train_loader)
        meter, seconds_before = self.start_epoch_meters()
        reset_peak_memory(self.device)
        watch = Stopwatch(self.device)
        if self.tensorboard is not None:  # images/s of the first logged step counts from here
            self.last_logged = (time.perf_counter(), int(meter.confusion.sum()))  # (rank 0 holds a resumed epoch's count)
        bar = tqdm(initial=start, total=num_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and is_main_process()) or None, dynamic_ncols=True)
        for i, (images, targets) in enumerate(self.train_loader, start=start):
            images = self.transform(images, flip_seed=derived_seed(cfg.seed, epoch, i, rank()))
            targets = labels = targets.to(self.device, non_blocking=True)
            if self.mix is not None:  # soft targets; accuracy counts each image's dominant class
                images, targets = self.mix(images, labels, derived_seed(cfg.seed, epoch, i, rank(), MIX_SEED_TAG))
                labels = targets.argmax(dim=1)
            # An optimizer step every accum_steps micro-batches; the loss is averaged over the
            # micro-batches of its group (the last group of an epoch may be shorter).
            group_start = i - i % cfg.accum_steps
            group_size = min(cfg.accum_steps, num_batches - group_start)
            update = i == group_start + group_size - 1
            if i == group_start:
                self.skip_guard.save()
            # The forward's own random numbers (dropout, stochastic depth) come from this batch's
            # seed, so a resumed run draws them as the uninterrupted one did (ResNets draw none).
            torch.manual_seed(derived_seed(cfg.seed, epoch, i, rank(), FORWARD_SEED_TAG))
            with self.grad_sync(update):
                loss, logits, outcome = training_step(self.train_model, images, targets, self.autocast, self.update,
                                                      group_size, update, self.label_smoothing)
            meter.update(loss, logits, labels)
            bar.update()
            self.record_step(loss, outcome)
            if update:
                self.step_schedule()
                if self.ema is not None:  # after record_step put a skipped step's BatchNorm statistics back
                    self.ema.update_parameters(self.model)
                self.batch_in_epoch = i + 1
                self.after_optimizer_step(meter, bar, i == num_batches - 1, seconds_before + watch.elapsed(),
                                          loss, outcome)
        bar.close()
        self.batch_in_epoch, self.epoch_state = 0, None  # the next call starts a fresh epoch
        seconds = seconds_before + watch.stop()
        stats = meter.compute()
        grad_norm_mean, grad_norm_max = self.grad_norms.compute()
        return {
            "train_loss": stats["loss"],
            "train_acc": stats["acc"],
            "seconds": seconds,
            "images_per_sec": stats["count"] / seconds if seconds > 0 else None,
            "peak_mem_mb": peak_memory_mb(self.device),
            # What AMP did: the loss scale at the epoch's end, the steps it skipped, the true gradient norm.
            "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None,
            "skipped_steps": int(self.epoch_skipped),
            "grad_norm_mean": grad_norm_mean,
            "grad_norm_max": grad_norm_max,
        }

    # ------------------------------------------------------------------ per-step bookkeeping
    def step_schedule(self):
        """The LR of the next optimizer step. (A float16 step that GradScaler skipped never
        called optimizer.step(); the schedule counts steps, so PyTorch's warning about the
        order of the two calls does not apply.)"""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()

    def start_epoch_meters(self):
        """The epoch's meter and the seconds it had trained; the AMP telemetry starts from zero,
        or from where a mid-epoch checkpoint cut the epoch."""
        meter = ClassificationMeter(len(self.class_names), self.device)
        self.grad_norms = GradNormMeter(self.device)
        state = self.epoch_state or {}
        self.epoch_skipped.fill_(state.get("skipped_steps", 0))
        if "grad_norms" in state:
            self.grad_norms.load_state_dict(state["grad_norms"])
        if not state:
            return meter, 0.0
        meter.load_state_dict(state["meter"])
        return meter, state["seconds"]

    def record_step(self, loss, outcome):
        """Count, on the device (no host sync), optimizer steps in a row that went bad: a
        non-finite loss in any micro-batch of the step, or an update GradScaler skipped (whose
        BatchNorm statistics are then put back). Measure the step's gradient norm."""
        self.group_bad |= ~torch.isfinite(loss.detach())
        if outcome is None:  # a micro-batch that only accumulated
            return
        if outcome.skipped is not None:
            self.skip_guard.restore_if(outcome.skipped)
            self.skipped_steps += outcome.skipped
            self.epoch_skipped += outcome.skipped
            self.group_bad |= outcome.skipped
        self.grad_norms.update(outcome.grad_norm)
        self.bad_streak = (self.bad_streak + 1) * self.group_bad
        self.group_bad = torch.zeros_like(self.group_bad)

    def after_optimizer_step(self, meter, bar, last_batch, seconds_so_far, loss, outcome):
        """Every --log_interval steps (and at the epoch's end): the divergence check, the
        progress bar and TensorBoard, the loop's only host syncs. On a signal, or every
        --save_every_steps: last.pt with the epoch's progress so far, then stop if signalled."""
        cfg, step = self.cfg, self.scheduler.last_epoch
        if step % cfg.log_interval == 0 or last_batch:
            self.check_not_diverged()
            stats = meter.compute()
            bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['acc']:.2f}", lr=f"{self.lr():.2e}")
            self.log_step(step, stats["count"], loss, outcome)
        if self.stop.requested() or (cfg.save_every_steps and step % cfg.save_every_steps == 0):
            self.epoch_state = {"meter": meter.state_dict(), "seconds": seconds_so_far,
                                "skipped_steps": int(self.epoch_skipped), "grad_norms": self.grad_norms.state_dict()}
            self.save_checkpoint("last.pt")
            self.exit_if_signalled()

    def log_step(self, step, images_so_far, loss, outcome):
        """This optimizer step's numbers to TensorBoard (with --tensorboard, on rank 0)."""
        if self.tensorboard is None:
            return
        now = time.perf_counter()
        then, images_then = self.last_logged or (now, images_so_far)
        self.last_logged = (now, images_so_far)
        # (The meter's count covers every process; it restarts each epoch, and then gives no rate.)
        rate = (images_so_far - images_then) / (now - then) if images_so_far > images_then else None
        self.tensorboard.scalars(step, {
            "step/loss": float(loss.detach()),
            "step/lr": self.scheduler.lr_at(step - 1),  # the LR this step trained with (the optimizer holds the next)
            "step/loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None,
            "step/grad_norm": float(outcome.grad_norm),
            "step/images_per_sec": rate,
        })

    def check_not_diverged(self):
        """Stop when the loss has not been finite (or GradScaler skipped every update) for
        MAX_BAD_STEPS steps in a row, or when the weights or BatchNorm statistics went non-finite."""
        bad_steps = int(all_reduce_max(self.bad_streak.clone()))  # the worst rank's, so all stop together
        state = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        weights_ok = bool(torch.stack([torch.isfinite(t).all() for t in state]).all())
        if bad_steps < MAX_BAD_STEPS and weights_ok:
            return
        what = "the weights are no longer finite" if not weights_ok else (
            f"the loss was not finite (or GradScaler skipped the update) for {bad_steps} steps in a row")
        hint = "" if self.cfg.amp and self.cfg.amp_dtype == "bfloat16" else " or --amp --amp_dtype bfloat16"
        last = os.path.join(self.run_dir, "last.pt")
        kept = (f"The last good checkpoint, {last}, is untouched" if os.path.exists(last)
                else "No checkpoint was written: the weights were never finite at a save")
        raise agreed_failure(RunStopped(
            f"training diverged: {what} (epoch {self.epoch + 1}, step {self.scheduler.last_epoch}); "
            f"try a lower --learning_rate{hint}. {kept}"
        ))

    def position(self):
        """Where the run stands, as the save and resume messages say it."""
        if self.batch_in_epoch:
            return f"epoch {self.epoch + 1}, after batch {self.batch_in_epoch} of {self.batches_per_epoch}"
        return f"after epoch {self.epoch}"

    def exit_if_signalled(self):
        if not self.stop.requested():
            return
        name = signal.Signals(self.stop.signal).name
        launcher = "python main.py" if world_size() == 1 else "torchrun [the same options] main.py"
        raise agreed_failure(RunStopped(
            f"{name}: saved {os.path.join(self.run_dir, 'last.pt')} ({self.position()}); "
            f"continue with: {launcher} --checkpoint_dir {self.cfg.checkpoint_dir} "
            f"--checkpoint_name {self.cfg.checkpoint_name} --resume",
            exit_code=128 + self.stop.signal,
        ))

    def evaluate(self, loader, model=None):
        """`model` (default: the raw weights) over `loader`."""
        model = self.model if model is None else model
        progress = "evaluating" if self.cfg.progress and is_main_process() else ""
        return evaluate(model, loader, self.transform, self.autocast, len(self.class_names), progress)

    def validate(self):
        """The epoch's validation numbers: the raw weights', and with --ema_decay the EMA's. Each
        is validated (and saved) with rank 0's BatchNorm statistics on every rank."""
        # ---- precise BatchNorm (issue 22): the statistics recomputed first (model.py, dataset.py)
        if getattr(self.cfg, "precise_bn", 0):
            inputs = training_inputs(self.train_loader, self.transform, self.cfg, self.epoch, rank())
            recompute_batchnorm_statistics([self.model, *([self.ema.module] if self.ema else [])], inputs, self.autocast)
        # ----
        broadcast_buffers(self.model)
        val = self.evaluate(self.val_loader)
        numbers = {"val_loss": val["loss"], "val_acc": val["acc"]}
        if self.ema is not None:
            broadcast_buffers(self.ema.module)
            val = self.evaluate(self.val_loader, self.ema.module)
            numbers.update(val_loss_ema=val["loss"], val_acc_ema=val["acc"])
        return numbers

    # ------------------------------------------------------------------ the run
    def fit(self):
        cfg = self.cfg
        self.log.info(
            f"training {cfg.checkpoint_name}: {len(self.train_loader.dataset)} train / {len(self.val_loader.dataset)} val / "
            f"{len(self.test_loader.dataset)} test images, {len(self.class_names)} classes, on {device_name(self.device)} "
            f"({precision_name(cfg)}), {plural(self.steps_per_epoch(), 'step')} x {plural(cfg.epochs, 'epoch')}"
        )
        if self.scaler.is_enabled() and self.device.type == "cpu":
            self.log.info("warning: float16 + GradScaler on the CPU runs CUDA's AMP recipe to check it, and is slow on "
                          "most CPUs; --amp alone gives the fast bfloat16 there")
        self.open_tensorboard()
        for epoch in range(self.epoch, cfg.epochs):
            started = time.perf_counter()
            # A resumed epoch's seconds before the stop count in the total too.
            seconds_before = self.epoch_state["seconds"] if self.epoch_state else 0.0
            record = {"epoch": epoch + 1, "lr": self.scheduler.lr_at(epoch * self.steps_per_epoch())}
            record.update(self.train_one_epoch(epoch))
            record.update(self.validate())
            self.epoch = epoch + 1
            self.history.append(record)
            self.total_train_seconds += time.perf_counter() - started + seconds_before
            # best.pt holds the epoch's better weights by validation accuracy (the raw ones on a tie).
            weights = "ema" if record.get("val_acc_ema", -1.0) > record["val_acc"] else "raw"
            val_acc = record["val_acc_ema" if weights == "ema" else "val_acc"]
            if val_acc > self.best_val_acc:
                self.best_val_acc, self.best_weights = val_acc, weights
                self.save_checkpoint("best.pt")
            self.save_checkpoint("last.pt")
            self.log_epoch(record)  # after last.pt: a resume from an older checkpoint would write them again
            self.write_results()
            curves = os.path.join(self.run_dir, "curves.png")
            self.write_output(curves, lambda: plot_curves(
                self.history, curves, f"{cfg.checkpoint_name}: {precision_name(cfg)} on {device_name(self.device)}"))
            self.log.info(format_epoch(record, cfg.epochs))
            self.exit_if_signalled()
        # A Ctrl-C from here on would only lose the test: finish it unless asked twice.
        self.stop.finishing = "the final test"
        return self.test()

    def test(self):
        """Test the best-validation weights (best.pt's "model": raw or EMA); with --ema_decay also
        the EMA weights of the same epoch. Record and print the results."""
        # Rank 0 wrote best.pt: it reads it and hands it to the others (no race, no shared disk needed).
        best = from_main_process(load_checkpoint, os.path.join(self.run_dir, "best.pt"))
        self.model.load_state_dict(best["model"])
        test = self.evaluate(self.test_loader)
        confusion = test["confusion"]  # rows: true classes
        ema = {}
        if self.ema is not None and "ema" in best:  # (a best.pt from before the EMA existed has none)
            self.ema.load_state_dict(best["ema"])
            ema_test = test if best["weights"] == "ema" else self.evaluate(self.test_loader, self.ema.module)
            ema = dict(best_weights=best["weights"], test_acc_ema=ema_test["acc"], test_loss_ema=ema_test["loss"])
        results = self.write_results(
            test_acc=test["acc"], test_loss=test["loss"], best_epoch=best["epoch"], **ema,
            per_class_acc=per_class_accuracy(confusion, self.class_names), confusion_matrix=confusion.tolist(),
        )
        which = ", EMA weights" if best.get("weights") == "ema" else ""
        self.log.info(f"test accuracy of the best-validation model (epoch {best['epoch']}{which}): {test['acc']:.2f}%")
        if ema:
            self.log.info(f"test accuracy of epoch {best['epoch']}'s EMA weights: {ema['test_acc_ema']:.2f}%")
        self.log.info(per_class_report(confusion, self.class_names))
        path = os.path.join(self.run_dir, "confusion.png")
        self.write_output(path, lambda: plot_confusion(
            confusion, self.class_names, path,
            f"{self.cfg.checkpoint_name}: test accuracy {test['acc']:.2f}% ({precision_name(self.cfg)})"))
        if int(self.skipped_steps):
            self.log.info(f"GradScaler skipped {int(self.skipped_steps)} optimizer steps with inf/NaN gradients")
        self.log.info(comparison_table([{**results, "config": vars(self.cfg)}]))
        if self.tensorboard is not None:
            metrics = {"test/acc": test["acc"], "test/loss": test["loss"], "best_val_acc": self.best_val_acc}
            if ema:
                metrics["test/acc_ema"] = ema["test_acc_ema"]
            self.tensorboard.hparams(self.scheduler.last_epoch, vars(self.cfg), metrics)
            self.tensorboard.close()
            self.tensorboard = None
        return results

    # ------------------------------------------------------------------ TensorBoard
    def open_tensorboard(self):
        """With --tensorboard, rank 0 writes RUN/tensorboard/. A resumed run goes on in the same
        series: events a killed session wrote after the checkpoint's step are purged."""
        if not getattr(self.cfg, "tensorboard", False) or not is_main_process():
            return
        step = self.scheduler.last_epoch
        self.tensorboard = TensorBoardLog(os.path.join(self.run_dir, "tensorboard"), purge_step=step + 1 if step else None)

    def log_epoch(self, record):
        """The epoch's numbers, at the optimizer step it ended on (one x axis for every series)."""
        if self.tensorboard is None:
            return
        self.tensorboard.scalars(self.scheduler.last_epoch, {
            f"epoch/{key}": record[key]
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_loss_ema", "val_acc_ema", "seconds",
                        "peak_mem_mb") if key in record})
        self.tensorboard.flush()

    # ------------------------------------------------------------------ saving and restoring
    def checkpoint(self, name="last.pt"):
        """What a resume needs. "model" holds the raw weights, except in best.pt, where it holds
        the weights that validated best (`best_weights`: raw or EMA); "weights" says which. With
        --ema_decay, "ema" is the EMA's state (weights, BatchNorm statistics, update count)."""
        weights = self.best_weights if name == "best.pt" else "raw"
        state = {
            "model": (self.ema.module if weights == "ema" else self.model).state_dict(),
            "weights": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "class_names": self.class_names,
            "config": vars(self.cfg),
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_state": self.epoch_state,
            "best_val_acc": self.best_val_acc,
            "history": self.history,
            "skipped_steps": int(self.skipped_steps),
            "bad_streak": int(self.bad_streak),
            "total_train_seconds": self.total_train_seconds,
            "world_size": world_size(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_checkpoint(self, name):
        """Write `name` atomically, never with diverged weights; a failed write leaves the
        previous file as it was and stops the run with one line (on every rank under DDP)."""
        self.check_not_diverged()
        if self.tensorboard is not None:
            self.tensorboard.flush()  # every event up to this checkpoint is on disk before it
        path = os.path.join(self.run_dir, name)
        self.write_output(path, lambda: atomic_torch_save(self.checkpoint(name), path), f"; the previous {name} is intact")

    def restore(self, checkpoint):
        """Continue from a checkpoint made by `checkpoint()`, at the batch where it was saved."""
        if checkpoint["class_names"] != self.class_names:
            raise UserError(
                f"--resume: the run was trained on classes {checkpoint['class_names']}, "
                f"but the data now has {self.class_names}"
            )
        saved_world = checkpoint.get("world_size", 1)
        if checkpoint["batch_in_epoch"] and saved_world != world_size():
            raise UserError(
                f"--resume: {checkpoint['config']['checkpoint_name']} was saved in the middle of an epoch by "
                f"{saved_world} process(es); continue it with {saved_world}, not {world_size()}"
            )
        if self.ema is not None and "ema" not in checkpoint:
            raise UserError(f"--resume: the checkpoint of {checkpoint['config']['checkpoint_name']} has no EMA weights "
                            "for its --ema_decay; it was not written by a run of this template with that flag")
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
        self.epoch = checkpoint["epoch"]
        self.batch_in_epoch = checkpoint["batch_in_epoch"]
        if not self.batch_in_epoch:
            # At an epoch's end the position is this session's steps per epoch times the epochs
            # done: under another number of processes an epoch may take more or fewer steps.
            self.scheduler.go_to(self.epoch * self.steps_per_epoch())
        self.epoch_state = checkpoint["epoch_state"]
        self.best_val_acc = checkpoint["best_val_acc"]
        self.history = list(checkpoint["history"])
        self.skipped_steps.fill_(checkpoint["skipped_steps"])
        self.bad_streak.fill_(checkpoint["bad_streak"])
        self.total_train_seconds = checkpoint["total_train_seconds"]

    def write_results(self, **final):
        results = {
            "run": self.cfg.checkpoint_name,
            "finished": bool(final),
            "test_acc": None,
            "best_val_acc": self.best_val_acc if self.history else None,
            "total_train_seconds": self.total_train_seconds,
            "device": device_name(self.device),
            "world_size": world_size(),
            "amp": self.cfg.amp,
            "amp_dtype": self.cfg.amp_dtype if self.cfg.amp else None,
            "precision": precision_name(self.cfg),
            "skipped_steps": int(self.skipped_steps),
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "epochs": self.history,
        }
        results.update(final)
        path = os.path.join(self.run_dir, "results.json")
        self.write_output(path, lambda: atomic_write_json(path, results))
        return results

    def write_output(self, path, write, note=""):
        """`write()`, which writes `path`, on rank 0 alone; if the disk refuses, every rank stops
        with one line (ending in `note`; files already written stay as they are)."""
        def guarded():
            try:
                write()
            except OSError as exc:
                raise RunStopped(f"cannot write {path}: {exc.strerror or exc}{note}") from None

        from_main_process(guarded)


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


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def autocast_for(cfg):
    """A factory of autocast contexts for cfg's device and AMP dtype; disabled in FP32."""
    dtype = getattr(torch, cfg.amp_dtype) if cfg.amp else None
    return partial(torch.autocast, torch.device(cfg.device).type, dtype=dtype, enabled=cfg.amp)


@torch.no_grad()
def evaluate(model, loader, transform, autocast, num_classes, progress=""):
    """Loss, accuracy (percent), count and confusion matrix of `model` over `loader`, under
    `autocast()` (the same precision as training); `progress` names its progress bar ('': none)."""
    model.eval()
    meter = ClassificationMeter(num_classes, transform.device)
    for images, targets in progress_bar(loader, progress):
        images = transform(images)
        targets = targets.to(transform.device, non_blocking=True)
        with autocast():
            logits = model(images)
            loss = classification_loss(logits, targets)
        meter.update(loss, logits, targets)
    return meter.compute()


# ---------------------------------------------------------------------- loading and reporting
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


def precision_name(cfg):
    if not cfg.amp:
        return "FP32"
    return "AMP fp16" if cfg.amp_dtype == "float16" else "AMP bf16"


def format_epoch(r, epochs):
    memory = "" if r["peak_mem_mb"] is None else f", peak {r['peak_mem_mb'] / 1024:.1f} GiB"
    ema = f", EMA acc {r['val_acc_ema']:.2f}" if "val_acc_ema" in r else ""
    return (
        f"epoch {r['epoch']:>3}/{epochs}: train loss {r['train_loss']:.4f} acc {r['train_acc']:.2f} | "
        f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.2f}{ema} | lr {r['lr']:.2e} | "
        f"{r['seconds']:.1f} s, {r['images_per_sec']:.0f} img/s{memory}"
    )
