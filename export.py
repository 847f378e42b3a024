"""--export: ship a run's best.pt as ONNX. The file takes uint8 RGB images and normalizes them
itself, has a dynamic batch dimension and carries what a deployer needs in its metadata; it is
checked against PyTorch on the run's test split before it is written, quantized to INT8
(onnxruntime's static quantization, QDQ, per-channel weights, calibrated on training images),
and each precision is measured (inference.py). Nothing is written until everything succeeded."""

import copy
import json
import os
import tempfile
import time

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torch.utils.data import Subset

import inference
from checkpoint import run_command
from dataset import IMAGENET_MEAN, IMAGENET_STD, build_datasets, evaluation_loader, evaluation_view, make_loader
from report import best_pt_identity, inference_markdown, read_results
from utils import RunStopped, UserError, atomic_write_files

ONNX_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
EXPORT_FILES = (ONNX_FILE, INT8_FILE, "inference.json", "inference.md")
# An FP32 export must give the PyTorch model's top-1 on at least this share of the test images.
MIN_AGREEMENT = 99.9
# What PyTorch computes in for the parity check: the file's own arithmetic (onnxruntime's FP32 is IEEE).
PARITY_MATH = "IEEE FP32"
# Below this agreement with FP32's top-1 (percent of the test images), --export warns about INT8.
INT8_MIN_AGREEMENT = 90.0
# One ONNX file is one protobuf message, which cannot exceed 2 GiB (larger models need their
# weights in a second file, which this template does not write).
ONNX_FILE_LIMIT = 2**31


class Deployable(nn.Module):
    """The model as it is shipped: uint8 RGB images [B, 3, S, S] (NCHW, values 0-255) in, logits
    out. The normalization of dataset.DeviceTransform is inside (the same arithmetic), so a
    deployer only decodes, resizes and crops."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / std)

    def forward(self, images):
        return self.model(images.float() * self.scale - self.shift)


def export_run(model, best, cfg):
    """--export: model.onnx, model.int8.onnx, inference.json and inference.md in the run folder."""
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    check_writable(run_dir)  # before minutes of work
    check_file_limit(model, cfg.model)
    train_set, _, test_set, class_names = build_datasets(cfg)
    if list(class_names) != list(best["class_names"]):
        raise UserError(
            f"the classes in {cfg.data_dir} ({', '.join(class_names)}) differ from the run's "
            f"({', '.join(best['class_names'])})"
        )
    test_loader = evaluation_loader(test_set, cfg, cfg.device, 0, 1)
    progress = run_progress(run_dir, best)
    unfinished = unfinished_warning(progress, best, cfg.checkpoint_name, cfg.checkpoint_dir)
    if unfinished:  # first, before minutes of work, and again last
        print(unfinished, flush=True)
    clock = Clock(
        f"exporting {cfg.checkpoint_name} ({cfg.model}, epoch {best['epoch']}, "
        f"{best.get('weights', 'raw')} weights) to ONNX"
    )
    fp32 = export_onnx(model, cfg, metadata(cfg, best))
    clock.lap("checking it against PyTorch on the test split")
    onnx_fp32 = inference.OnnxRunner(fp32, "fp32")
    # The parity check checks the file: onnxruntime computes IEEE FP32, so PyTorch does too here,
    # whatever the run's --fp32_math (the timed PyTorch rows compute in that; inference.measure).
    results = {
        ("pytorch", "fp32"): inference.evaluate_runner(inference.PyTorchRunner(model, cfg, math="ieee"), test_loader),
        ("onnxruntime", "fp32"): inference.evaluate_runner(onnx_fp32, test_loader),
    }
    parity = inference.agreement(results["onnxruntime", "fp32"], results["pytorch", "fp32"])
    check_parity(parity, cfg)
    calibration = calibration_batches(train_set, cfg)
    clock.lap(
        f"parity: onnxruntime FP32 gives PyTorch {PARITY_MATH}'s top-1 on {parity['agreement']:.2f}% of "
        f"{len(results['pytorch', 'fp32']['targets'])} test images, largest logit difference "
        f"{parity['max_abs_logit_diff']:.2e}; quantizing to INT8 (static, QDQ, per-channel weights) on "
        f"{sum(len(b) for b in calibration)} training images"
    )
    int8 = quantize_int8(fp32, calibration, metadata(cfg, best, precision="int8", calibration=calibration))
    clock.lap("measuring each precision")
    report = inference.measure(model, cfg, [onnx_fp32, inference.OnnxRunner(int8, "int8")], test_loader, results)
    report.update(
        run=cfg.checkpoint_name,
        model=cfg.model,
        epoch=best["epoch"],
        weights=best.get("weights", "raw"),
        calibration_images=sum(len(b) for b in calibration),
        run_progress=progress,
        parity={**parity, "pytorch": PARITY_MATH},  # (model.onnx against PyTorch, both in IEEE FP32)
        best_pt=best_pt_identity(run_dir),  # (report.stale_export tells a later best.pt by it)
    )
    write_files(run_dir, fp32, int8, report)
    clock.lap("done")
    print(inference_markdown(report) + f"\nwrote {', '.join(os.path.join(run_dir, f) for f in EXPORT_FILES)}")
    for warning in (int8_warning(report), unfinished):
        if warning:
            print(warning)
    return 0


def run_progress(run_dir, best):
    """How far the run had trained when it was exported: {"epoch": epochs finished, "epochs": of
    how many, "finished": whether it was trained and tested}, from its results.json (best.pt's
    epoch where that cannot be read)."""
    epochs, results = best["config"].get("epochs"), read_results(run_dir)
    if isinstance(results.get("epochs"), list) and "finished" in results:
        return {"epoch": len(results["epochs"]), "epochs": epochs, "finished": bool(results["finished"])}
    return {"epoch": best["epoch"], "epochs": epochs, "finished": best["epoch"] == epochs}


def unfinished_warning(progress, best, name, checkpoint_dir):
    """A line when the run has not finished: the export holds the best weights so far, which a
    --resume may replace ('' for a finished run)."""
    if progress["finished"]:
        return ""
    return (
        f"warning: {name} has not finished (epoch {progress['epoch']} of {progress['epochs']}): this export holds "
        f"best.pt as it is now (epoch {best['epoch']}); finish the run ({run_command(name, checkpoint_dir, '--resume')}) "
        "and export again"
    )


def int8_warning(report):
    """A line when model.int8.onnx disagrees with FP32 on many test images ('' if not): INT8 is
    written whatever it scores, and a broken calibration should not ship unnoticed."""
    row = next(r for r in report["rows"] if r["precision"] == "int8")
    if row["agreement"] >= INT8_MIN_AGREEMENT:
        return ""
    return (
        f"warning: model.int8.onnx gives FP32's top-1 on only {row['agreement']:.2f}% of the test images "
        f"(test accuracy {row['test_acc']:.2f}%, FP32 {report['rows'][0]['test_acc']:.2f}%): do not ship it as it "
        f"is; try another --calibration_images (this export used {report['calibration_images']}), or ship "
        "model.onnx"
    )


class Clock:
    """Progress lines with the seconds each step took: an export takes a while."""

    def __init__(self, first):
        print(f"{first} ...", flush=True)
        self.start = time.perf_counter()

    def lap(self, next_step):
        now = time.perf_counter()
        print(f"  ({now - self.start:.0f} s)\n{next_step}{'' if next_step == 'done' else ' ...'}", flush=True)
        self.start = now


def check_writable(run_dir):
    """A file can be created in the run folder (a read-only folder, disk or mount says no)."""
    try:
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".export.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to {run_dir}: {exc.strerror or exc}; --export writes model.onnx there") from None


def check_file_limit(model, name):
    """A model whose float32 weights do not fit in one ONNX file is refused before exporting."""
    size = sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    if size >= ONNX_FILE_LIMIT:
        raise UserError(
            f"--model {name} cannot be exported to one ONNX file: its float32 weights take "
            f"{size / 1e6:,.0f} MB, and one ONNX file holds at most {ONNX_FILE_LIMIT / 1e6:,.0f} MB"
        )


def metadata(cfg, best, precision="fp32", calibration=()):
    """The file's metadata_props (strings; lists as JSON): what a deployer needs to feed it."""
    size = cfg.random_crop or cfg.image_size
    crop = f", then the center {size} x {size}" if cfg.random_crop else ""
    props = {
        "class_names": json.dumps(list(best["class_names"])),
        "input_name": "images",
        "input_layout": "NCHW",
        "input_dtype": "uint8",
        "input_channels": "RGB",
        "input_size": str(size),
        "resize": str(cfg.image_size),
        "crop": str(size),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "preprocessing": f"decode to RGB, resize to {cfg.image_size} x {cfg.image_size} (bilinear, antialiased as "
        f"PIL's){crop}; feed uint8 [batch, 3, {size}, {size}]. The graph divides by 255 and "
        "normalizes with mean and std itself",
        "output": "logits [batch, classes] in class_names order (softmax gives probabilities)",
        "precision": precision,
        "model": cfg.model,
        "run": cfg.checkpoint_name,
        "epoch": str(best["epoch"]),
        "epochs": str(best["config"].get("epochs")),  # (the run's: "epoch" of "epochs")
        "weights": best.get("weights", "raw"),
        "source": "amp-pytorch best.pt",
    }
    if calibration:
        props["calibration_images"] = str(sum(len(b) for b in calibration))
    return props


def export_onnx(model, cfg, props):
    """The ONNX file's bytes: `model` (a copy, in float32 on the CPU) behind Deployable, exported by
    torch.onnx's dynamo exporter with a dynamic batch dimension."""
    size = cfg.random_crop or cfg.image_size
    deployable = Deployable(copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    try:
        program = torch.onnx.export(
            deployable,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
        program.model.metadata_props.update(props)
        return program.model_proto.SerializeToString()
    except Exception as exc:  # the exporter raises many kinds: name it, in one line
        raise UserError(
            f"--model {cfg.model} cannot be exported to ONNX: {type(exc).__name__}: {first_line(exc)}"
        ) from None


def first_line(exc, limit=300):
    """An exception's first non-empty line, shortened: the exporter's messages run to pages."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    return text if len(text) <= limit else text[:limit] + " ..."


def check_parity(parity, cfg):
    """An FP32 export that does not compute what PyTorch computes is an error, not a result."""
    if parity["agreement"] < MIN_AGREEMENT:
        raise RunStopped(
            f"error: the ONNX export of {cfg.checkpoint_name} ({cfg.model}) disagrees with PyTorch {PARITY_MATH}: the "
            "same top-1 on "
            f"{parity['agreement']:.2f}% of the test images (at least {MIN_AGREEMENT}% needed), largest logit "
            f"difference {parity['max_abs_logit_diff']:.3g}; nothing was written"
        )


# --------------------------------------------------------------------------- INT8
def calibration_batches(train_set, cfg):
    """uint8 batches of --calibration_images training images (not validation or test ones), a
    random choice fixed by --seed, as evaluation sees them (resized, center-cropped)."""
    count = min(cfg.calibration_images, len(train_set))
    chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[:count]
    loader = make_loader(evaluation_view(Subset(train_set, chosen.tolist()), cfg), None, 32, cfg, "cpu")
    return [images.numpy() for images, _ in loader]


class _Batches(CalibrationDataReader):
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def quantize_int8(fp32, calibration, props):
    """The INT8 file's bytes: onnxruntime's pre-processing (shape inference, BatchNorm folded into
    the convolutions), then static quantization in QDQ format with per-channel int8 weights and
    uint8 activations whose ranges are the min/max seen on the calibration batches."""
    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, quantized = (os.path.join(tmp, name) for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        with open(source, "wb") as f:
            f.write(fp32)
        quant_pre_process(source, prepared)
        quantize_static(
            prepared,
            quantized,
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        model = onnx.load(quantized)
    onnx.helper.set_model_props(model, props)  # (the quantizer keeps some, adds its own: ours replace them)
    # The pre-processing declares every domain onnxruntime knows; keep those the nodes use (all standard ONNX).
    used = {node.domain for node in model.graph.node} | {""}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model.SerializeToString()


# --------------------------------------------------------------------------- files
def write_files(run_dir, fp32, int8, report):
    """The four files together: all written to temporary files first, then renamed into place, so
    a failed write leaves the earlier export's files as they were (not a new model.onnx beside an
    old model.int8.onnx)."""
    files = {
        ONNX_FILE: fp32,
        INT8_FILE: int8,
        "inference.json": (json.dumps(report, indent=2) + "\n").encode(),
        "inference.md": inference_markdown(report).encode(),
    }
    try:
        atomic_write_files(run_dir, files)
    except OSError as exc:  # (a WriteFailed names the file and the free space)
        raise UserError(f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}") from None
