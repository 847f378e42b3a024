"""Entry point: parse the flags, build data, model, optimizer and schedule, hand them to the Trainer."""
import os
import sys

import torch

import benchmark
import config
from dataset import DeviceTransform, build_loaders, make_demo_dataset
from model import build_model
from scheduler import WarmupCosineLR
from trainer import Trainer, autocast_for, build_optimizer, load_checkpoint, precision_name
from trainer import evaluate as evaluate_model
from utils import (
    GracefulStop,
    UserError,
    atomic_write_json,
    log_to_file,
    remove_stale_temp_files,
    seed_everything,
    setup_logging,
)

# Files a run writes; --overwrite removes these and nothing else.
RUN_FILES = ("best.pt", "last.pt", "results.json", "config.json", "train.log")
# A folder with any of these holds a run that trained (config.json alone: one that never started).
TRAINED_FILES = ("best.pt", "last.pt", "results.json")


def refuse_to_clobber(cfg):
    """A new run must not silently replace a run of the same name (checked before any write)."""
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    existing = [f for f in TRAINED_FILES if os.path.exists(os.path.join(run_dir, f))]
    if existing and not cfg.overwrite:
        raise UserError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --checkpoint_name"
        )


def start_run_dir(run_dir, fresh):
    """Create the run folder once the run is ready to start; a fresh run clears an old one's files."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        remove_stale_temp_files(run_dir)  # left by a write that was killed
        for name in RUN_FILES if fresh else ():
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    except OSError as exc:
        raise UserError(f"cannot prepare {run_dir}: {exc.strerror}") from None


def train(cfg, checkpoint=None):
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    logger = setup_logging()
    train_loader, val_loader, test_loader, class_names = build_loaders(cfg, cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)  # here, so the init depends on the seed alone
    model = build_model(len(class_names), cfg.pretrained and checkpoint is None, cfg.pretrained_path)
    model.to(cfg.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg)
    # cuDNN tries its algorithms once per input shape and keeps the fastest (not deterministic).
    torch.backends.cudnn.benchmark = not cfg.deterministic
    train_model = torch.compile(model) if cfg.compile else model
    steps_per_epoch = -(-len(train_loader) // cfg.accum_steps)
    scheduler = WarmupCosineLR(
        optimizer,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch,
        min_lr=cfg.min_lr,
    )
    loaders = (train_loader, val_loader, test_loader)
    stop = GracefulStop().install()
    trainer = Trainer(model, optimizer, scheduler, loaders, cfg, run_dir, class_names, logger,
                      train_model=train_model, stop=stop)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    start_run_dir(run_dir, fresh=checkpoint is None)
    log_to_file(logger, os.path.join(run_dir, "train.log"))
    if checkpoint is not None:
        batch = f", batch {trainer.batch_in_epoch}" if trainer.batch_in_epoch else ""
        logger.info(f"resuming {cfg.checkpoint_name} after epoch {trainer.epoch}{batch} (step {scheduler.last_epoch})")
    else:
        atomic_write_json(os.path.join(run_dir, "config.json"), vars(cfg))
    try:
        trainer.fit()
    finally:
        stop.uninstall()
    return 0


def evaluate(cfg):
    """Re-test a run's best.pt with the image size and precision it was trained with."""
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    best = load_checkpoint(os.path.join(run_dir, "best.pt"))
    saved = best["config"]
    for name in ("image_size", "amp", "amp_dtype", "val_fraction", "seed"):
        setattr(cfg, name, saved[name])
    if cfg.amp and cfg.device == "cpu":
        cfg.amp_dtype = "bfloat16"
    _, _, test_loader, class_names = build_loaders(cfg, cfg.device)
    if list(class_names) != list(best["class_names"]):
        raise UserError(f"the test classes {class_names} differ from the run's {best['class_names']}")
    model = build_model(len(class_names), pretrained=False)
    model.load_state_dict(best["model"])
    model.to(cfg.device)
    test = evaluate_model(model, test_loader, DeviceTransform(cfg.device), autocast_for(cfg), len(class_names))
    print(f"{cfg.checkpoint_name} (epoch {best['epoch']}, {precision_name(cfg)}): "
          f"test accuracy {test['acc']:.2f}% on {test['count']} images, test loss {test['loss']:.4f}")
    return 0


def run(argv=None):
    cfg, explicit = config.parse_config(argv)
    if cfg.demo and make_demo_dataset(cfg.data_dir):
        print(f"wrote a generated demo dataset to {cfg.data_dir}")
    if cfg.benchmark:
        return benchmark.run(cfg)
    if cfg.evaluate:
        return evaluate(cfg)
    if cfg.resume:
        run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
        checkpoint = load_checkpoint(os.path.join(run_dir, "last.pt"))
        cfg = config.merge_resumed(checkpoint["config"], cfg, explicit)
        return train(cfg, checkpoint)
    refuse_to_clobber(cfg)
    return train(cfg)


def main(argv=None):
    try:
        return run(argv)
    except UserError as exc:
        print(f"{exc.prefix}{exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
