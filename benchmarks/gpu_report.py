"""The GPU check, as one script: `main.py --benchmark` at batch 256, 256 px (FP32 / AMP fp16 /
AMP bf16, NCHW and channels_last), then timed training epochs with AMP over an Intel-sized
generated dataset (14,000 training JPEGs of 150x150, 6 classes) without and with --cache, then
benchmarks/sync_check.py (does a training step make the host wait for the GPU?). Prints a
markdown report with the targets checked, and writes it to --out.

    python benchmarks/gpu_report.py --out docs/gpu_report.md        # on a GPU machine (~5 min)
    python benchmarks/gpu_report.py --device cpu --batch_size 8 --image_size 32 --images 60 --workers 0
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sync_check import CASES, check_all, report_lines  # noqa: E402

from demo import make_demo_dataset  # noqa: E402

VAL_FRACTION = 0.2


def run_main_py(flags):
    """`python main.py flags` in a fresh process (each run starts with clean CUDA memory stats)."""
    command = [sys.executable, os.path.join(ROOT, "main.py"), *flags]
    print("$", " ".join(command[1:]), flush=True)
    if subprocess.run(command).returncode:  # main.py said why on stderr: no traceback of this script's
        sys.exit("gpu_report.py: stopped: main.py failed (its error is above)")


def main(argv=None, run=run_main_py):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument(
        "--model",
        default="resnet18",
        help="main.py's --model for the benchmark and the runs (sync_check.py times its own ResNet-18)",
    )
    p.add_argument("--images", type=int, default=14000, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run (the first includes warm-up)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--benchmark_steps", type=int, default=10)
    p.add_argument("--workdir", default=None, help="where the generated data and runs go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="amp_gpu_report_")

    def main_py(*flags):
        run([str(f) for f in flags])
        return " ".join(["python main.py", *map(str, flags)])

    checkpoints = os.path.join(workdir, "checkpoints")
    common = [
        "--device",
        args.device,
        "--batch_size",
        args.batch_size,
        "--image_size",
        args.image_size,
        "--model",
        args.model,
        "--checkpoint_dir",
        checkpoints,
    ]
    commands = [
        main_py("--benchmark", *common, "--checkpoint_name", "benchmark", "--benchmark_steps", args.benchmark_steps)
    ]
    with open(os.path.join(checkpoints, "benchmark", "benchmark.json")) as f:
        rows = json.load(f)["rows"]

    # The training split is (1 - VAL_FRACTION) of seg_train: generate enough for --images of it.
    per_class = round(args.images / (1 - VAL_FRACTION) / 6)
    data = os.path.join(workdir, "intel_sized")
    started = time.perf_counter()
    make_demo_dataset(data, train_per_class=per_class, test_per_class=max(per_class // 5, 2), size=150)
    print(f"generated {6 * per_class} training JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
    runs = {}
    for name, extra in (("amp", []), ("amp_cache", ["--cache"])):
        commands.append(
            main_py(
                "--data_dir",
                data,
                *common,
                "--checkpoint_name",
                name,
                "--amp",
                "--no_pretrained",
                "--epochs",
                args.epochs,
                "--num_workers",
                args.workers,
                "--no_progress",
                "--overwrite",
                *extra,
            )
        )
        with open(os.path.join(checkpoints, name, "results.json")) as f:
            runs[name] = json.load(f)

    syncs = {}  # (on a CPU nothing waits for a GPU: nothing to check there)
    if args.device.startswith("cuda"):
        print("$ benchmarks/sync_check.py (in this process)", flush=True)
        syncs = check_all(args.device)
        commands.append("python benchmarks/sync_check.py")
    report = make_report(args, argv, rows, runs, commands, syncs)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return report


def make_report(args, argv, rows, runs, commands, syncs):
    device = next(iter(runs.values()))["device"]
    lines = [
        f"## {device}: {args.model}, batch {args.batch_size}, {args.image_size} px",
        "",
        "| mode | memory format | images/s | ms/step | peak memory (MB) | speedup vs FP32 NCHW |",
        "|---|---|---|---|---|---|",
    ]
    base = next(r for r in rows if r["mode"] == "fp32" and not r["channels_last"])
    for r in rows:
        memory = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(
            f"| {r['mode']} | {'channels_last' if r['channels_last'] else 'NCHW'} | "
            f"{r['images_per_sec']:.0f} | {r['ms_per_step']:.1f} | {memory} | "
            f"{r['images_per_sec'] / base['images_per_sec']:.2f}x |"
        )
    lines += [
        "",
        "| run | epoch | images | seconds | images/s | peak memory (MB) | steady-state peak (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    megabytes = lambda mb: "n/a" if mb is None else f"{mb:.0f}"  # noqa: E731
    for name, results in runs.items():
        for e in results["epochs"]:
            images = round(e["images_per_sec"] * e["seconds"])
            lines.append(
                f"| {name} | {e['epoch']} | {images} | {e['seconds']:.2f} | {e['images_per_sec']:.0f} | "
                f"{megabytes(e['peak_mem_mb'])} | {megabytes(e.get('steady_peak_mem_mb'))} |"
            )
    lines += [
        "",
        "The benchmark's peak memory is one step's after 3 warm-up steps; an epoch's peak memory includes "
        "cuDNN's autotuning in a run's first epoch, its steady-state peak (epochs after the first) does not.",
    ]

    fp32 = max((r for r in rows if r["mode"] == "fp32"), key=lambda r: r["images_per_sec"])
    amp = max((r for r in rows if r["mode"] != "fp32"), key=lambda r: r["images_per_sec"], default=None)
    best_epoch = min(e["seconds"] for results in runs.values() for e in results["epochs"])
    lines += ["", "Targets:"]
    if amp is not None:
        lines.append(
            f"- AMP ({amp['mode']}) at least 2x FP32 images/s: {amp['images_per_sec'] / fp32['images_per_sec']:.2f}x"
        )
        if amp["peak_mem_mb"] and fp32["peak_mem_mb"]:
            lines.append(
                f"- at least 40% less peak memory: {100 * (1 - amp['peak_mem_mb'] / fp32['peak_mem_mb']):.0f}% less"
            )
    lines.append(f"- an epoch of {args.images} images in at most 3 s with AMP: fastest epoch {best_epoch:.2f} s")
    lines += [
        "",
        f"Host syncs in the training loop (benchmarks/sync_check.py: {', '.join(CASES)}; 20 Trainer steps "
        'each under torch.cuda.set_sync_debug_mode("error") after 20 unchecked, the --log_interval reads '
        "allowed):",
        *report_lines(syncs, args.device),
    ]
    lines += [
        "",
        "Commands:",
        "",
        "```",
        f"python benchmarks/gpu_report.py {' '.join(argv)}".rstrip(),
        *commands,
        "```",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
