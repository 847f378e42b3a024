"""--export: a run's best.pt becomes model.onnx (uint8 images in, normalization inside, dynamic
batch, class names and preprocessing in its metadata), checked against PyTorch on the test split,
and model.int8.onnx (static INT8, QDQ, per-channel weights); inference.json/.md hold a row per
precision and runtime; deploy/predict_onnx.py labels images without PyTorch as --predict does.
Three families export; a run without best.pt, a model the exporter refuses, a disagreeing export
and a read-only run folder each stop in one line and leave the folder as it was."""

import argparse
import contextlib
import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import FEW_TIMING_RUNS, ROOT, make_colour_dataset

import export
import inference
import main as main_module
import utils
from dataset import DeviceTransform, UnlabeledImages, evaluation_view
from demo import DEMO_CLASSES, make_demo_dataset

TINY = [
    "--image_size",
    "32",
    "--batch_size",
    "8",
    "--no_pretrained",
    "--num_workers",
    "0",
    "--no_progress",
    "--device",
    "cpu",
    "--learning_rate",
    "2e-3",
    "--epochs",
    "1",
]
EXPORT = ["--export", "--num_workers", "0", "--calibration_images", "16"]
ROW_KEYS = {
    "precision",
    "runtime",
    "size_mb",
    "test_acc",
    "agreement",
    "latency_ms_p50",
    "latency_ms_p95",
    "images_per_sec",
    "device",
    "capability",
}
PREDICT_ONNX = os.path.join(ROOT, "deploy", "predict_onnx.py")


def cli(*argv):
    """main.main(argv) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main_module.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line(result, code, *needles):
    returned, out, err = result
    assert returned == code, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def listing(folder):
    """{name: bytes} of a run folder's small files and the sizes of its large ones."""
    return {
        name: (
            os.path.getsize(os.path.join(folder, name))
            if name.endswith(".pt")
            else open(os.path.join(folder, name), "rb").read()
        )
        for name in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module", autouse=True)
def few_timing_runs():
    """The timing loops, shortened: these tests check what is measured, not how fast (a test is no
    benchmark); --export's own numbers come from the full loops."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FEW_TIMING_RUNS.items():
            patch.setattr(inference, name, value)
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory, few_timing_runs):
    """A 1-epoch ResNet-18 run on generated demo data (6 classes, resized to 32 px, the center 28 x 28
    at test time: --random_crop), exported once."""
    root = tmp_path_factory.mktemp("export")
    data = root / "demo"
    make_demo_dataset(str(data), train_per_class=12, test_per_class=5, size=48)
    runs = root / "checkpoints"
    code, out, err = cli(
        "--data_dir", data, "--checkpoint_dir", runs, "--checkpoint_name", "r18", *TINY, "--random_crop", "28"
    )
    assert code == 0, err
    code, out, err = cli("--data_dir", data, "--checkpoint_dir", runs, "--checkpoint_name", "r18", *EXPORT)
    assert code == 0, err
    yield {"data": data, "runs": runs, "run": runs / "r18", "out": out}
    shutil.rmtree(root, ignore_errors=True)


def copy_of_run(demo, tmp_path, name):
    """The exported run, copied under `name` in a folder of its own (its files to compare after)."""
    runs = tmp_path / "checkpoints"
    shutil.copytree(demo["run"], runs / name)
    return runs, runs / name


def best_model(run_dir):
    best = torch.load(run_dir / "best.pt", weights_only=True)
    model = main_module.build_model(len(best["class_names"]), pretrained=False, name=best["config"]["model"])
    model.load_state_dict(best["model"])
    return model.eval()


# --------------------------------------------------------------------------- the files
def test_model_onnx_takes_uint8_batches_of_any_size_and_computes_what_pytorch_does(demo):
    session = onnxruntime.InferenceSession(str(demo["run"] / "model.onnx"), providers=["CPUExecutionProvider"])
    (images_input,) = session.get_inputs()
    assert images_input.name == "images" and images_input.type == "tensor(uint8)"
    assert images_input.shape == ["batch", 3, 28, 28]  # --random_crop 28: the center crop of the 32 px image
    pictures = evaluation_view(
        UnlabeledImages(str(demo["data"] / "seg_pred" / "seg_pred"), 32), argparse.Namespace(random_crop=28)
    )
    model = best_model(demo["run"])
    for size in (1, 5):  # the batch dimension is dynamic
        images = torch.stack([pictures[i][0] for i in range(size)])
        logits = session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = model(DeviceTransform("cpu")(images)).numpy()
        assert logits.shape == (size, len(DEMO_CLASSES))
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        assert (logits.argmax(1) == expected.argmax(1)).all()


def test_metadata_says_how_to_feed_the_model(demo):
    meta = onnxruntime.InferenceSession(str(demo["run"] / "model.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == list(DEMO_CLASSES)
    assert (meta["input_layout"], meta["input_dtype"], meta["input_channels"]) == ("NCHW", "uint8", "RGB")
    assert (meta["input_size"], meta["resize"], meta["crop"]) == ("28", "32", "28")
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert (meta["model"], meta["weights"], meta["precision"]) == ("resnet18", "raw", "fp32")
    assert "normalizes" in meta["preprocessing"]


def test_int8_file_is_static_qdq_with_per_channel_weights_and_under_40_percent(demo):
    fp32, int8 = demo["run"] / "model.onnx", demo["run"] / "model.int8.onnx"
    assert os.path.getsize(int8) < 0.4 * os.path.getsize(fp32)
    model = onnx.load(str(int8))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and not ops & {"DynamicQuantizeLinear"}
    weights = {init.name: init for init in model.graph.initializer}
    per_channel = [
        node
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in weights
        and weights[node.input[0]].data_type == onnx.TensorProto.INT8
        and len(weights[node.input[1]].dims) == 1
        and weights[node.input[1]].dims[0] > 1
    ]
    assert len(per_channel) >= 20  # every convolution's weights: one scale per output channel
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert meta["precision"] == "int8" and meta["calibration_images"] == "16"
    assert {opset.domain for opset in model.opset_import} == {""}  # standard ONNX only
    session = onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    for size in (1, 5):
        assert session.run(None, {"images": np.zeros((size, 3, 28, 28), np.uint8)})[0].shape == (size, 6)


def test_inference_json_has_a_row_per_precision_and_runtime(demo):
    report = json.loads((demo["run"] / "inference.json").read_text())
    rows = {(row["precision"], row["runtime"]): row for row in report["rows"]}
    bf16 = "bf16" in inference.native_dtypes("cpu")  # the AMP dtype on a CPU: measured where native
    assert list(rows) == [
        ("fp32", "pytorch"),
        *([("bf16", "pytorch")] if bf16 else []),
        ("fp32", "onnxruntime"),
        ("int8", "onnxruntime"),
    ]
    for row in rows.values():
        assert ROW_KEYS <= set(row), set(row)
        assert 0 <= row["test_acc"] <= 100 and 0 <= row["agreement"] <= 100
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"] and row["images_per_sec"] > 0
    assert rows["fp32", "pytorch"]["agreement"] == 100 and rows["fp32", "pytorch"]["max_abs_logit_diff"] == 0
    assert rows["fp32", "pytorch"]["fp32_math"] == report["fp32_math"] == "ieee"  # (the CPU: IEEE whatever the flag)
    assert rows["fp32", "onnxruntime"]["agreement"] >= export.MIN_AGREEMENT
    assert rows["fp32", "onnxruntime"]["test_acc"] == rows["fp32", "pytorch"]["test_acc"]
    for precision, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        assert rows[precision, "onnxruntime"]["size_mb"] == os.path.getsize(demo["run"] / file) / 1e6
    assert report["test_images"] == 30 and report["calibration_images"] == 16
    skipped = {(s["precision"], s["runtime"]): s["reason"] for s in report["skipped"]}
    assert "no FP16 convolution kernels" in skipped["fp16", "onnxruntime"]
    assert "not this run's AMP dtype: --amp on a CPU means bfloat16" in skipped["fp16", "pytorch"]
    assert bf16 or "does not compute bf16 natively" in skipped["bf16", "pytorch"]
    assert report["timing"]["latency_runs"] == 3  # (shortened here)
    assert report["device"] and report["capability"] and report["onnxruntime_capability"]
    text = (demo["run"] / "inference.md").read_text()
    assert "| precision | runtime | size (MB) |" in text and report["device"] in text and "Not measured" in text
    assert "| int8 | onnxruntime |" in text and text.split("\n| precision")[1] in demo["out"]  # printed too


def test_a_tf32_row_is_labelled_tf32(demo):
    """Where PyTorch's FP32 ran in TF32 (--fp32_math tf32 on an Ampere or newer GPU), inference.md
    says so; onnxruntime's FP32 row is IEEE either way."""
    from report import inference_markdown

    report = json.loads((demo["run"] / "inference.json").read_text())
    for row in report["rows"]:
        if row["runtime"] == "pytorch":
            row["fp32_math"] = "tf32"
    text = inference_markdown({**report, "fp32_math": "tf32"})
    assert "| fp32 (tf32) | pytorch |" in text and "| fp32 | onnxruntime |" in text
    assert "top-1 is PyTorch FP32 (tf32)'s" in text
    assert "| fp32 (tf32) |" not in (demo["run"] / "inference.md").read_text()  # this CPU run: IEEE


def export_recording_fp32_math(demo, tmp_path, monkeypatch, *flags):
    """--export of a copy of the demo run with `flags`: (its stdout, run folder, the set of (FP32
    math, cuDNN's and cuBLAS's TF32 switches) PyTorch's FP32 calls saw, the switches after it)."""
    seen = set()
    call = inference.PyTorchRunner.__call__

    def recording(self, images):
        transform = self.transform

        def seeing(batch):  # (inside the call: the switches the model computes under)
            if self.precision == "fp32":
                seen.add((self.fp32_math, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return transform(batch)

        self.transform = seeing
        try:
            return call(self, images)
        finally:
            self.transform = transform

    monkeypatch.setattr(inference.PyTorchRunner, "__call__", recording)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
    runs, run_dir = copy_of_run(demo, tmp_path, "r18")
    try:
        code, out, err = cli(
            "--data_dir", demo["data"], "--checkpoint_dir", runs, "--checkpoint_name", "r18", *EXPORT, *flags
        )  # fmt: skip
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert code == 0, err
    return out, run_dir, seen, after


def assert_parity_in_ieee_and_row_in(math, out, run_dir, seen, after):
    """The parity check compared the file with PyTorch in IEEE FP32 (and says so); the timed
    PyTorch FP32 row computed in `math` and is labelled by it; the switches are as they were."""
    assert ("ieee", False, False) in seen and seen <= {("ieee", False, False), (math, math == "tf32", math == "tf32")}
    assert "parity: onnxruntime FP32 gives PyTorch IEEE FP32's top-1 on 100.00% of" in out
    report = json.loads((run_dir / "inference.json").read_text())
    assert report["parity"]["pytorch"] == "IEEE FP32" and report["parity"]["agreement"] == 100.0
    assert report["rows"][0]["fp32_math"] == math
    assert ("| fp32 (tf32) | pytorch |" in (run_dir / "inference.md").read_text()) is (math == "tf32")
    assert after == (True, False)  # cuDNN's default TF32, cuBLAS's IEEE: put back


def test_export_checks_parity_in_ieee_and_times_the_tf32_row_in_tf32(demo, tmp_path, monkeypatch):
    """(review) A --fp32_math tf32 run on an Ampere+ GPU (imitated here: tf32_on says yes, and the
    switches are set on the CPU too) would have failed its own parity check, onnxruntime's IEEE
    FP32 against PyTorch in TF32: the check now runs in IEEE FP32, and only the timed row in TF32."""
    monkeypatch.setattr(inference, "tf32_on", lambda cfg: True)
    assert_parity_in_ieee_and_row_in("tf32", *export_recording_fp32_math(demo, tmp_path, monkeypatch))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp32_math", ["ieee", "tf32"])
def test_export_computes_in_the_runs_fp32_math(demo, tmp_path, monkeypatch, fp32_math):
    """(review) --export did not apply --fp32_math: its "fp32 pytorch" row ran cuDNN's TF32
    convolutions (PyTorch's default) whatever the run used; its parity check is IEEE FP32 always."""
    recorded = export_recording_fp32_math(demo, tmp_path, monkeypatch, "--device", "cuda", "--fp32_math", fp32_math)
    tf32 = fp32_math == "tf32" and torch.cuda.get_device_capability() >= (8, 0)
    assert_parity_in_ieee_and_row_in("tf32" if tf32 else "ieee", *recorded)


def test_predict_onnx_writes_the_csv_of_predict_without_pytorch(demo, tmp_path):
    pictures = demo["data"] / "seg_pred" / "seg_pred"
    code, out, err = cli(
        "--predict",
        "--data_dir",
        demo["data"],
        "--checkpoint_dir",
        demo["runs"],
        "--checkpoint_name",
        "r18",
        "--num_workers",
        "0",
        "--predictions_file",
        tmp_path / "torch.csv",
    )
    assert code == 0, err
    # torch, torchvision and onnx cannot be imported by the script: onnxruntime, numpy and Pillow only.
    blocked = (
        "import runpy, sys; sys.modules.update(torch=None, torchvision=None, onnx=None); "
        f"sys.argv = sys.argv[1:]; runpy.run_path({PREDICT_ONNX!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            blocked,
            PREDICT_ONNX,
            demo["run"] / "model.onnx",
            pictures,
            "--out",
            tmp_path / "onnx.csv",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 12 predictions" in result.stdout
    with open(tmp_path / "torch.csv") as a, open(tmp_path / "onnx.csv") as b:
        expected, got = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [(r["file"], r["label"]) for r in got] == [(r["file"], r["label"]) for r in expected]
    # PIL's bilinear resize and torchvision's differ by at most 1 in a few pixels: confidences by ~1e-4.
    assert max(abs(float(r["confidence"]) - float(e["confidence"])) for r, e in zip(got, expected)) < 2e-3


def test_predict_onnx_refuses_bad_input_in_one_line_and_warns_of_a_truncated_jpeg(demo, tmp_path, capsys):
    import runpy

    predict_onnx = runpy.run_path(PREDICT_ONNX)["main"]
    model, pictures = str(demo["run"] / "model.onnx"), tmp_path / "pictures"
    pictures.mkdir()
    source = demo["data"] / "seg_pred" / "seg_pred"
    whole = next(p for p in sorted(source.rglob("*.jpg")))
    (pictures / "whole.jpg").write_bytes(whole.read_bytes())
    (pictures / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])
    for argv, needle in (
        ([model, str(pictures), "--batch_size", "0"], "--batch_size must be at least 1"),
        ([str(tmp_path / "nothing.onnx"), str(pictures)], "no model file at"),
    ):
        assert predict_onnx([*argv, "--out", str(tmp_path / "x.csv")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert predict_onnx([model, str(pictures), "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 JPEG(s) look truncated" in err and "cut.jpg" in err
    assert [row.split(",")[0] for row in (tmp_path / "p.csv").read_text().splitlines()] == [
        "file",
        "cut.jpg",
        "whole.jpg",
    ]


def test_a_new_run_in_the_folder_removes_the_old_export():
    assert main_module.EXPORT_FILES == export.EXPORT_FILES  # (--overwrite removes main's list: see test_every_flag)


def test_compare_shows_the_inference_rows(demo):
    code, out, err = cli("--compare", "r18", "--checkpoint_dir", demo["runs"])
    assert code == 0, err
    assert "Inference (each run's inference.json" in out
    assert "| r18 | int8 | onnxruntime |" in out and "| r18 | fp32 | pytorch |" in out


# --------------------------------------------------------------------------- other families
# (With ResNet-18 above: three families. SqueezeNet's head is a convolution and it has no BatchNorm;
# MobileNet v3 has depthwise convolutions, squeeze-excitation and hardswish. Every other model:
# benchmarks/export_sweep.py, whose results are in docs/export.md.)
@pytest.mark.parametrize("name", ["squeezenet1_1", "mobilenet_v3_small"])
def test_other_families_export_pass_parity_and_quantize(name, tmp_path):
    data = make_colour_dataset(tmp_path / "data", train_per_class=5, test_per_class=2)
    runs = tmp_path / "checkpoints"
    code, out, err = cli(
        "--data_dir", data, "--checkpoint_dir", runs, "--checkpoint_name", name, "--model", name, *TINY
    )
    assert code == 0, err
    code, out, err = cli("--data_dir", data, "--checkpoint_dir", runs, "--checkpoint_name", name, *EXPORT)
    assert code == 0, err
    rows = {(r["precision"], r["runtime"]): r for r in json.loads((runs / name / "inference.json").read_text())["rows"]}
    assert rows["fp32", "onnxruntime"]["agreement"] >= export.MIN_AGREEMENT
    assert rows["fp32", "onnxruntime"]["max_abs_logit_diff"] < 1e-3
    assert os.path.getsize(runs / name / "model.int8.onnx") < 0.4 * os.path.getsize(runs / name / "model.onnx")
    assert (
        onnxruntime.InferenceSession(str(runs / name / "model.onnx")).get_modelmeta().custom_metadata_map["model"]
        == name
    )


# --------------------------------------------------------------------------- refusals
def test_a_run_without_best_pt_is_refused(demo, tmp_path):
    runs, run = copy_of_run(demo, tmp_path, "no_best")
    (run / "best.pt").unlink()
    before = listing(run)
    assert_one_line(
        cli("--data_dir", demo["data"], "--checkpoint_dir", runs, "--checkpoint_name", "no_best", *EXPORT),
        2,
        "no checkpoint at",
        "best.pt",
    )
    assert listing(run) == before


def test_a_model_the_exporter_refuses_is_named_in_one_line_and_nothing_changes(demo, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            "Failed to convert the exported program to an ONNX model.\nunsupported: aten::frobnicate\n..."
        )

    monkeypatch.setattr(torch.onnx, "export", refuse)
    runs, run = copy_of_run(demo, tmp_path, "refused")  # with an earlier export's files
    before = listing(run)
    assert_one_line(
        cli("--data_dir", demo["data"], "--checkpoint_dir", runs, "--checkpoint_name", "refused", *EXPORT),
        2,
        "--model resnet18 cannot be exported to ONNX",
        "RuntimeError: Failed to convert",
    )
    assert listing(run) == before  # the earlier model.onnx, model.int8.onnx and inference files, no temporary file


def test_a_model_too_large_for_one_onnx_file_is_refused_before_exporting(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ONNX_FILE_LIMIT", 10_000_000)  # ResNet-18's 44.7 MB, as vit_h_14's 2.5 GB
    runs, run = copy_of_run(demo, tmp_path, "large")
    before = listing(run)
    assert_one_line(
        cli("--data_dir", demo["data"], "--checkpoint_dir", runs, "--checkpoint_name", "large", *EXPORT),
        2,
        "--model resnet18 cannot be exported to one ONNX file",
        "take 45 MB",
    )
    assert listing(run) == before


def test_an_export_that_disagrees_with_pytorch_is_an_error_not_a_result(demo, tmp_path, monkeypatch):
    """The exporter's output with its logits negated: every top-1 changes."""
    exported = onnx.load(str(demo["run"] / "model.onnx"))
    exported.graph.node.append(onnx.helper.make_node("Neg", ["logits"], ["negated"]))
    exported.graph.output[0].name = "negated"
    monkeypatch.setattr(export, "export_onnx", lambda *args: exported.SerializeToString())
    runs, run = copy_of_run(demo, tmp_path, "wrong")
    before = listing(run)
    assert_one_line(
        cli("--data_dir", demo["data"], "--checkpoint_dir", runs, "--checkpoint_name", "wrong", *EXPORT),
        1,
        "disagrees with PyTorch",
        "at least 99.9% needed",
        "nothing was written",
    )
    assert listing(run) == before


def test_a_write_that_fails_midway_leaves_the_earlier_files_as_they_were(tmp_path, monkeypatch):
    """The disk fills up while the third of four files is written (os.fsync raising ENOSPC)."""
    for name in export.EXPORT_FILES:
        (tmp_path / name).write_bytes(b"the earlier export's " + name.encode())
    before = listing(tmp_path)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device"):
        utils.atomic_write_files(str(tmp_path), {name: b"new" for name in export.EXPORT_FILES})
    assert listing(tmp_path) == before  # the old four, and no temporary file


@contextlib.contextmanager
def read_only(folder):
    """`folder` made unwritable even for root (the tests run as root, whom chmod does not stop):
    the immutable attribute, which needs chattr and a filesystem that has it (ext4, xfs, btrfs)."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here: no way to make a folder read-only for root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)


def test_a_read_only_run_folder_is_refused_before_any_work(demo, tmp_path):
    runs, run = copy_of_run(demo, tmp_path, "read_only")
    before = listing(run)
    with read_only(run):
        with pytest.raises(OSError):
            (run / "probe").write_text("")  # the folder is really read-only
        assert_one_line(
            cli("--data_dir", demo["data"], "--checkpoint_dir", runs, "--checkpoint_name", "read_only", *EXPORT),
            2,
            f"cannot write to {run}",
            "Operation not permitted",
        )
    assert listing(run) == before


def test_a_badly_calibrated_int8_model_is_named_not_shipped_silently():
    rows = [
        {"precision": "fp32", "runtime": "pytorch", "test_acc": 80.0, "agreement": 100.0},
        {"precision": "int8", "runtime": "onnxruntime", "test_acc": 13.89, "agreement": 13.33},
    ]
    warning = export.int8_warning({"rows": rows, "calibration_images": 480})
    assert warning.startswith("warning: model.int8.onnx gives FP32's top-1 on only 13.33% of the test images")
    assert "FP32 80.00%" in warning and "--calibration_images" in warning and "used 480" in warning
    rows[1]["agreement"] = 96.0
    assert export.int8_warning({"rows": rows, "calibration_images": 16}) == ""
