"""--benchmark: what AMP buys on this machine. Times training steps of the configured model in
FP32 and AMP, NCHW and channels_last, on synthetic data; with --data, the input pipeline too."""
import argparse
import os
import statistics
import time

import torch

from dataset import DeviceTransform, EpochSampler, build_datasets, cache_dataset, make_loader
from model import build_model
from trainer import AmpUpdate, autocast_for, build_optimizer, training_step
from utils import Stopwatch, atomic_write_json, device_name, peak_memory_mb, reset_peak_memory

WARMUP_STEPS = 3
NUM_CLASSES = 6
MODES = {"fp32": None, "amp_float16": "float16", "amp_bfloat16": "bfloat16"}  # mode -> autocast dtype


def supported_modes(device):
    """float16 autocast is a CUDA recipe; bfloat16 needs a CPU or a GPU that has it."""
    device = torch.device(device)
    modes = ["fp32"]
    if device.type == "cuda":
        modes.append("amp_float16")
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        modes.append("amp_bfloat16")
    return modes


def time_training_steps(cfg, mode, channels_last, steps, compile_model=False):
    """Median time of `steps` training steps (after WARMUP_STEPS) on one synthetic batch:
    the same transform, autocast, loss and AmpUpdate as the Trainer, the device synchronized."""
    device = torch.device(cfg.device)
    dtype = MODES[mode]
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(NUM_CLASSES, pretrained=False).to(device, memory_format=memory_format)
    step_model = torch.compile(model) if compile_model else model
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    update = AmpUpdate(optimizer, scaler)
    transform = DeviceTransform(device, channels_last)
    autocast = autocast_for(argparse.Namespace(device=cfg.device, amp=dtype is not None, amp_dtype=dtype or "float32"))
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    targets = torch.randint(0, NUM_CLASSES, (cfg.batch_size,))
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    model.train()
    times = []
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            reset_peak_memory(device)  # the steady state, not the warm-up's allocations
        watch = Stopwatch(device)
        x = transform(images, flip_seed=i)
        training_step(step_model, x, targets.to(device, non_blocking=True), autocast, update)
        seconds = watch.stop()
        if i >= WARMUP_STEPS:
            times.append(seconds)
    seconds = statistics.median(times)
    return {
        "mode": mode,
        "channels_last": channels_last,
        "compiled": compile_model,
        "images_per_sec": cfg.batch_size / seconds,
        "ms_per_step": 1000 * seconds,
        "peak_mem_mb": peak_memory_mb(device),
    }


def format_table(rows):
    base = next((r for r in rows if r["mode"] == "fp32" and not r["channels_last"] and not r["compiled"]), rows[0])
    lines = ["| mode | memory format | images/s | ms/step | peak memory | speedup vs FP32 NCHW |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        memory = "n/a (CPU)" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} MB"
        fmt = "channels_last" if r["channels_last"] else "NCHW"
        mode = r["mode"] + (" + compile" if r["compiled"] else "")
        lines.append(f"| {mode} | {fmt} | {r['images_per_sec']:.1f} | {r['ms_per_step']:.1f} | {memory} | "
                     f"{r['images_per_sec'] / base['images_per_sec']:.2f}x |")
    return "\n".join(lines)


def time_input_pipeline(cfg, batches=20):
    """Images/s the training loader delivers (decode + resize in workers), per worker count."""
    train_set = build_datasets(cfg)[0]
    counts = sorted({w for w in (0, 1, 2, 4, 8) if w <= (os.cpu_count() or 1)} | {cfg.num_workers})
    results = []
    sources = [(w, train_set) for w in counts]
    if cfg.cache:
        sources.append(("cache", cache_dataset(train_set, cfg.num_workers)))
    for workers, dataset in sources:
        run_cfg = argparse.Namespace(**{**vars(cfg), "num_workers": workers if workers != "cache" else 0})
        sampler = EpochSampler(len(dataset), True, cfg.seed)
        loader = make_loader(dataset, sampler, cfg.batch_size, run_cfg, "cpu")
        n, start = 0, None
        for i, (images, _) in enumerate(loader):
            if i == 1:  # after the workers' start-up
                start, n = time.perf_counter(), 0
            n += len(images)
            if i == batches:
                break
        seconds = time.perf_counter() - start if start else float("nan")
        results.append({"workers": workers, "images_per_sec": n / seconds if seconds else 0.0})
        del loader
    return results


def run(cfg):
    """Print and save the benchmark table (and the input pipeline's, with --data)."""
    modes = supported_modes(cfg.device)
    print(f"benchmark: ResNet-18 training steps, batch {cfg.batch_size}, {cfg.image_size}x{cfg.image_size} px, "
          f"on {device_name(cfg.device)}; median of {cfg.benchmark_steps} steps after {WARMUP_STEPS} warm-up steps",
          flush=True)
    rows = []
    for mode in modes:
        for channels_last in (False, True):
            rows.append(time_training_steps(cfg, mode, channels_last, cfg.benchmark_steps))
            if cfg.compile:
                rows.append(time_training_steps(cfg, mode, channels_last, cfg.benchmark_steps, compile_model=True))
            print(f"  {mode:13s} {'channels_last' if channels_last else 'NCHW':13s} "
                  f"{rows[-1]['images_per_sec']:8.1f} images/s", flush=True)
    print(format_table(rows))
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(os.path.join(run_dir, "benchmark.json"), rows)
    print(f"wrote {os.path.join(run_dir, 'benchmark.json')}")
    if cfg.data:
        fastest = max(rows, key=lambda r: r["images_per_sec"])
        pipeline = time_input_pipeline(cfg)
        print("\n| data loading workers | images/s |\n|---|---|")
        for p in pipeline:
            print(f"| {p['workers']} | {p['images_per_sec']:.0f} |")
        best = max(pipeline, key=lambda p: p["images_per_sec"])
        verdict = "can" if best["images_per_sec"] >= fastest["images_per_sec"] else "cannot"
        source = "from --cache" if best["workers"] == "cache" else f"with {best['workers']} workers"
        advice = "" if verdict == "can" or cfg.cache else "; try --cache"
        print(f"the input pipeline {verdict} feed the fastest training mode ({fastest['mode']}, "
              f"{fastest['images_per_sec']:.0f} images/s): best {best['images_per_sec']:.0f} images/s {source}{advice}")
        atomic_write_json(os.path.join(run_dir, "benchmark_data.json"), pipeline)
    return 0

