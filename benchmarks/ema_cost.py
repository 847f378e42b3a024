"""What --ema_decay costs a training step: Trainer epochs with and without the EMA of the weights
(same model, init and in-memory batches), timed side by side in one process in ABBA order, plus
the EMA update alone.

    python benchmarks/ema_cost.py                                   # ResNet-18, batch 32, 64 px (the demo's), CPU
    python benchmarks/ema_cost.py --image_size 128                  # --benchmark's CPU batch shape
    python benchmarks/ema_cost.py --device cuda --batch_size 256 --image_size 256
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overhead import build, in_memory_loader, make_cfg, setting_line, time_alternating, timing_parser  # noqa: E402

from metrics import synchronize  # noqa: E402
from trainer import Trainer  # noqa: E402


def main(argv=None):
    p = timing_parser(__doc__.split("\n\n")[0], image_size=64, rounds=6)
    p.add_argument("--ema_decay", type=float, default=0.999)
    args = p.parse_args(argv)
    cfg = make_cfg(args)
    loader = in_memory_loader(args, cfg)
    settings = {"plain": cfg, "ema": argparse.Namespace(**vars(cfg), ema_decay=args.ema_decay)}
    with tempfile.TemporaryDirectory() as run_dir:
        trainers = {}
        for name, c in settings.items():
            model, optimizer, scheduler = build(c, loader)
            trainers[name] = Trainer(
                model, optimizer, scheduler, (loader,) * 3, c, run_dir, list("abcdef"), logging.getLogger("ema_cost")
            )
            trainers[name].train_one_epoch(0)  # warm up (allocator, oneDNN/cuDNN plans)
        loops = {name: lambda r, t=t: t.train_one_epoch(r + 1) for name, t in trainers.items()}
        seconds = {
            name: [s / args.steps for s in epochs]
            for name, epochs in time_alternating(loops, args.rounds, cfg.device).items()
        }
    # The EMA update alone, as the step runs it (its foreach lerp over the weights and buffers).
    trainer = trainers["ema"]
    updates = []
    for _ in range(20):
        synchronize(cfg.device)
        started = time.perf_counter()
        trainer.ema.update_parameters(trainer.model)
        synchronize(cfg.device)
        updates.append(time.perf_counter() - started)
    update = 1000 * statistics.median(updates)
    print(setting_line(args, cfg))
    # The median epoch, and the fastest (the one least disturbed by other work on a shared machine).
    for statistic in (statistics.median, min):
        step = {name: 1000 * statistic(v) for name, v in seconds.items()}
        print(
            f"{statistic.__name__:>6}: step without EMA {step['plain']:.1f} ms, with --ema_decay {step['ema']:.1f} ms "
            f"({100 * (step['ema'] / step['plain'] - 1):+.1f}%)"
        )
    print(f"the EMA update alone: {update:.2f} ms ({100 * update / step['plain']:.1f}% of the fastest step without it)")
    return seconds, update


if __name__ == "__main__":
    main()
