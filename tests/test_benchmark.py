"""--benchmark and the fast paths: a well-formed benchmark.json, and channels_last, --cache and
the device-side transforms change speed only, never the numbers."""

import json
import os
import sys
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, ROOT, SMALL_MODEL, assert_user_error, read_results
from torchvision.models import resnet18

import benchmark
import machine
import main as main_module
from dataset import build_loaders
from hardware import describe, device_name
from outputs import MEASUREMENT_KEYS

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

ROW_KEYS = {"mode", "channels_last", "images_per_sec", "ms_per_step", "peak_mem_mb"}
SMALL_BENCHMARK = [
    "--benchmark",
    "--device",
    "cpu",
    "--batch_size",
    "2",
    "--image_size",
    "32",
    "--benchmark_steps",
    "1",
    "--num_workers",
    "0",
    "--checkpoint_name",
    "bench",
    *SMALL_MODEL,
]


def test_benchmark_writes_a_well_formed_table(run_cli, demo_data, tmp_path):
    code, out, err = run_cli(*SMALL_BENCHMARK, "--data", "--data_dir", demo_data, "--optimizer", "radam")
    assert code == 0, err
    # The header says what a timed step holds: what a training step does, the meter included.
    assert (
        "shufflenet_v2_x0_5 training steps (radam)" in out
        and "the loss/accuracy meter and the step-health counts" in out
    )
    record = json.loads((tmp_path / "checkpoints" / "bench" / "benchmark.json").read_text())
    rows = record.pop("rows")
    # How it was timed: every row on the same threads, and how busy the machine was meanwhile.
    assert record.pop("threads") == torch.get_num_threads() and record.pop("openmp_wait") == machine.wait_policy()
    assert f"every row on {torch.get_num_threads()} thread" in out
    load = {key: record.pop(key) for key in ("load_before", "load_after", "cpus", "other_cpus")}
    assert load["cpus"] == len(os.sched_getaffinity(0)) and load["other_cpus"] >= 0
    assert record == {
        "device": device_name("cpu"),
        "device_capability": describe("cpu").capability,
        "torch": torch.__version__,
        "fp32_math": "ieee",
        "model": "shufflenet_v2_x0_5",
        "optimizer": "radam",
        "batch_size": 2,
        "image_size": 32,
        "benchmark_steps": 1,
    }
    assert [(r["mode"], r["channels_last"]) for r in rows] == [
        ("fp32", False),
        ("fp32", True),
        ("amp_bfloat16", False),
        ("amp_bfloat16", True),
    ]  # no float16 on a CPU
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["images_per_sec"] > 0 and r["ms_per_step"] > 0 and r["peak_mem_mb"] is None
        assert r["images_per_sec"] == pytest.approx(2 / (r["ms_per_step"] / 1000))
    assert "| fp32 | NCHW |" in out and "1.00x" in out
    assert "feed the fastest training mode" in out  # the --data verdict
    pipeline = json.loads((tmp_path / "checkpoints" / "bench" / "benchmark_data.json").read_text())
    assert {p["workers"] for p in pipeline} >= {0}


def test_benchmark_data_checks_the_dataset_before_timing(run_cli, tmp_path):
    code, out, err = run_cli(*SMALL_BENCHMARK, "--data", "--data_dir", tmp_path / "missing")
    assert_user_error((code, out, err), "does not exist", "missing")
    assert "| fp32 |" not in out  # failed before the first timed step, not after them all
    assert not (tmp_path / "checkpoints" / "bench").exists()


def test_input_pipeline_counts_only_the_images_it_timed(monkeypatch):
    clock = SimpleNamespace(now=0.0)

    def loader():  # batches of 4 images, one (fake) second apart
        for _ in range(10):
            clock.now += 1.0
            yield torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)

    monkeypatch.setattr(benchmark, "make_loader", lambda *args, **kwargs: loader())
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    cfg = Namespace(num_workers=0, cache=False, seed=0, batch_size=4)
    results = benchmark.time_input_pipeline(cfg, list(range(40)), batches=3)
    # The clock starts as the first batch arrives: 3 batches of 4 images in 3 s.
    assert [r["images_per_sec"] for r in results] == [4.0] * len(results) and results


def test_benchmark_on_the_cpu_is_sized_for_a_cpu_unless_told():
    import config

    cfg, _ = config.parse_config(["--benchmark", "--device", "cpu"])
    assert (cfg.batch_size, cfg.image_size) == (32, 128)  # a minute, not the ~15 of batch 256 at 256 px
    cfg, _ = config.parse_config(["--benchmark", "--device", "cpu", "--batch_size", "8"])
    assert (cfg.batch_size, cfg.image_size) == (8, 128)
    cfg, _ = config.parse_config(["--device", "cpu"])  # training keeps the reference's defaults
    assert (cfg.batch_size, cfg.image_size) == (256, 256)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_cache_gives_the_same_batches(demo_data):
    cfg = dict(
        data_dir=demo_data, image_size=24, val_fraction=0.2, seed=3, batch_size=8, num_workers=0, skip_bad_images=False
    )
    plain = build_loaders(Namespace(**cfg, cache=False), "cpu")
    cached = build_loaders(Namespace(**cfg, cache=True), "cpu")
    assert plain[3] == cached[3]
    for a, b in zip(plain[:3], cached[:3]):
        a.sampler.set_epoch(1)
        b.sampler.set_epoch(1)
        batches_a, batches_b = list(a), list(b)
        assert len(batches_a) == len(batches_b) > 0
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_cached_training_equals_plain_training(run_cli, demo_data, tmp_path):
    flags = ["--data_dir", demo_data, "--epochs", "2", *FAST, *SMALL_MODEL, "--deterministic"]
    assert run_cli(*flags, "--checkpoint_name", "plain")[0] == 0
    code, out, err = run_cli(*flags, "--checkpoint_name", "cached", "--cache")
    assert code == 0, err
    assert "--cache: 48 train, 12 val and 24 test images decoded" in out

    def strip(r):
        return [{k: v for k, v in e.items() if k not in MEASUREMENT_KEYS} for e in r["epochs"]]

    plain, cached = read_results(tmp_path / "checkpoints" / "plain"), read_results(tmp_path / "checkpoints" / "cached")
    assert strip(plain) == strip(cached) and plain["test_acc"] == cached["test_acc"]


def test_overhead_script_runs_small():
    import overhead

    ratio = overhead.main(["--steps", "2", "--rounds", "1", "--batch_size", "2", "--image_size", "32"])
    assert ratio > 0


def test_ema_cost_script_times_both_trainers_in_turn_and_the_update():
    import ema_cost

    seconds, update = ema_cost.main(["--steps", "2", "--rounds", "2", "--batch_size", "2", "--image_size", "32"])
    assert set(seconds) == {"plain", "ema"} and all(len(v) == 2 and min(v) > 0 for v in seconds.values())
    assert update > 0


def test_gpu_report_script_runs_on_the_cpu(tmp_path):
    import gpu_report

    def run_in_process(flags):  # saves the start-up of three interpreters; the subprocess is one line
        assert main_module.main(flags) == 0

    report = gpu_report.main(
        [
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--image_size",
            "32",
            "--images",
            "48",
            *SMALL_MODEL,
            "--workers",
            "0",
            "--benchmark_steps",
            "1",
            "--epochs",
            "1",
            "--workdir",
            str(tmp_path),
            "--out",
            str(tmp_path / "report.md"),
        ],
        run=run_in_process,
    )
    assert "shufflenet_v2_x0_5, batch 4, 32 px" in report  # the header names what was timed
    assert "| amp_bfloat16 | channels_last |" in report and "| amp_cache | 1 | 48 |" in report
    assert "an epoch of 48 images in at most 3 s" in report
    assert (tmp_path / "report.md").read_text().strip() == report.strip()
