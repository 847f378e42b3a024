"""The CUDA paths (float16 + GradScaler, bfloat16, peak memory, a loop that never waits for the
GPU): run only where a GPU exists."""

import os
import sys

import pytest
import torch
from conftest import FAST, ROOT, read_results

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = [f if f != "cpu" else "cuda" for f in FAST]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_on_cuda_learns_and_reports_memory(demo_data, run_cli, tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    code, _, err = run_cli(
        "--data_dir", demo_data, "--checkpoint_name", dtype, "--epochs", "4", *CUDA, "--amp", "--amp_dtype", dtype
    )
    assert code == 0, err
    results = read_results(tmp_path / "checkpoints" / dtype)
    assert results["amp_dtype"] == dtype
    assert all(e["peak_mem_mb"] > 0 for e in results["epochs"])
    # The first epoch's autotuning is left out of the steady-state peak, which later epochs have.
    assert results["epochs"][0]["steady_peak_mem_mb"] is None
    assert all(0 < e["steady_peak_mem_mb"] <= e["peak_mem_mb"] for e in results["epochs"][1:])
    assert results["epochs"][-1]["train_loss"] < results["epochs"][0]["train_loss"]
    ckpt = torch.load(tmp_path / "checkpoints" / dtype / "last.pt", weights_only=True)
    assert ckpt["scaler"] if dtype == "float16" else ckpt["scaler"] == {}  # the scaler's state is saved


@pytest.mark.parametrize("case", ["fp32", "amp_float16", "ema", "mixup", "radam_float16"])
def test_training_steps_never_wait_for_the_gpu_outside_the_log_interval_reads(case):
    # 20 optimizer steps of the real Trainer under torch.cuda.set_sync_debug_mode("error") (after 20
    # unchecked warm-up steps); Trainer.log_progress, the --log_interval reads, is let through.
    import sync_check

    result = sync_check.check_all("cuda", cases=[case], steps=20, log_interval=10)[case]
    if result["expected_sync"]:  # radam + float16: GradScaler's .item(), documented (step.HOST_SYNC_OPTIMIZERS)
        # (it raises at the first checked step, so no step or read is counted after it)
        assert result["sync"] is not None and "scaler.step" in result["sync"], result
    else:
        assert result["sync"] is None, f"{case}: the host waited for the GPU at {result['sync']}"
        assert result["steps"] == 20 and result["log_reads"] == 2


def test_flip_mask_is_pinned_for_its_asynchronous_copy():
    from dataset import flip_mask

    mask = flip_mask(8, 3, "cuda")
    assert mask.is_pinned() and torch.equal(mask, flip_mask(8, 3, "cpu"))  # the same images flipped
