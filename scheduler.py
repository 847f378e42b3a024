"""The learning-rate schedule: linear warmup, then a cosine down to min_lr, per optimizer step."""
import math

from torch.optim.lr_scheduler import LRScheduler


def warmup_cosine_lr(step, base_lr, total_steps, warmup_steps, min_lr=0.0):
    """LR for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly and reaches `base_lr` at step `warmup_steps - 1` (so step 0 already
    trains, at base_lr / warmup_steps, unlike the old GradualWarmupScheduler that spent its
    first epoch at LR 0). From there a half cosine falls to `min_lr`, which the last step uses.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    cosine_start = max(warmup_steps - 1, 0)
    cosine_steps = total_steps - 1 - cosine_start
    if cosine_steps <= 0:
        return base_lr
    progress = min((step - cosine_start) / cosine_steps, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """`warmup_cosine_lr` as a torch scheduler, so its position saves and resumes with
    `state_dict()`. Call `step()` after every optimizer step."""

    def __init__(self, optimizer, total_steps, warmup_steps, min_lr=0.0, last_epoch=-1):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [
            warmup_cosine_lr(self.last_epoch, base_lr, self.total_steps, self.warmup_steps, self.min_lr)
            for base_lr in self.base_lrs
        ]

    def lr_at(self, step):
        """The (first parameter group's) LR of optimizer step `step`."""
        return warmup_cosine_lr(step, self.base_lrs[0], self.total_steps, self.warmup_steps, self.min_lr)

    def load_state_dict(self, state_dict):
        """Restore the position and set the optimizer's LR to match it, so the LR is a pure
        function of the restored step whatever the optimizer's own state says. The schedule's
        shape (total and warmup steps, min_lr) stays this session's: a resume under another
        number of processes may have another number of steps per epoch."""
        shape = {k: getattr(self, k) for k in ("total_steps", "warmup_steps", "min_lr")}
        super().load_state_dict(state_dict)
        self.__dict__.update(shape)
        self.go_to(self.last_epoch)

    def go_to(self, step):
        """Continue at optimizer step `step`: the LR of that step, set on the optimizer now."""
        self.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
