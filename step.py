"""One optimizer step in FP32 or with AMP: autocast, the loss, backward/unscale/clip/step through
GradScaler (AmpUpdate), and what a step may add: gradient accumulation, mixup/cutmix (BatchMix),
the weights' moving average (WeightEMA), and the optimizer itself. Read this file first: it is the
whole AMP story; trainer.py only loops over batches and calls it."""

import copy
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torchvision.transforms import v2

from hardware import tf32_on
from utils import derived_seed

# Mixed into a batch's seed for mixup/cutmix, so its draws are not the flip's of the same batch.
MIX_SEED_TAG = 0x6D6978  # "mix"
# ... and for the random numbers the forward draws itself (dropout, stochastic depth).
FORWARD_SEED_TAG = 0x667764  # "fwd"


# ---------------------------------------------------------------------- precision
def autocast_for(cfg):
    """A factory of autocast contexts for cfg's device and AMP dtype; disabled in FP32."""
    dtype = getattr(torch, cfg.amp_dtype) if cfg.amp else None
    return partial(torch.autocast, torch.device(cfg.device).type, dtype=dtype, enabled=cfg.amp)


def scaler_for(cfg):
    """GradScaler for float16 only: bfloat16 has float32's range, so its gradients don't underflow.
    Disabled, it is a no-op (see AmpUpdate)."""
    return torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.amp and cfg.amp_dtype == "float16")


def precision_name(cfg):
    if not cfg.amp:
        return "FP32 (tf32)" if tf32_on(cfg) else "FP32"
    return "AMP fp16" if cfg.amp_dtype == "float16" else "AMP bf16"


# ---------------------------------------------------------------------- the step
def classification_loss(logits, targets, label_smoothing=0.0):
    """Cross-entropy, in float32 whatever autocast computed the logits in (as autocast itself
    would), against class indices or class probabilities (the soft targets of mixup and cutmix);
    `label_smoothing` applies to either."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


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


def training_step(model, images, targets, autocast, update, loss_divisor=1, step=True, label_smoothing=0.0):
    """Forward under autocast, then `update` (an AmpUpdate): backward and, when `step`, the
    optimizer step. `targets` are class indices, or probabilities after BatchMix. Returns the
    loss (see classification_loss), the logits and the step's StepOutcome (None if no step)."""
    with autocast():
        logits = model(images)
        loss = classification_loss(logits, targets, label_smoothing)
    return loss, logits, update(loss / loss_divisor, step)


class SkippedStepGuard:
    """A float16 step that GradScaler skips had inf/NaN somewhere, and its forward may already
    have written them into BatchNorm's running statistics (which no optimizer step touches).
    `save()` keeps the buffers from before the step's forward; `restore_if(skipped)` puts them
    back when the step was skipped, on the device (no host sync). A no-op without a scaler.

    The copies are kept in one flat tensor per dtype (BatchNorm's float statistics, its int64
    step counters), so a step costs a handful of kernel launches whatever the model's size:
    save is one foreach copy per dtype; restore gathers the buffers into a flat scratch tensor
    (foreach copy), picks saved-or-current with one torch.where, and scatters the result back
    (foreach copy), where a loop over the buffers would launch three kernels per buffer (~480
    for ResNet-50)."""

    def __init__(self, model, enabled):
        buffers = [b for b in model.buffers() if b.numel()] if enabled else []
        self.groups = [
            self._flat_group([b for b in buffers if b.dtype == dtype])
            for dtype in dict.fromkeys(b.dtype for b in buffers)
        ]

    @staticmethod
    def _flat_group(buffers):
        """(buffers, saved, scratch, saved's views, scratch's views) for buffers of one dtype."""
        total = sum(b.numel() for b in buffers)
        saved = buffers[0].new_zeros(total)
        scratch = torch.empty_like(saved)
        return buffers, saved, scratch, _views(saved, buffers), _views(scratch, buffers)

    def save(self):
        for buffers, _, _, saved_views, _ in self.groups:
            torch._foreach_copy_(saved_views, buffers)

    def restore_if(self, skipped):
        for buffers, saved, scratch, _, scratch_views in self.groups:
            torch._foreach_copy_(scratch_views, buffers)
            torch.where(skipped, saved, scratch, out=scratch)
            torch._foreach_copy_(buffers, scratch_views)


def _views(flat, tensors):
    """Views of consecutive slices of `flat`, shaped like `tensors`."""
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


# ---------------------------------------------------------------------- which batch does what
class AccumulationGroup(NamedTuple):
    """Micro-batch `i`'s place among the --accum_steps micro-batches of one optimizer step."""

    first: bool  # the step's first micro-batch
    size: int  # micro-batches in the step (the last step of an epoch may have fewer); the loss divisor
    last: bool  # the step's last micro-batch: backward, then the optimizer step


def accumulation_group(i, accum_steps, num_batches):
    """Where batch `i` (0-based, of `num_batches` in the epoch) falls: an optimizer step every
    `accum_steps` micro-batches, the loss averaged over the micro-batches of its group."""
    group_start = i - i % accum_steps
    size = min(accum_steps, num_batches - group_start)
    return AccumulationGroup(first=i == group_start, size=size, last=i == group_start + size - 1)


class BatchSeeds(NamedTuple):
    """The seeds of one micro-batch's random draws, each a pure function of (seed, epoch, batch,
    rank): a resumed run draws them as the uninterrupted one did, without saved generator states."""

    flip: int  # the horizontal flip (DeviceTransform)
    mix: int  # mixup/cutmix (BatchMix)
    forward: int  # the forward's own draws (dropout, stochastic depth; ResNets draw none)


def batch_seeds(seed, epoch, batch, rank):
    return BatchSeeds(
        flip=derived_seed(seed, epoch, batch, rank),
        mix=derived_seed(seed, epoch, batch, rank, MIX_SEED_TAG),
        forward=derived_seed(seed, epoch, batch, rank, FORWARD_SEED_TAG),
    )


# ---------------------------------------------------------------------- what a step may add
class BatchMix:
    """--mixup_alpha / --cutmix_alpha: torchvision's MixUp or CutMix on a device batch (one of
    the two, chosen at random per batch, when both are on). Each image is mixed with the one
    before it in the (shuffled) batch, and its class index becomes soft targets: the two
    classes' shares, summing to 1. Each batch draws from its own seed (see batch_seeds), so a
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

    @classmethod
    def from_config(cls, cfg, model):
        """cfg's EMA of `model`, or None without --ema_decay."""
        decay = getattr(cfg, "ema_decay", None)
        return cls(model, decay) if decay else None

    @torch.no_grad()
    def update_parameters(self, model):
        first = bool(self.n_averaged == 0)
        lerped, copied = ([], []), ([], [])  # (EMA tensors, the model's)
        for ema, now in zip(
            [*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()]
        ):
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
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


# Optimizers that GradScaler steps through `_maybe_opt_step`, which reads the inf/NaN flag with
# `.item()`: a host sync every float16 step. torch 2.14's RAdam has no fused kernel and no
# `_step_supports_amp_scaling` (capturable=True keeps its step counts on the device but GradScaler
# still reads the flag); fused Adam, AdamW and SGD skip the step on the device instead.
HOST_SYNC_OPTIMIZERS = ("radam",)


def build_optimizer(model, cfg):
    """cfg's optimizer over the model's parameters (see parameter_groups). The fused kernels do
    the whole update in one pass over the parameters: a few launches on CUDA, and on the CPU
    ~7x faster than the default for Adam (7 vs 50 ms a step for ResNet-18: docs/benchmarks.md),
    and with float16 they take GradScaler's inf/NaN flag on the device. RAdam has no fused
    kernel: it gets the foreach one (a launch per group of tensors), and float16 syncs (see
    HOST_SYNC_OPTIMIZERS)."""
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
