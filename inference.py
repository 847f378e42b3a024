"""What each precision costs and buys at inference (for --export): the run's test split through
PyTorch (FP32, and bf16/fp16 autocast where the device computes them natively) and onnxruntime
(the FP32 and INT8 files); per row the size, test accuracy, agreement with PyTorch FP32's top-1,
the latency of one image and the images/s of batches of 32."""

import time

import numpy as np
import onnxruntime
import torch

from dataset import DeviceTransform
from hardware import cpu_flags, cpu_name, describe, device_name, fp32_math_switches, summary, tf32_on
from machine import LoadWatch, wait_policy
from step import precision_name

# Timing: single images (latency), then batches of 32 (throughput), each after warm-up runs.
LATENCY_RUNS, LATENCY_WARMUP = 50, 5
THROUGHPUT_BATCH, THROUGHPUT_RUNS, THROUGHPUT_WARMUP = 32, 5, 2
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}  # (--amp_dtype's)
ONNX_FP16_SKIPPED = (
    "onnxruntime's CPU provider has no FP16 convolution kernels on x86: it runs an FP16 file's "
    "convolutions in FP32 between inserted casts, so FP16 would measure FP32 plus casts"
)


class PyTorchRunner:
    """uint8 batch -> logits (numpy) through the run's model on its device, as --evaluate runs
    it (DeviceTransform's normalization), in FP32 or under bf16/fp16 autocast. Its FP32 math
    (`math`: "ieee" or "tf32") is the run's --fp32_math unless given (the parity check's is
    IEEE), set for each call and put back after it."""

    runtime = "pytorch"

    def __init__(self, model, cfg, precision="fp32", math=None):
        self.model, self.precision = model.eval(), precision
        self.fp32_math = math or fp32_math(cfg)
        self.transform = DeviceTransform(cfg.device, cfg.channels_last)
        self.device_type = torch.device(cfg.device).type
        # Autocast casts the float32 weights per operation: the model in memory stays float32.
        self.size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

    @torch.inference_mode()
    def __call__(self, images):
        with (
            fp32_math_switches(self.fp32_math),
            torch.autocast(
                self.device_type, dtype=AUTOCAST_DTYPES.get(self.precision), enabled=self.precision != "fp32"
            ),
        ):
            logits = self.model(self.transform(images))
        return logits.float().cpu().numpy()  # (on CUDA this waits for the GPU)


class OnnxRunner:
    """uint8 batch -> logits through an ONNX file's bytes on onnxruntime's CPU provider, with as
    many threads as PyTorch uses, waiting as PyTorch's OpenMP threads wait (spinning or not), so
    the two runtimes compare on the same cores alike."""

    runtime = "onnxruntime"

    def __init__(self, data, precision="fp32"):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        if wait_policy() == "passive":  # (onnxruntime's own pool spins by default, as OpenMP's does)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.precision, self.size = precision, len(data)

    def __call__(self, images):
        return self.session.run(None, {"images": images.contiguous().numpy()})[0]


def evaluate_runner(runner, loader):
    """{"logits": [N, classes], "targets": [N]} of `runner` over the test loader, in order."""
    logits, targets = [], []
    for images, labels in loader:
        logits.append(runner(images))
        targets.append(labels.numpy())
    return {"logits": np.concatenate(logits), "targets": np.concatenate(targets)}


def agreement(result, reference):
    """% of images whose top-1 is the reference's, and the largest absolute logit difference."""
    same = result["logits"].argmax(1) == reference["logits"].argmax(1)
    return {
        "agreement": 100.0 * float(same.mean()),
        "max_abs_logit_diff": float(np.abs(result["logits"] - reference["logits"]).max()),
    }


def accuracy(result):
    return 100.0 * float((result["logits"].argmax(1) == result["targets"]).mean())


def timing_batches(loader):
    """(one test image, THROUGHPUT_BATCH test images) as uint8 batches; a test split smaller than
    the batch is repeated."""
    images = []
    for batch, _ in loader:
        images.append(batch)
        if sum(len(b) for b in images) >= THROUGHPUT_BATCH:
            break
    images = torch.cat(images)
    repeated = images.repeat(-(-THROUGHPUT_BATCH // len(images)), 1, 1, 1)[:THROUGHPUT_BATCH]
    return images[:1].contiguous(), repeated.contiguous()


def interleaved_seconds(runners, images, warmup, runs):
    """[[seconds of each timed call] per runner]: every runner's warm-up calls first, then rounds in
    which each runner is timed once, in an order rotated every round. Load that comes and goes on
    a shared machine then falls on all runners alike, not on whichever ran at that moment."""
    for runner in runners:
        for _ in range(warmup):
            runner(images)
    seconds = [[] for _ in runners]
    for round_ in range(runs):
        for i in [(round_ + k) % len(runners) for k in range(len(runners))]:
            start = time.perf_counter()
            runners[i](images)
            seconds[i].append(time.perf_counter() - start)
    return seconds


def time_runners(runners, single, batch):
    """Per runner: latency (ms, p50 and p95 of LATENCY_RUNS single images) and images/s
    (THROUGHPUT_BATCH over the median time of THROUGHPUT_RUNS batches). Wall time from a uint8
    batch in host memory to logits in host memory."""
    latency = interleaved_seconds(runners, single, LATENCY_WARMUP, LATENCY_RUNS)
    throughput = interleaved_seconds(runners, batch, THROUGHPUT_WARMUP, THROUGHPUT_RUNS)
    return [
        {
            "latency_ms_p50": float(np.percentile(one, 50) * 1000),
            "latency_ms_p95": float(np.percentile(one, 95) * 1000),
            "images_per_sec": len(batch) / float(np.median(batches)),
        }
        for one, batches in zip(latency, throughput)
    ]


# --------------------------------------------------------------------------- the device
def native_dtypes(device):
    """The reduced float dtypes ("bf16", "fp16") `device` computes natively, not emulated through
    float32: hardware.describe's answer, the one training's warning and results.json give."""
    return [short for short, dtype in AMP_DTYPE_NAMES.items() if describe(device, dtype).native]


def pytorch_capability(device):
    """What PyTorch computes with on `device`, and which AMP dtypes are native there, in words
    (hardware.summary: e.g. "AVX512 (avx512_bf16): bfloat16 native, float16 emulated")."""
    return summary(device)


def onnxruntime_capability():
    """What onnxruntime's CPU kernels (MLAS) find: it reads the CPU's features itself and does not
    honour ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA."""
    flags = cpu_flags() or set()  # (torch's names or /proc/cpuinfo's: avx512_bw or avx512bw)
    isa = "AVX512" if flags & {"avx512bw", "avx512_bw"} else "AVX2" if "avx2" in flags else "SSE/other"
    int8 = [
        name
        for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"))
        if flag in flags
    ]
    return f"{isa}; int8 dot products: {', '.join(int8) if int8 else 'no VNNI (three instructions per VNNI one)'}"


# --------------------------------------------------------------------------- the rows
def fp32_math(cfg):
    """How PyTorch computes FP32 here under the run's --fp32_math (export.py applies it): "tf32"
    (CUDA, compute capability 8.0 and up) or "ieee"."""
    return "tf32" if tf32_on(cfg) else "ieee"


def fp32_label(cfg):
    """PyTorch's FP32 as the rows and the parity line name it: "FP32", or "FP32 (tf32)"."""
    return "FP32 (tf32)" if fp32_math(cfg) == "tf32" else "FP32"


def amp_dtype(cfg):
    """The reduced dtype the run's --amp computes in ("bf16"/"fp16"); for an FP32 run, the one
    --amp would use on this device (float16 on CUDA, bfloat16 on a CPU)."""
    name = cfg.amp_dtype if cfg.amp else ("float16" if torch.device(cfg.device).type == "cuda" else "bfloat16")
    return next(short for short, long in AMP_DTYPE_NAMES.items() if long == name)


def measure(model, cfg, onnx_runners, loader, results):
    """inference.json's content: a row per precision and runtime (PyTorch FP32 and, where the
    device computes it natively, the run's AMP dtype, in the run's --fp32_math; the onnxruntime
    runners), what was left out and why, and the setting. `results` holds the test-split results
    already computed (in IEEE FP32, PyTorch's too), by (runtime, precision): a PyTorch one is
    used again only where this row computes in IEEE as well. Agreement is with the PyTorch FP32
    row."""
    reduced, native = amp_dtype(cfg), native_dtypes(cfg.device)
    runners = [PyTorchRunner(model, cfg, p) for p in ("fp32", reduced) if p == "fp32" or p in native] + onnx_runners
    results = {key: result for key, result in results.items() if key[0] != "pytorch" or runners[0].fp32_math == "ieee"}
    results["pytorch", "fp32"] = results.get(("pytorch", "fp32")) or evaluate_runner(runners[0], loader)
    single, batch = timing_batches(loader)
    devices = {
        "pytorch": (device_name(cfg.device), pytorch_capability(cfg.device)),
        "onnxruntime": (cpu_name(), onnxruntime_capability()),
    }
    reference, rows = results["pytorch", "fp32"], []
    watch = LoadWatch()
    timings = time_runners(runners, single, batch)
    load = watch.record()
    for runner, timing in zip(runners, timings):
        result = results.get((runner.runtime, runner.precision)) or evaluate_runner(runner, loader)
        device, capability = devices[runner.runtime]
        rows.append(
            {
                "precision": runner.precision,
                "runtime": runner.runtime,
                "size_mb": runner.size / 1e6,
                "test_acc": accuracy(result),
                **agreement(result, reference),
                **timing,
                "device": device,
                "capability": capability,
                # PyTorch's FP32 matrix products and convolutions (and what autocast leaves in FP32)
                **({"fp32_math": fp32_math(cfg)} if runner.runtime == "pytorch" else {}),
            }
        )
    return {
        "rows": rows,
        "skipped": skipped_rows(cfg, reduced, native, devices["pytorch"]),
        "device": devices["pytorch"][0],
        "capability": devices["pytorch"][1],
        "onnxruntime_device": devices["onnxruntime"][0],
        "onnxruntime_capability": devices["onnxruntime"][1],
        "run_precision": precision_name(cfg),
        "fp32_math": fp32_math(cfg),
        "input_size": cfg.random_crop or cfg.image_size,
        "test_images": int(len(reference["targets"])),
        "threads": torch.get_num_threads(),
        "openmp_wait": wait_policy(),
        "timing": {
            "latency_runs": LATENCY_RUNS,
            "latency_warmup": LATENCY_WARMUP,
            "throughput_batch": THROUGHPUT_BATCH,
            "throughput_runs": THROUGHPUT_RUNS,
            "throughput_warmup": THROUGHPUT_WARMUP,
        },
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        # How busy the machine was before and as the timing ended (this process's threads included);
        # load_average: the latter (the key kept from before load_before existed).
        **load,
        "load_average": load["load_after"],
    }


def skipped_rows(cfg, reduced, native, pytorch_device):
    """The precisions not measured, each with why."""
    device, capability = pytorch_device
    skipped = []
    for dtype in AUTOCAST_DTYPES:
        if dtype != reduced:
            where = "CUDA" if torch.device(cfg.device).type == "cuda" else "a CPU"
            why = (
                f"the run trained with --amp_dtype {cfg.amp_dtype}"
                if cfg.amp
                else f"--amp on {where} means {AMP_DTYPE_NAMES[reduced]}"
            )
            why = f"not this run's AMP dtype: {why}"
        elif dtype not in native:
            known = describe(cfg.device, AMP_DTYPE_NAMES[dtype]).native is not None
            why = (
                f"{device} does not compute {dtype} natively ({capability}): autocast would emulate it"
                if known
                else f"whether {device} computes {dtype} natively cannot be told ({capability})"
            )
        else:
            continue
        skipped.append({"precision": dtype, "runtime": "pytorch", "reason": why})
    skipped.append({"precision": "fp16", "runtime": "onnxruntime", "reason": ONNX_FP16_SKIPPED})
    return skipped
