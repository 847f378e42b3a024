"""How much the Trainer costs: its epoch loop against a bare hand-written autocast loop doing the
same math (same model, batches, flips, normalization, loss and Adam), on in-memory tensors,
timed side by side in one process, alternating so both see the same machine.

    python benchmarks/overhead.py                      # ResNet-18, batch 32, 128 px, AMP bf16 on the CPU
    python benchmarks/overhead.py --device cuda --batch_size 256 --image_size 256
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import IMAGENET_MEAN, IMAGENET_STD, CachedImages, EpochSampler, make_loader  # noqa: E402
from metrics import Stopwatch  # noqa: E402
from model import build_model  # noqa: E402
from scheduler import WarmupCosineLR  # noqa: E402
from step import build_optimizer  # noqa: E402
from trainer import Trainer  # noqa: E402
from utils import derived_seed  # noqa: E402


def make_cfg(args):
    return argparse.Namespace(
        device=args.device,
        amp=not args.fp32,
        amp_dtype=args.amp_dtype,
        channels_last=not args.nchw,
        batch_size=args.batch_size,
        image_size=args.image_size,
        accum_steps=1,
        clip_grad_norm=None,
        epochs=args.rounds + 1,
        warmup_epochs=0,
        learning_rate=1e-4,
        weight_decay=1e-4,
        min_lr=0.0,
        seed=0,
        num_workers=0,
        log_interval=20,
        progress=False,
        save_every_steps=0,
        checkpoint_dir="",
        checkpoint_name="overhead",
    )


def build(cfg, loader):
    torch.manual_seed(0)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(6, pretrained=False).to(cfg.device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = WarmupCosineLR(optimizer, total_steps=cfg.epochs * len(loader), warmup_steps=0)
    return model, optimizer, scheduler


def bare_epoch(model, optimizer, loader, cfg, epoch):
    """What one would write by hand: the same math as Trainer.train_one_epoch, nothing else."""
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.amp_dtype)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and dtype == torch.float16)
    loader.sampler.set_epoch(epoch)
    model.train()
    for i, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        flip = torch.rand(len(images), generator=torch.Generator().manual_seed(derived_seed(0, epoch, i, 0))) < 0.5
        images = torch.where(flip.to(device).view(-1, 1, 1, 1), images.flip(-1), images)
        images = ((images.float() / 255 - mean) / std).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype, enabled=cfg.amp):
            loss = F.cross_entropy(model(images), targets.to(device, non_blocking=True))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)


def timing_parser(description, image_size, rounds):
    """The flags of a side-by-side timing script (this one and ema_cost.py)."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=image_size)
    p.add_argument("--steps", type=int, default=6, help="batches per timed epoch")
    p.add_argument("--rounds", type=int, default=rounds, help="timed epochs of each loop, alternating")
    p.add_argument("--amp_dtype", default="bfloat16")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--nchw", action="store_true")
    return p


def in_memory_loader(args, cfg):
    """--steps batches of random uint8 images in RAM (no decoding: the step alone is timed)."""
    n = args.steps * args.batch_size
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8)
    return make_loader(
        CachedImages(images, torch.randint(0, 6, (n,))), EpochSampler(n, True, 0), args.batch_size, cfg, cfg.device
    )


def time_alternating(loops, rounds, device):
    """{name: [seconds of each epoch]} of two loops, epoch(r) each, `rounds` times in ABBA order:
    neither always runs second (after the other warmed caches or the machine slowed)."""
    first, second = loops
    seconds = {name: [] for name in loops}
    for r in range(rounds):
        for name in (first, second) if r % 2 == 0 else (second, first):
            watch = Stopwatch(device)
            loops[name](r)
            seconds[name].append(watch.stop())
    return seconds


def setting_line(args, cfg):
    precision = "FP32" if args.fp32 else f"AMP {args.amp_dtype}"
    return (
        f"ResNet-18, batch {args.batch_size}, {args.image_size} px, {precision}, "
        f"{'NCHW' if args.nchw else 'channels_last'}, {cfg.device}: {args.steps} steps x {args.rounds} rounds"
    )


def main(argv=None):
    args = timing_parser(__doc__.split("\n\n")[0], image_size=128, rounds=10).parse_args(argv)
    cfg = make_cfg(args)
    loader = in_memory_loader(args, cfg)

    model_t, optimizer_t, scheduler_t = build(cfg, loader)
    logger = logging.getLogger("overhead")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            model_t, optimizer_t, scheduler_t, (loader, loader, loader), cfg, run_dir, list("abcdef"), logger
        )
        model_b, optimizer_b, _ = build(cfg, loader)
        bare_epoch(model_b, optimizer_b, loader, cfg, 0)  # warm up both (allocator, oneDNN/cuDNN plans)
        trainer.train_one_epoch(0)
        loops = {"bare": lambda r: bare_epoch(model_b, optimizer_b, loader, cfg, r), "trainer": trainer.train_one_epoch}
        timings = time_alternating(loops, args.rounds, cfg.device)
    n = args.steps * args.batch_size
    rate = {k: n / statistics.median(v) for k, v in timings.items()}
    ratio = rate["trainer"] / rate["bare"]
    print(setting_line(args, cfg))
    print(
        f"bare loop: {rate['bare']:.1f} images/s, Trainer: {rate['trainer']:.1f} images/s, Trainer / bare = {ratio:.3f}"
    )
    return ratio


if __name__ == "__main__":
    main()
