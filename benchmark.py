"""--benchmark: what AMP buys on this machine. Times training steps of the configured model in
FP32 and AMP, NCHW and channels_last, on synthetic data; with --data, the input pipeline too."""

import argparse
import os
import statistics
import time

import torch

from config import bf16_supported
from dataset import DeviceTransform, EpochSampler, build_datasets, cache_dataset, make_loader
from hardware import describe, device_name, summary, tf32_on
from machine import LoadWatch, busy_note, threads_note, wait_policy
from metrics import ClassificationMeter, StepHealth, Stopwatch, peak_memory_mb, reset_peak_memory
from model import build_model
from step import HOST_SYNC_OPTIMIZERS, AmpUpdate, autocast_for, batch_seeds, build_optimizer, training_step
from utils import atomic_write_json

WARMUP_STEPS = 3  # untimed steps first: oneDNN/cuDNN plans, the allocator, torch.compile
NUM_CLASSES = 6
MODES = {"fp32": None, "amp_float16": "float16", "amp_bfloat16": "bfloat16"}  # mode -> autocast dtype


def supported_modes(device, amp_dtype=None):
    """float16 autocast is a CUDA recipe (on the CPU only when asked for: slow there); bfloat16
    needs a CPU or a GPU that has it."""
    device = torch.device(device)
    modes = ["fp32"]
    if device.type == "cuda" or amp_dtype == "float16":
        modes.append("amp_float16")
    if device.type == "cpu" or bf16_supported():
        modes.append("amp_bfloat16")
    return modes


class TrainingSteps:
    """One benchmark row: a fresh model, optimizer and synthetic batch in one mode and memory
    format, each step what a training step of the Trainer does (without mixup and the EMA, off by
    default): the flip and normalization on the device, the forward's seed, forward, loss,
    backward and optimizer step through AmpUpdate, the loss/accuracy/confusion meter, and the
    step-health counts (with float16, the skipped-step guard's save and restore)."""

    def __init__(self, cfg, mode, channels_last, compiled=False):
        self.mode, self.channels_last, self.compiled = mode, channels_last, compiled
        self.device = device = torch.device(cfg.device)
        dtype = MODES[mode]
        # Memory already held (the other rows' models) is not this row's: its peak is counted above it.
        self.memory_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        torch.manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = (
            build_model(NUM_CLASSES, pretrained=False, name=cfg.model).to(device, memory_format=memory_format).train()
        )
        self.model = torch.compile(model) if compiled else model
        optimizer = build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
        self.update = AmpUpdate(optimizer, scaler)
        self.meter = ClassificationMeter(NUM_CLASSES, device)
        self.health = StepHealth(model, scaler, device)
        self.transform = DeviceTransform(device, channels_last)
        self.autocast = autocast_for(
            argparse.Namespace(device=cfg.device, amp=dtype is not None, amp_dtype=dtype or "float32")
        )
        self.images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
        self.targets = torch.randint(0, NUM_CLASSES, (cfg.batch_size,))
        if device.type == "cuda":
            self.images, self.targets = self.images.pin_memory(), self.targets.pin_memory()
        self.steps = 0

    def step(self):
        """Seconds of one training step (as Trainer.train_one_epoch takes it), the device synchronized."""
        watch = Stopwatch(self.device)
        seeds = batch_seeds(0, 0, self.steps, 0)
        images = self.transform(self.images, flip_seed=seeds.flip)
        targets = self.targets.to(self.device, non_blocking=True)
        self.health.before_step()
        torch.manual_seed(seeds.forward)
        loss, logits, outcome = training_step(self.model, images, targets, self.autocast, self.update)
        self.meter.update(loss, logits, targets)
        self.health.record(loss, outcome)
        self.steps += 1
        self.last_seconds = watch.stop()
        return self.last_seconds

    def name(self):
        return f"{self.mode} {'channels_last' if self.channels_last else 'NCHW'}{' compiled' if self.compiled else ''}"

    def peak_mem_mb(self):
        """Peak memory of one steady-state step (CUDA), or None on the CPU."""
        reset_peak_memory(self.device)
        self.step()
        peak = peak_memory_mb(self.device)
        return None if peak is None else peak - self.memory_before / 2**20


class Progress:
    """Lines that say how far the benchmark is and about how long it has left (a CPU benchmark
    can take minutes): one per row once it is warmed up, then one at most every
    `every` seconds while the rows are timed. Silent with --no_progress."""

    def __init__(self, enabled, every=10.0):
        self.enabled, self.every = enabled, every
        self.last = time.perf_counter()

    def say(self, text, force=True):
        if self.enabled and (force or time.perf_counter() - self.last >= self.every):
            print(text, flush=True)
            self.last = time.perf_counter()


def seconds_left(known, unknown_rows, timed_steps):
    """About how long the rest takes: `timed_steps` steps of every row, plus warming up (and the
    peak-memory step) `unknown_rows` rows not built yet, whose steps are guessed at the known rows' mean."""
    guess = statistics.mean(known)
    return (unknown_rows * (WARMUP_STEPS + 1) + timed_steps * unknown_rows) * guess + timed_steps * sum(known)


def benchmark_rows(cfg, modes):
    """One row per (mode, memory format[, compiled]): images/s and ms/step of the median of
    cfg.benchmark_steps timed steps, and the peak memory. The rows take their timed steps in
    turn, one each, so a slow spell of a shared machine slows them all alike."""
    variants = [
        (mode, channels_last, compiled)
        for mode in modes
        for channels_last in (False, True)
        for compiled in ((False, True) if cfg.compile else (False,))
    ]
    progress = Progress(getattr(cfg, "progress", True))
    rows, peaks = [], []
    for k, variant in enumerate(variants, 1):
        row = TrainingSteps(cfg, *variant)
        for _ in range(WARMUP_STEPS):
            row.step()
        peaks.append(row.peak_mem_mb())
        rows.append(row)
        left = seconds_left([r.last_seconds for r in rows], len(variants) - k, cfg.benchmark_steps)
        progress.say(
            f"  row {k}/{len(variants)} ({row.name()}) warmed up: {row.last_seconds:.2f} s a step; "
            f"about {left:.0f} s left"
        )
    times = [[] for _ in rows]
    for n in range(cfg.benchmark_steps):
        for row, row_times in zip(rows, times):
            row_times.append(row.step())
        left = (cfg.benchmark_steps - n - 1) * sum(statistics.median(t) for t in times)
        progress.say(f"  timed step {n + 1}/{cfg.benchmark_steps} of every row: about {left:.0f} s left", force=False)
    results = []
    for row, row_times, peak in zip(rows, times, peaks):
        seconds = statistics.median(row_times)
        results.append(
            {
                "mode": row.mode,
                "channels_last": row.channels_last,
                "compiled": row.compiled,
                "images_per_sec": cfg.batch_size / seconds,
                "ms_per_step": 1000 * seconds,
                "peak_mem_mb": peak,
            }
        )
    return results


def format_table(rows, tf32=False):
    """The rows as a markdown table; `tf32`: the FP32 rows ran in TF32 (--fp32_math tf32 on CUDA)."""
    base = next((r for r in rows if r["mode"] == "fp32" and not r["channels_last"] and not r["compiled"]), rows[0])
    lines = [
        "| mode | memory format | images/s | ms/step | peak memory | speedup vs FP32 NCHW |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        memory = "n/a (CPU)" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} MB"
        fmt = "channels_last" if r["channels_last"] else "NCHW"
        mode = r["mode"] + (" (tf32)" if tf32 and r["mode"] == "fp32" else "") + (" + compile" if r["compiled"] else "")
        lines.append(
            f"| {mode} | {fmt} | {r['images_per_sec']:.1f} | {r['ms_per_step']:.1f} | {memory} | "
            f"{r['images_per_sec'] / base['images_per_sec']:.2f}x |"
        )
    return "\n".join(lines)


def time_input_pipeline(cfg, train_set, batches=20, on_row=None):
    """Images/s the training loader of `train_set` delivers (decode + resize in workers), per
    worker count; `on_row(row)` hears of each row as soon as it is measured."""
    counts = sorted({w for w in (0, 1, 2, 4, 8) if w <= (os.cpu_count() or 1)} | {cfg.num_workers})
    results = []
    sources = [(w, lambda: train_set) for w in counts]
    if cfg.cache:
        sources.append(("cache", lambda: cache_dataset(train_set, cfg.num_workers, cfg.progress)))
    for workers, dataset in sources:
        dataset = dataset()
        run_cfg = argparse.Namespace(**{**vars(cfg), "num_workers": workers if workers != "cache" else 0})
        sampler = EpochSampler(len(dataset), True, cfg.seed)
        loader = make_loader(dataset, sampler, cfg.batch_size, run_cfg, "cpu")
        results.append({"workers": workers, "images_per_sec": images_per_sec(loader, batches)})
        if on_row is not None:
            on_row(results[-1])
        del loader
    return results


def images_per_sec(loader, batches):
    """Images/s of the `batches` batches after the first. The clock starts when the first batch
    arrives (after the workers' start-up), so its images, delivered before, do not count."""
    start, images = None, 0
    for i, (batch, _) in enumerate(loader):
        if i == 0:
            start = time.perf_counter()
        else:
            images += len(batch)
        if i == batches:
            break
    if not images:  # a loader of one batch: nothing was timed
        return float("nan")
    return images / (time.perf_counter() - start)


def benchmark_record(cfg, rows, load):
    """What benchmark.json holds: the rows and what they were measured with, and how busy the
    machine was (`load`: a LoadWatch record of the timing)."""
    return {
        "device": device_name(cfg.device),
        "device_capability": describe(cfg.device).capability,
        "torch": torch.__version__,
        "fp32_math": "tf32" if tf32_on(cfg) else "ieee",  # (the CPU computes IEEE FP32 whatever --fp32_math says)
        "model": cfg.model,  # what TrainingSteps builds
        "optimizer": cfg.optimizer,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "benchmark_steps": cfg.benchmark_steps,
        "threads": torch.get_num_threads(),  # (every row alike)
        "openmp_wait": wait_policy(),
        **load,
        "rows": rows,
    }


def run(cfg):
    """Print and save the benchmark table (and the input pipeline's, with --data)."""
    # The dataset first: a missing or broken one fails now, not after minutes of timing.
    train_set = build_datasets(cfg, cfg.progress)[0] if cfg.data else None
    modes = supported_modes(cfg.device, cfg.amp_dtype)
    torch.backends.cudnn.benchmark = not cfg.deterministic  # as training does: the fastest cuDNN kernels
    print(
        f"benchmark: {cfg.model} training steps ({cfg.optimizer}), batch {cfg.batch_size}, "
        f"{cfg.image_size}x{cfg.image_size} px, on {device_name(cfg.device)} ({summary(cfg.device)}); each step as training takes it "
        f"(flip and normalization on the device, forward, backward, optimizer step, the loss/accuracy meter and "
        f"the step-health counts); the median of {cfg.benchmark_steps} steps a row, the rows stepping in turn, "
        f"after {WARMUP_STEPS} warm-up steps; peak memory of one step after them; every row on "
        f"{threads_note(torch.get_num_threads())}",
        flush=True,
    )
    if cfg.optimizer in HOST_SYNC_OPTIMIZERS and "amp_float16" in modes and torch.device(cfg.device).type == "cuda":
        print(
            f"note: with --optimizer {cfg.optimizer} GradScaler reads its inf/NaN flag back to the host at every "
            f"amp_float16 step, a wait for the GPU (no fused kernel skips the step on the device); the amp_float16 "
            f"rows' times include it: compare them with --optimizer adam's",
            flush=True,
        )
    watch = LoadWatch()
    rows = benchmark_rows(cfg, modes)
    load = watch.record()
    print(format_table(rows, tf32_on(cfg)))
    if busy_note(load):
        print(f"note: {busy_note(load)}; run --benchmark again when the machine is quiet")
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(os.path.join(run_dir, "benchmark.json"), benchmark_record(cfg, rows, load))
    print(f"wrote {os.path.join(run_dir, 'benchmark.json')}")
    if cfg.data:
        fastest = max(rows, key=lambda r: r["images_per_sec"])
        print("\n| data loading workers | images/s |\n|---|---|", flush=True)  # each row as soon as it is timed
        pipeline = time_input_pipeline(
            cfg, train_set, on_row=lambda p: print(f"| {p['workers']} | {p['images_per_sec']:.0f} |", flush=True)
        )
        best = max(pipeline, key=lambda p: p["images_per_sec"])
        verdict = "can" if best["images_per_sec"] >= fastest["images_per_sec"] else "cannot"
        source = "from --cache" if best["workers"] == "cache" else f"with {best['workers']} workers"
        advice = "" if verdict == "can" or cfg.cache else "; try --cache"
        print(
            f"the input pipeline {verdict} feed the fastest training mode ({fastest['mode']}, "
            f"{fastest['images_per_sec']:.0f} images/s): best {best['images_per_sec']:.0f} images/s {source}{advice}"
        )
        atomic_write_json(os.path.join(run_dir, "benchmark_data.json"), pipeline)
    return 0
