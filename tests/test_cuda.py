"""The CUDA paths (float16 + GradScaler, bfloat16, peak memory): run only where a GPU exists."""
import pytest
import torch

from conftest import FAST, read_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = [f if f != "cpu" else "cuda" for f in FAST]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_on_cuda_learns_and_reports_memory(demo_data, run_cli, tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    code, _, err = run_cli("--data_dir", demo_data, "--checkpoint_name", dtype, "--epochs", "4", *CUDA,
                           "--amp", "--amp_dtype", dtype)
    assert code == 0, err
    results = read_results(tmp_path / "checkpoints" / dtype)
    assert results["amp_dtype"] == dtype
    assert all(e["peak_mem_mb"] > 0 for e in results["epochs"])
    assert results["epochs"][-1]["train_loss"] < results["epochs"][0]["train_loss"]
    ckpt = torch.load(tmp_path / "checkpoints" / dtype / "last.pt", weights_only=True)
    assert ckpt["scaler"] if dtype == "float16" else ckpt["scaler"] == {}  # the scaler's state is saved
