"""The learning-rate schedule, per optimizer step: a linear warmup, then a cosine down to min_lr
(the default), step decay at milestones, or a constant LR."""

import math
import warnings

from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("cosine", "step", "constant")


def warmup_lr(step, base_lr, warmup_steps):
    """The LR of warmup step `step` (< warmup_steps): it rises linearly and reaches `base_lr` at
    step `warmup_steps - 1`, so step 0 already trains, at base_lr / warmup_steps (unlike the old
    GradualWarmupScheduler that spent its first epoch at LR 0)."""
    return base_lr * (step + 1) / warmup_steps


def warmup_cosine_lr(step, base_lr, total_steps, warmup_steps, min_lr=0.0):
    """LR for optimizer step `step` (0-based) of `total_steps`: warmup (see `warmup_lr`), then
    from its last step a half cosine falls to `min_lr`, which the last step uses."""
    if step < warmup_steps:
        return warmup_lr(step, base_lr, warmup_steps)
    cosine_start = max(warmup_steps - 1, 0)
    cosine_steps = total_steps - 1 - cosine_start
    if cosine_steps <= 0:
        return base_lr
    progress = min((step - cosine_start) / cosine_steps, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def step_decay_lr(step, base_lr, warmup_steps, milestones, gamma=0.1):
    """LR for optimizer step `step`: warmup, then `base_lr * gamma ** k`, where k counts the
    `milestones` (optimizer steps) at or before `step`: from step m on, a milestone m has
    decayed the LR. (Milestones inside the warmup count only once it is over.)"""
    if step < warmup_steps:
        return warmup_lr(step, base_lr, warmup_steps)
    return base_lr * gamma ** sum(1 for m in milestones if m <= step)


def constant_lr(step, base_lr, warmup_steps):
    """LR for optimizer step `step`: warmup, then `base_lr` to the end."""
    return warmup_lr(step, base_lr, warmup_steps) if step < warmup_steps else base_lr


def lr_at_step(step, base_lr, schedule, total_steps, warmup_steps, min_lr=0.0, milestones=(), gamma=0.1):
    """LR for optimizer step `step` (0-based) of `total_steps` under `schedule` (one of
    SCHEDULES); `min_lr` is the cosine's, `milestones` (in optimizer steps) and `gamma` step decay's."""
    if schedule == "cosine":
        return warmup_cosine_lr(step, base_lr, total_steps, warmup_steps, min_lr)
    if schedule == "step":
        return step_decay_lr(step, base_lr, warmup_steps, milestones, gamma)
    if schedule == "constant":
        return constant_lr(step, base_lr, warmup_steps)
    raise ValueError(f"unknown LR schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


class WarmupLR(LRScheduler):
    """`lr_at_step` as a torch scheduler, so its position saves and resumes with `state_dict()`.
    Call `step()` after every optimizer step. Every parameter group follows the schedule from
    its own base LR."""

    # The schedule's shape: set by this session, never by a loaded state (see load_state_dict).
    SHAPE = ("schedule", "total_steps", "warmup_steps", "min_lr", "milestones", "gamma")

    def __init__(
        self,
        optimizer,
        total_steps,
        warmup_steps,
        min_lr=0.0,
        last_epoch=-1,
        schedule="cosine",
        milestones=(),
        gamma=0.1,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        self.milestones = list(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _lr(self, step, base_lr):
        return lr_at_step(
            step, base_lr, self.schedule, self.total_steps, self.warmup_steps, self.min_lr, self.milestones, self.gamma
        )

    def get_lr(self):
        return [self._lr(self.last_epoch, base_lr) for base_lr in self.base_lrs]

    def step(self, *args, **kwargs):
        """On to the next optimizer step's LR. (A float16 step that GradScaler skipped never
        called optimizer.step(); the schedule counts steps, so PyTorch's warning about the order
        of the two calls does not apply, for any user of this class.)"""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            super().step(*args, **kwargs)

    def lr_at(self, step):
        """The (first parameter group's) LR of optimizer step `step`."""
        return self._lr(step, self.base_lrs[0])

    def load_state_dict(self, state_dict):
        """Restore the position and set the optimizer's LR to match it, so the LR is a pure
        function of the restored step whatever the optimizer's own state says. The schedule's
        shape (SHAPE: total and warmup steps, milestones, ...) stays this session's: a resume
        under another number of processes may have another number of steps per epoch."""
        shape = {k: getattr(self, k) for k in self.SHAPE}
        super().load_state_dict(state_dict)
        self.__dict__.update(shape)
        self.go_to(self.last_epoch)

    def go_to(self, step):
        """Continue at optimizer step `step`: the LR of that step, set on the optimizer now."""
        self.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr


# The name from before there was more than one schedule (cosine is the default).
WarmupCosineLR = WarmupLR
