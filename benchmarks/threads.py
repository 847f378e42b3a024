"""Whether main.py's default threads fit this machine, quiet and busy: the real `python main.py
--demo` run a few ways (PyTorch threads x data-loading workers x OpenMP wait policy), each on a
quiet machine and beside one competing busy process (`python -c "while True: pass"`), reporting
the last epoch's training images/s (results.json's; the first epoch warms up) against the best
setting of each column. The defaults pass when they reach --target (90%) of the best, in both.

    python benchmarks/threads.py                      # ResNet-18, 64 px, batch 32, 2 epochs
    python benchmarks/threads.py --model shufflenet_v2_x0_5 --image_size 32 --quick   # a smoke run

Each run records the load average before and after its epochs: a quiet column measured while
other programs ran is not quiet (the table says so)."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]
# OpenMP settings a user may have: cleared so each row's own apply (and "default" means ours).
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def settings(cores, quick):
    """(name, environment additions, --num_workers or None for the default) of each row; the
    first is main.py's defaults."""
    default_workers = min(8, cores)
    rows = [("default", {}, None)]
    threads = [1, cores] if cores > 1 else [1]
    workers = sorted({0, default_workers} if quick else {0, max(1, default_workers // 2), default_workers})
    for t in threads:
        for w in workers:
            for policy in ("ACTIVE", "PASSIVE"):
                rows.append(
                    (
                        f"{t} thread(s), {w} worker(s), {policy.lower()}",
                        {"OMP_NUM_THREADS": str(t), "OMP_WAIT_POLICY": policy},
                        w,
                    )
                )
    return rows


def run_once(args, folder, name, env_extra, workers):
    """The last epoch's images/s of one main.py run, and its load averages."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(env_extra)
    command = [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--demo",
        "--data_dir",
        os.path.join(folder, "demo"),
        "--checkpoint_dir",
        folder,
        "--checkpoint_name",
        name,
        "--model",
        args.model,
        "--image_size",
        str(args.image_size),
        "--batch_size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--no_progress",
        *(["--num_workers", str(workers)] if workers is not None else []),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(folder, name, "results.json")) as f:
        last = json.load(f)["epochs"][-1]
    shutil.rmtree(os.path.join(folder, name))  # (a ResNet-18 run folder is ~270 MB)
    return last


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.9, help="the share of the best the defaults must reach")
    parser.add_argument("--quick", action="store_true", help="fewer rows: threads 1 or all, workers 0 or the default")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = settings(cores, args.quick)
    results = {}
    folder = tempfile.mkdtemp(prefix="threads-")
    try:
        for load in ("quiet", "busy"):
            competitor = subprocess.Popen(BUSY_LOOP) if load == "busy" else None
            try:
                for k, (name, env, workers) in enumerate(rows):
                    results[name, load] = run_once(args, folder, f"row{k}", env, workers)
                    print(f"  {load}: {name}: {results[name, load]['images_per_sec']:.1f} img/s", flush=True)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(args, cores, rows, results)


def print_table(args, cores, rows, results):
    best = {load: max(results[name, load]["images_per_sec"] for name, _, _ in rows) for load in ("quiet", "busy")}
    print(
        f"\n{args.model}, {args.image_size} px, batch {args.batch_size}, epoch {args.epochs}'s training images/s "
        f"(python main.py --demo), on {cores} cores; busy: beside one `while True: pass` process\n"
    )
    print("| setting | quiet img/s | of best | busy img/s | of best | load average (quiet; busy) |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in rows:
        cells = [name]
        for load in ("quiet", "busy"):
            rate = results[name, load]["images_per_sec"]
            cells += [f"{rate:.1f}", f"{100 * rate / best[load]:.0f}%"]
        loads = "; ".join(
            f"{results[name, load]['load_before']} to {results[name, load]['load_after']}" for load in ("quiet", "busy")
        )
        print("| " + " | ".join([*cells, loads]) + " |")
    verdicts = [
        f"{load} {100 * results['default', load]['images_per_sec'] / best[load]:.0f}% of the best" for load in best
    ]
    passed = all(results["default", load]["images_per_sec"] >= args.target * best[load] for load in best)
    print(
        f"\nthe defaults reach {' and '.join(verdicts)}: {'pass' if passed else 'FAIL'} "
        f"(target {100 * args.target:.0f}%). A quiet column whose load average exceeded {cores} before its "
        "runs was not measured on a quiet machine."
    )


if __name__ == "__main__":
    main()
