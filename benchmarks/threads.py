"""Whether main.py's default threads fit this machine, quiet and busy: the real `python main.py
--demo` run a few ways (PyTorch threads x data-loading workers x OpenMP wait policy), each on a
quiet machine and beside one competing busy process (`python -c "while True: pass"`), reporting
the training images/s of the epochs after the first (results.json's; the first warms up) against
the best setting of each column. The defaults pass when they reach --target (90%) of the best, in
both. The "active" and "passive" rows set OMP_WAIT_POLICY (ACTIVE: spin until there is work;
PASSIVE: sleep at once); the default sets none (libgomp then spins a moment, then sleeps), so its
wait policy is none of the rows'. Every run trains on the CPU (--device cpu), a GPU machine's too.

One run is too noisy for a 10% margin (identical settings differed by a third), so each setting
runs --repeats times, interleaved: round r runs every setting once, quiet then busy, in an order
rotated by r (so no setting always runs first or right after the competitor starts). The table
gives each setting's median and range; the verdict compares medians.

    python benchmarks/threads.py                      # ResNet-18, 64 px, batch 32, 3 epochs, 3 rounds
    python benchmarks/threads.py --quick              # fewer rows: threads 1 or all, workers 0 or all the cores
    python benchmarks/threads.py --model shufflenet_v2_x0_5 --image_size 32 --quick --repeats 1   # a smoke run

Each run records how many cores other programs kept busy (other_cpus): a quiet column measured
while other programs ran is not quiet (the verdict says so)."""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo import make_demo_dataset  # noqa: E402
from machine import usable_cpus, was_busy  # noqa: E402

# What each run gives: results.json's epochs' keys, over the epochs after the first.
RUN_KEYS = ("images_per_sec", "other_cpus", "threads")
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
    """One main.py run's training images/s over the epochs after the first, how many cores other
    programs kept busy meanwhile and with how many threads it trained (both time-weighted)."""
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
        "--device",
        "cpu",  # (the CPU's threads are the question, on a GPU machine too)
        *(["--num_workers", str(workers)] if workers is not None else []),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(folder, name, "results.json")) as f:
        steady = json.load(f)["epochs"][1:]
    shutil.rmtree(os.path.join(folder, name))  # (a ResNet-18 run folder is ~270 MB)
    seconds = sum(e["seconds"] for e in steady)
    # (Time-weighted: images/s so is all the images over all the seconds.)
    return {key: sum((e[key] or 0) * e["seconds"] for e in steady) / seconds for key in RUN_KEYS}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: the first is left out")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting, quiet and busy (medians)")
    parser.add_argument("--target", type=float, default=0.9, help="the share of the best the defaults must reach")
    parser.add_argument("--quick", action="store_true", help="fewer rows: threads 1 or all, workers 0 or all the cores")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first is left out), got {args.epochs}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    cores = len(usable_cpus())
    rows = settings(cores, args.quick)
    results = {(name, load): [] for name, _, _ in rows for load in LOADS}
    folder = tempfile.mkdtemp(prefix="threads-")
    try:
        make_demo_dataset(os.path.join(folder, "demo"))  # once, before anything is timed
        for r in range(args.repeats):
            order = rows[r % len(rows) :] + rows[: r % len(rows)]
            for load in LOADS:
                competitor = subprocess.Popen(BUSY_LOOP) if load == "busy" else None
                try:
                    for name, env, workers in order:
                        result = run_once(args, folder, "run", env, workers)
                        results[name, load].append(result)
                        print(
                            f"  round {r + 1}, {load}: {name}: {result['images_per_sec']:.1f} img/s "
                            f"({result['threads']:.1f} threads; other programs {result['other_cpus']:.2f} cores)",
                            flush=True,
                        )
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(args, cores, rows, results)


LOADS = ("quiet", "busy")


def median(runs, key="images_per_sec"):
    return statistics.median(run[key] for run in runs)


def print_table(args, cores, rows, results):
    best = {load: max(median(results[name, load]) for name, _, _ in rows) for load in LOADS}
    print(
        f"\n{args.model}, {args.image_size} px, batch {args.batch_size}: training images/s of "
        f"{'epoch 2' if args.epochs == 2 else f'epochs 2-{args.epochs}'} "
        f"(python main.py --demo), median of {args.repeats} interleaved runs [range], on {cores} cores; "
        "busy: beside one `while True: pass` process\n"
    )
    print(
        "| setting | quiet img/s | of best | busy img/s | of best | threads (quiet; busy) | other programs' cores (quiet; busy) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _, _ in rows:
        cells = [name]
        for load in LOADS:
            runs = results[name, load]
            rates = [run["images_per_sec"] for run in runs]
            spread = f" [{min(rates):.0f}-{max(rates):.0f}]" if len(runs) > 1 else ""
            cells += [f"{median(runs):.1f}{spread}", f"{100 * median(runs) / best[load]:.0f}%"]
        cells.append("; ".join(f"{median(results[name, load], 'threads'):.1f}" for load in LOADS))
        cells.append("; ".join(f"{median(results[name, load], 'other_cpus'):.2f}" for load in LOADS))
        print("| " + " | ".join(cells) + " |")
    shares = {load: median(results["default", load]) / best[load] for load in LOADS}
    verdicts = [f"{load} {100 * share:.0f}% of the best" for load, share in shares.items()]
    passed = all(share >= args.target for share in shares.values())
    # A "quiet" run beside other programs (as the epoch lines' busy notes judge them) was not quiet.
    noisy = [run["other_cpus"] for name, _, _ in rows for run in results[name, "quiet"] if was_busy(run)]
    print(
        f"\nthe defaults reach {' and '.join(verdicts)} (medians): {'pass' if passed else 'FAIL'} "
        f"(target {100 * args.target:.0f}%)."
        + (
            f" But {len(noisy)} of the quiet column's runs had other programs on {min(noisy):.2f}-{max(noisy):.2f} "
            "cores: it was not measured on a quiet machine; run it again when nothing else runs."
            if noisy
            else ""
        )
    )


if __name__ == "__main__":
    main()
