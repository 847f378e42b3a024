"""The LR schedule: warmup that trains from the first step, cosine to min_lr, resumable."""

import math

import pytest
import torch

from scheduler import WarmupCosineLR, warmup_cosine_lr


def lr_curve(total, warmup, base=1e-3, min_lr=1e-5):
    return [warmup_cosine_lr(s, base, total, warmup, min_lr) for s in range(total)]


@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 5), (20, 0), (8, 8), (1, 0)])
def test_curve_shape(total, warmup):
    base, min_lr = 1e-3, 1e-5
    lrs = lr_curve(total, warmup, base, min_lr)
    assert lrs[0] > 0, "the first step must train (the old warmup used LR 0)"
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(base)  # the base LR at the end of warmup
        assert all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup]))  # rising
    if total > max(warmup, 1):
        assert lrs[-1] == pytest.approx(min_lr)  # the very last step
        tail = lrs[max(warmup - 1, 0) :]
        assert all(a >= b for a, b in zip(tail, tail[1:]))  # falling after warmup
    assert max(lrs) == pytest.approx(base)
    # Continuous: no jump bigger than a warmup increment or a cosine step.
    biggest_step = max([base / warmup if warmup else 0, math.pi / 2 * (base - min_lr) / max(total - max(warmup, 1), 1)])
    assert all(abs(a - b) <= biggest_step * 1.0001 for a, b in zip(lrs, lrs[1:]))


def test_torch_scheduler_follows_the_function_and_resumes():
    def make():
        opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
        return opt, WarmupCosineLR(opt, total_steps=50, warmup_steps=5, min_lr=1e-5)

    opt, sched = make()
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(lr_curve(50, 5))

    # Save in the middle, load into a fresh scheduler: the rest of the curve is identical.
    opt, sched = make()
    for _ in range(23):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    rest = []
    for _ in range(23, 50):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(seen[23:])
