"""What the device computes natively (hardware.py): the answer from faked CPU levels, flags and
GPUs both ways; the environment variables that imitate an AVX2-only CPU; and the one warning line
--amp and --demo --amp print early where the AMP dtype is emulated (none where it is native)."""

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from conftest import FAST, ROOT, SMALL_MODEL

import hardware
from demo import make_demo_dataset
from step import precision_name

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}
COOPER_LAKE = {"avx2", "avx512f", "avx512_bf16"}
ZEN3 = {"avx2", "fma"}  # no AVX-512 at all


def fake_cpu(monkeypatch, aten, flags, onednn=None, machine="x86_64"):
    """Make hardware.py see a CPU with ATen level `aten` and instruction `flags` (None: unreadable)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    if onednn is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)


@pytest.mark.parametrize(
    "aten,flags,onednn,bf16,fp16",
    [
        ("AVX512", SAPPHIRE_RAPIDS, None, True, True),
        ("AVX512", COOPER_LAKE, None, True, False),
        ("AVX2", ZEN3, None, False, False),
        ("AVX2", SAPPHIRE_RAPIDS, None, False, False),  # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU
        ("AVX512", SAPPHIRE_RAPIDS, "AVX2", False, False),  # oneDNN's convolutions limited to AVX2
        ("AVX512", SAPPHIRE_RAPIDS, "AVX512_CORE_BF16", True, False),
        ("AVX512", None, None, None, None),  # no flags to read: unknown, so no warning
    ],
)
def test_cpu_native_answers(monkeypatch, aten, flags, onednn, bf16, fp16):
    fake_cpu(monkeypatch, aten, flags, onednn)
    assert hardware.describe("cpu", "bfloat16").native is bf16
    assert hardware.describe("cpu", "float16").native is fp16
    assert hardware.describe("cpu").native is None  # FP32: no AMP dtype to ask about
    assert hardware.describe("cpu").capability.startswith(f"{aten} (")
    assert bool(hardware.emulation_warning("cpu", "bfloat16")) is (bf16 is False)


def test_the_capability_says_why_instructions_go_unused(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", SAPPHIRE_RAPIDS, "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert hardware.describe("cpu").capability == (
        "AVX2 (avx512_bf16, amx_bf16, avx512_fp16 unused: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2)"
    )
    fake_cpu(monkeypatch, "AVX2", ZEN3)
    assert hardware.describe("cpu").capability == "AVX2 (no bf16/fp16 instructions)"
    fake_cpu(monkeypatch, "DEFAULT", {"fp", "asimd", "asimdhp", "bf16"}, machine="aarch64")  # ARM's BF16 extension
    assert hardware.describe("cpu", "bfloat16").native and hardware.describe("cpu", "float16").native


def test_float16_on_a_cpu_with_native_bfloat16_points_to_it(monkeypatch):
    fake_cpu(monkeypatch, "AVX512", COOPER_LAKE)
    warning = hardware.emulation_warning("cpu", "float16")
    assert warning.startswith("warning: float16 is emulated on this CPU") and "use --amp alone" in warning


@pytest.mark.parametrize("capability,bf16,fp16", [((6, 1), False, False), ((7, 5), False, True), ((8, 0), True, True)])
def test_cuda_native_answers_from_the_compute_capability(monkeypatch, capability, bf16, fp16):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert hardware.describe("cuda:0", "bfloat16") == hardware.Capability(
        "Some GPU", f"compute capability {capability[0]}.{capability[1]}", "bfloat16", bf16
    )
    assert hardware.describe("cuda:0", "float16").native is fp16
    warning = hardware.emulation_warning("cuda:0", "float16")
    assert ("no float16 tensor cores" in warning) is (not fp16)


ZEN4_FLAGS = "{'avx2', 'avx512f', 'avx512_bw', 'avx512_bf16'}"  # (this CPU: AVX512-BF16, no AMX or FP16)


@pytest.mark.parametrize(
    "env,native,unused",
    [
        (
            {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
            False,
            "ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2",
        ),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False, "ONEDNN_MAX_CPU_ISA=AVX2"),
    ],
)
def test_avx2_imitation_is_seen_as_emulated(env, native, unused):
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, as the README's slow-machine timings use:
    whatever this CPU has, torch's kernels then emulate bfloat16. The CPU is mocked as one with
    AVX512-BF16 (in a fresh process, where torch reads ATEN_CPU_CAPABILITY for real), so an AVX2-only
    host cannot pass this by having no bf16 instructions: the variables must be what says emulated."""
    code = (
        f"import hardware; hardware.cpu_flags = lambda: {ZEN4_FLAGS}; "
        "c = hardware.describe('cpu', 'bfloat16'); print(c.native, c.capability)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{native} ") and done.stdout.rstrip().endswith(f"(avx512_bf16 unused: {unused})")
    if "ATEN_CPU_CAPABILITY" in env:
        assert done.stdout.split()[1] == "AVX2"  # torch's kernels, lowered by the variable


GRAVITON3 = {"fp", "asimd", "fphp", "asimdhp", "asimddp", "sve", "svebf16", "i8mm", "bf16"}  # its Features line


@pytest.mark.parametrize(
    "device,fake,bf16,fp16",
    [
        ("cpu", ("AVX512", SAPPHIRE_RAPIDS, None), True, True),
        ("cpu", ("AVX512", COOPER_LAKE, None), True, False),
        ("cpu", ("AVX2", SAPPHIRE_RAPIDS, None), False, False),  # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU
        ("cpu", ("AVX512", SAPPHIRE_RAPIDS, "AVX2"), False, False),  # ONEDNN_MAX_CPU_ISA=AVX2
        ("cpu", ("AVX2", ZEN3, None), False, False),
        ("cpu", ("DEFAULT", GRAVITON3, None, "aarch64"), True, True),  # ARM: Features ... bf16
        ("cuda:0", (6, 1), False, False),  # Pascal: float16 emulated too
        ("cuda:0", (7, 5), False, True),
        ("cuda:0", (8, 0), True, True),
    ],
)
def test_every_caller_gets_one_answer_to_is_this_dtype_native(monkeypatch, device, fake, bf16, fp16):
    """(review) inference.py had its own answer: [] on a Graviton3 (it read x86 flags only), float16
    native on any GPU, bf16 native under ATEN_CPU_CAPABILITY=avx2. Now training's warning,
    results.json (and so --compare), --benchmark's header and --export's rows ask hardware.describe."""
    inference = pytest.importorskip("inference")  # (onnxruntime: --export's)
    if device == "cpu":
        fake_cpu(monkeypatch, *fake)
    else:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: fake)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert inference.native_dtypes(device) == [d for d, native in (("bf16", bf16), ("fp16", fp16)) if native]
    for dtype, native in (("bfloat16", bf16), ("float16", fp16)):
        assert hardware.record(device, dtype)["amp_dtype_native"] is native  # results.json, --compare
        assert bool(hardware.emulation_warning(device, dtype)) is not native  # training's warning
        assert f"{dtype} {'native' if native else 'emulated'}" in hardware.summary(device)  # --benchmark
        assert f"{dtype} {'native' if native else 'emulated'}" in inference.pytorch_capability(device)  # --export
    # --export measures the AMP dtype's row where native, and says why not where it is emulated.
    cfg = Namespace(device=device, amp=True, amp_dtype="bfloat16")
    skipped = inference.skipped_rows(cfg, "bf16", inference.native_dtypes(device), ("It", "its capability"))
    assert (
        any(s["precision"] == "bf16" and "does not compute bf16 natively" in s["reason"] for s in skipped) is not bf16
    )


def test_an_arm_cpus_features_line_is_read(monkeypatch):
    """/proc/cpuinfo on ARM says "Features", not "flags" (torch's own cpuinfo lists x86 names only)."""
    import io

    cpuinfo = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: " + " ".join(sorted(GRAVITON3)) + "\n"
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: {"architecture": "aarch64"})
    monkeypatch.setattr(hardware, "open", lambda path, *a, **k: io.StringIO(cpuinfo), raising=False)
    read_flags = hardware.cpu_flags
    read_flags.cache_clear()
    try:
        assert read_flags() == GRAVITON3
        fake_cpu(monkeypatch, "DEFAULT", read_flags(), machine="aarch64")
        assert hardware.describe("cpu", "bfloat16").native is True
    finally:
        read_flags.cache_clear()  # (the next caller reads this machine's own flags)


def test_fp32_math(monkeypatch):
    cuda = Namespace(device="cuda", amp=False, amp_dtype=None, fp32_math="tf32")
    assert precision_name(cuda) == "FP32 (tf32)"
    assert precision_name(Namespace(**{**vars(cuda), "fp32_math": "ieee"})) == "FP32"
    assert precision_name(Namespace(**{**vars(cuda), "device": "cpu"})) == "FP32"  # the CPU: IEEE either way
    assert precision_name(Namespace(**{**vars(cuda), "amp": True, "amp_dtype": "bfloat16"})) == "AMP bf16"
    # TF32 exists from compute capability 8.0: a V100 (7.0) computes the FP32 it is asked for in IEEE.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, name in (((7, 0), "FP32"), ((7, 5), "FP32"), ((8, 0), "FP32 (tf32)"), ((9, 0), "FP32 (tf32)")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert precision_name(cuda) == name, capability
    monkeypatch.undo()
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        hardware.apply_fp32_math(cuda)  # (the switches are process-wide and need no GPU to be set)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        hardware.apply_fp32_math(Namespace(device="cuda", fp32_math="ieee"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo's six generated classes, 8 training and 2 test images each (what --demo finds and keeps)."""
    root = str(tmp_path_factory.mktemp("demo_data"))
    make_demo_dataset(root, train_per_class=8, test_per_class=2, size=32)
    return root


def test_amp_warns_early_where_bfloat16_is_emulated_and_goes_on(monkeypatch, run_cli, small_demo, tmp_path):
    fake_cpu(monkeypatch, "AVX2", ZEN3)  # an AVX2-only CPU
    code, out, err = run_cli(
        "--demo",
        "--amp",
        "--data_dir",
        small_demo,
        "--epochs",
        "1",
        "--image_size",
        "32",
        "--batch_size",
        "8",
        "--num_workers",
        "0",
        "--no_progress",
        *SMALL_MODEL,
    )
    assert code == 0, err
    lines = out.splitlines()
    warnings = [i for i, line in enumerate(lines) if "is emulated" in line]
    assert len(warnings) == 1 and warnings[0] < 3, lines[:5]  # one line, among the first
    assert lines[warnings[0]].startswith("warning: bfloat16 is emulated on this CPU (")
    assert "slower than FP32" in lines[warnings[0]] and "drop --amp" in lines[warnings[0]]
    assert warnings[0] < next(i for i, line in enumerate(lines) if line.startswith("training demo_amp"))
    run_dir = tmp_path / "checkpoints" / "demo_amp"
    results = json.loads((run_dir / "results.json").read_text())  # the run went on
    assert results["finished"] and results["amp_dtype_native"] is False
    assert results["device_capability"] == "AVX2 (no bf16/fp16 instructions)"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["amp_dtype_native"], config["device_capability"]) == (False, results["device_capability"])
    assert "bfloat16 is emulated" in (run_dir / "train.log").read_text()


def test_amp_on_a_native_cpu_prints_no_warning(monkeypatch, run_cli, demo_data, tmp_path):
    fake_cpu(monkeypatch, "AVX512", SAPPHIRE_RAPIDS)
    code, out, err = run_cli(
        "--data_dir", demo_data, "--checkpoint_name", "amp", "--epochs", "1", *FAST, "--amp", *SMALL_MODEL
    )
    assert code == 0, err
    assert "emulated" not in out and "slower than FP32" not in out, out  # (a busy machine may still be noted)
    assert json.loads((tmp_path / "checkpoints" / "amp" / "results.json").read_text())["amp_dtype_native"] is True
