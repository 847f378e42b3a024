"""What the device computes natively: whether the AMP dtype (bfloat16, float16) runs on the
device's own instructions or is emulated (then AMP is slower than FP32, not faster), and the
FP32 math (IEEE or TF32) a CUDA run uses."""

import contextlib
import functools
import os
import platform
from typing import NamedTuple

import torch


def device_name(device):
    """The GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# x86 instructions that compute each dtype natively (the names /proc/cpuinfo and torch's cpuinfo use).
X86_NATIVE = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
# ARM: the BF16 extension, and half-precision arithmetic (asimdhp: vectors, fphp: scalars).
ARM_NATIVE = {"bfloat16": ("bf16",), "float16": ("asimdhp",)}
# ATen's CPU kernel levels below AVX-512: there its bfloat16 and float16 kernels convert to float32 and back.
ATEN_WITHOUT_AVX512 = {"DEFAULT", "NO AVX", "AVX2"}
# oneDNN (the CPU convolutions) uses a dtype's instructions only when ONEDNN_MAX_CPU_ISA allows them.
ONEDNN_BELOW = {
    "bfloat16": {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"},
    "float16": {
        "SSE41",
        "AVX",
        "AVX2",
        "AVX2_VNNI",
        "AVX2_VNNI_2",
        "AVX512_CORE",
        "AVX512_CORE_VNNI",
        "AVX512_CORE_BF16",
    },
}
# CUDA: bfloat16 tensor cores from compute capability 8.0 (Ampere), float16 ones from 7.0 (Volta).
CUDA_NATIVE_FROM = {"bfloat16": (8, 0), "float16": (7, 0)}


class Capability(NamedTuple):
    """The device's name, what it computes with (e.g. "AVX512 (avx512_bf16, amx_bf16)" or
    "compute capability 8.0"), and whether `dtype` is native there (None: unknown, or no dtype)."""

    name: str
    capability: str
    dtype: str | None
    native: bool | None


def describe(device, dtype=None):
    """The Capability of `device` ("cpu", "cuda:0", ...) for the AMP dtype `dtype` (None in FP32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_capability(device, dtype)
    return cpu_capability(dtype)


def cuda_capability(device, dtype):
    major, minor = torch.cuda.get_device_capability(device)
    native = None if dtype is None else (major, minor) >= CUDA_NATIVE_FROM[dtype]
    return Capability(device_name(device), f"compute capability {major}.{minor}", dtype, native)


def cpu_capability(dtype):
    """From ATen's kernel level (torch.backends.cpu.get_cpu_capability(), which follows
    ATEN_CPU_CAPABILITY), ONEDNN_MAX_CPU_ISA and the CPU's instruction flags."""
    aten = torch.backends.cpu.get_cpu_capability()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    flags = cpu_flags()
    wanted = ARM_NATIVE if arm else X86_NATIVE
    present = [f for d in ("bfloat16", "float16") for f in wanted[d] if f in (flags or ())]
    limits = [] if arm else kernel_limits(aten)
    unused = f" unused: {', '.join(limits)}" if present and limits else ""
    found = ", ".join(present) or ("no bf16/fp16 instructions" if flags is not None else "CPU flags unknown")
    capability = f"{aten} ({found}{unused})"
    if dtype is None or flags is None:  # (no flags to read: not Linux, say; we cannot tell)
        native = None
    else:
        has_instructions = any(f in flags for f in wanted[dtype])
        native = has_instructions and (arm or (aten not in ATEN_WITHOUT_AVX512 and not onednn_limited(dtype)))
    return Capability(device_name("cpu"), capability, dtype, native)


def kernel_limits(aten):
    """The environment settings that keep torch from using the CPU's AVX-512 instructions."""
    limits = []
    if aten in ATEN_WITHOUT_AVX512 and os.environ.get("ATEN_CPU_CAPABILITY"):
        limits.append(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}")
    if onednn_limited("bfloat16") or onednn_limited("float16"):
        limits.append(f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}")
    return limits


def onednn_limited(dtype):
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_BELOW[dtype]


@functools.lru_cache(maxsize=1)
def cpu_flags():
    """The CPU's instruction flags (a set of lowercase names), or None when none can be read:
    torch's own cpuinfo (a private API, so only trusted when it answers), else /proc/cpuinfo."""
    try:
        info = torch._C._cpu._get_cpu_capability()
        if isinstance(info, dict) and "avx512_bf16" in info:
            return {name for name, value in info.items() if value is True}
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):  # x86, ARM
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def emulation_warning(device, dtype):
    """One line when `dtype` is emulated on `device` (AMP then runs slower than FP32), else ''."""
    cap = describe(device, dtype)
    if dtype is None or cap.native is not False:
        return ""
    if torch.device(device).type == "cuda":
        return (
            f"warning: {cap.name} ({cap.capability}) has no {dtype} tensor cores (they start at compute capability "
            f"{'.'.join(map(str, CUDA_NATIVE_FROM[dtype]))}): --amp will run no faster than FP32, likely slower; "
            "drop --amp here, or use a newer GPU"
        )
    other = "float16" if dtype == "bfloat16" else "bfloat16"
    instead = (
        "use --amp alone (bfloat16 is native here)"
        if dtype == "float16" and describe(device, other).native
        else "drop --amp (FP32 is faster here), or run AMP on a GPU or a CPU with AVX512-BF16 or AMX"
    )
    return (
        f"warning: {dtype} is emulated on this CPU ({cap.name}, {cap.capability}): --amp will run slower "
        f"than FP32, not faster; {instead}"
    )


def summary(device):
    """The capability and which AMP dtypes are native, e.g. "compute capability 7.5: float16
    native, bfloat16 emulated" (for --benchmark's header)."""
    answers = {True: "native", False: "emulated", None: "unknown"}
    dtypes = ", ".join(f"{d} {answers[describe(device, d).native]}" for d in ("bfloat16", "float16"))
    return f"{describe(device).capability}: {dtypes}"


def record(device, dtype):
    """What config.json and results.json keep about the device: its capability and whether the
    AMP dtype is native there (null in FP32, or when it cannot be told)."""
    cap = describe(device, dtype)
    return {"device_capability": cap.capability, "amp_dtype_native": cap.native}


# --------------------------------------------------------------------------- FP32 math
# TF32 is a tensor-core format from compute capability 8.0 (Ampere); older GPUs compute FP32 in IEEE.
TF32_FROM = (8, 0)


def tf32_on(cfg):
    """Whether FP32 matrix products and convolutions run in TF32: --fp32_math tf32, on a CUDA GPU
    of compute capability 8.0 or newer (the CPU and older GPUs compute FP32 in IEEE either way)."""
    if getattr(cfg, "fp32_math", "ieee") != "tf32" or torch.device(cfg.device).type != "cuda":
        return False
    return not torch.cuda.is_available() or torch.cuda.get_device_capability(cfg.device) >= TF32_FROM


def apply_fp32_math(cfg):
    """Set cuBLAS's and cuDNN's FP32 math for this process: IEEE float32, or TF32 (10-bit
    mantissa, on tensor cores from compute capability 8.0). PyTorch's own default is TF32 for
    convolutions and IEEE for matrix products; --fp32_math sets both alike. (The allow_tf32
    switches, not torch 2.9's fp32_precision ones: in torch 2.14 code that later reads an
    allow_tf32 switch, as some libraries do, fails after the new ones were set.)"""
    if torch.device(cfg.device).type != "cuda":
        return
    set_tf32(cfg.fp32_math == "tf32")


def set_tf32(allowed):
    """cuBLAS's and cuDNN's TF32 switches, both alike (they act on CUDA only)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed


@contextlib.contextmanager
def fp32_math_switches(math):
    """Compute FP32 in `math` ("ieee" or "tf32") inside the block, then put back the two switches
    as they were: --export checks its file in IEEE FP32 and times PyTorch in the run's math."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(math == "tf32")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
