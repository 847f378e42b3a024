"""Does the training loop make the host wait for the GPU? The real Trainer trains on in-memory
batches under torch.cuda.set_sync_debug_mode("error"), which raises at any synchronizing CUDA
call (a blocking copy to the host, .item(), a stream sync), for FP32, float16 + GradScaler, the
EMA and mixup/cutmix. Allowed: the loop's reads every --log_interval steps (Trainer.log_progress:
the progress line, the divergence check, TensorBoard), during which the check is off. A first,
unchecked epoch warms up (cuDNN's autotuning, the optimizer's lazy state); the next epoch's steps
are checked. `radam_float16` is expected to sync: GradScaler reads its inf/NaN flag with .item()
for optimizers without a fused kernel (step.HOST_SYNC_OPTIMIZERS).

    python benchmarks/sync_check.py                  # on a GPU; a line per case
    python benchmarks/sync_check.py --device cpu     # runs the same steps; nothing to check on a CPU
"""

import argparse
import logging
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import parse_config  # noqa: E402
from dataset import CachedImages, EpochSampler, make_loader  # noqa: E402
from model import build_model  # noqa: E402
from scheduler import WarmupCosineLR  # noqa: E402
from step import build_optimizer  # noqa: E402
from trainer import Trainer  # noqa: E402

NUM_CLASSES = 6
# case -> (its flags, whether the loop is expected to sync outside the --log_interval reads)
CASES = {
    "fp32": ([], False),
    "amp_float16": (["--amp", "--amp_dtype", "float16"], False),
    "ema": (["--ema_decay", "0.9"], False),
    "mixup": (["--mixup_alpha", "0.2", "--cutmix_alpha", "1.0"], False),
    "radam_float16": (["--amp", "--amp_dtype", "float16", "--optimizer", "radam"], True),
}


def set_sync_check(on, device):
    """Raise at synchronizing CUDA calls from now on (`on`), or stop raising; nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error" if on else "default")


class CheckedLoader:
    """A training loader whose batches are consumed with the check on: it is switched on as each
    batch is handed to the loop (its loading, pinning and copying included in the next one)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.sampler, self.batch_size, self.dataset = loader.sampler, loader.batch_size, loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            set_sync_check(True, self.device)
            yield batch
        set_sync_check(False, self.device)


def check(flags, device="cuda", steps=20, log_interval=10, batch_size=8, image_size=32):
    """Train `steps` optimizer steps with `flags` (after as many unchecked ones). Returns
    {"steps", "log_reads" (the --log_interval reads allowed), "sync" (None, or where the first
    synchronizing call outside them was made)}."""
    cfg, _ = parse_config(
        [
            "--device",
            device,
            "--batch_size",
            str(batch_size),
            "--image_size",
            str(image_size),
            "--epochs",
            "2",
            "--warmup_epochs",
            "0",
            "--no_pretrained",
            "--num_workers",
            "0",
            "--no_progress",
            "--log_interval",
            str(log_interval),
            "--learning_rate",
            "1e-3",
            *flags,
        ]
    )
    device = torch.device(cfg.device)
    torch.backends.cudnn.benchmark = True  # as training does
    n = steps * batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    loader = make_loader(CachedImages(images, labels), EpochSampler(n, True, 0), batch_size, cfg, device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(NUM_CLASSES, pretrained=False, name=cfg.model).to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = WarmupCosineLR(optimizer, total_steps=2 * steps, warmup_steps=0)
    log_reads = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            model,
            optimizer,
            scheduler,
            (loader, loader, loader),
            cfg,
            run_dir,
            list("abcdef"),
            logging.getLogger("sync_check"),
        )
        trainer.train_one_epoch(0)  # warm-up, unchecked
        trainer.train_loader = CheckedLoader(loader, device)
        log_progress = trainer.log_progress

        def allowed_log_progress(meter, bar, loss, outcome, due):
            set_sync_check(False, device)
            if due:
                log_reads.append(scheduler.last_epoch)
            log_progress(meter, bar, loss, outcome, due)
            set_sync_check(True, device)

        trainer.log_progress = allowed_log_progress
        try:
            trainer.train_one_epoch(1)
            sync = None
        except RuntimeError as exc:
            if "synchronizing" not in str(exc):
                raise
            sync = where_raised(exc)
        finally:
            set_sync_check(False, device)
    return {"steps": scheduler.last_epoch - steps, "log_reads": len(log_reads), "sync": sync}


def where_raised(exc):
    """The last line of this project's code on the way to `exc`: the call that synchronized."""
    import traceback

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root)]
    frame = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    return f"{os.path.relpath(frame.filename, root)}:{frame.lineno}: {frame.line}"


def check_all(device="cuda", cases=None, **kwargs):
    """{case: check()'s result, with "expected_sync" and "ok"} for each case of CASES (on a CPU
    every case is ok: nothing there waits for a GPU)."""
    results, checked = {}, torch.device(device).type == "cuda"
    for name in cases or CASES:
        flags, expected = CASES[name]
        result = check(flags, device, **kwargs)
        result.update(expected_sync=expected, ok=not checked or (result["sync"] is not None) == expected)
        results[name] = result
    return results


def report_lines(results, device):
    """A markdown list: a line per case."""
    if torch.device(device).type != "cuda":
        return ["- on the CPU nothing waits for a GPU: nothing to check"]
    lines = []
    for name, r in results.items():
        seen = f"synchronized at {r['sync']}" if r["sync"] else "no sync"
        verdict = "ok" if r["ok"] else "FAILED"
        expected = " (expected: GradScaler's .item())" if r["expected_sync"] else ""
        lines.append(
            f"- {name}: {r['steps']} steps, {r['log_reads']} --log_interval reads allowed, {seen}{expected}: {verdict}"
        )
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    results = check_all(args.device, steps=args.steps)
    print("\n".join(report_lines(results, args.device)))
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r["ok"] for r in main().values()) else 1)
