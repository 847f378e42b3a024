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

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import CachedImages, EpochSampler, make_loader  # noqa: E402
from metrics import Stopwatch, synchronize  # noqa: E402
from overhead import build, make_cfg  # noqa: E402
from trainer import Trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="batches per timed epoch")
    p.add_argument("--rounds", type=int, default=6, help="timed epochs of each, alternating")
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--amp_dtype", default="bfloat16")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--nchw", action="store_true")
    args = p.parse_args(argv)
    cfg = make_cfg(args)
    n = args.steps * args.batch_size
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8)
    loader = make_loader(CachedImages(images, torch.randint(0, 6, (n,))), EpochSampler(n, True, 0), args.batch_size,
                         cfg, cfg.device)
    settings = {"plain": cfg, "ema": argparse.Namespace(**vars(cfg), ema_decay=args.ema_decay)}
    with tempfile.TemporaryDirectory() as run_dir:
        trainers = {}
        for name, c in settings.items():
            model, optimizer, scheduler = build(c, loader)
            trainers[name] = Trainer(model, optimizer, scheduler, (loader,) * 3, c, run_dir, list("abcdef"),
                                     logging.getLogger("ema_cost"))
            trainers[name].train_one_epoch(0)  # warm up (allocator, oneDNN/cuDNN plans)
        seconds = {name: [] for name in trainers}
        for r in range(args.rounds):
            # ABBA order: neither always runs second (after the other warmed caches or the machine slowed).
            for name in (("plain", "ema") if r % 2 == 0 else ("ema", "plain")):
                watch = Stopwatch(cfg.device)
                trainers[name].train_one_epoch(r + 1)
                seconds[name].append(watch.stop() / args.steps)
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
    precision = "FP32" if args.fp32 else f"AMP {args.amp_dtype}"
    print(f"ResNet-18, batch {args.batch_size}, {args.image_size} px, {precision}, "
          f"{'NCHW' if args.nchw else 'channels_last'}, {cfg.device}: {args.steps} steps x {args.rounds} rounds")
    # The median epoch, and the fastest (the one least disturbed by other work on a shared machine).
    for statistic in (statistics.median, min):
        step = {name: 1000 * statistic(v) for name, v in seconds.items()}
        print(f"{statistic.__name__:>6}: step without EMA {step['plain']:.1f} ms, with --ema_decay {step['ema']:.1f} ms "
              f"({100 * (step['ema'] / step['plain'] - 1):+.1f}%)")
    print(f"the EMA update alone: {update:.2f} ms ({100 * update / step['plain']:.1f}% of the fastest step without it)")
    return seconds, update


if __name__ == "__main__":
    main()
