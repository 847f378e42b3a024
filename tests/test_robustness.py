"""Every bad input gets a clear answer: bad images, odd datasets, bad settings, corrupt or
malicious checkpoints, failed writes and diverging runs. Nothing saved is ever damaged."""

import errno
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import FAST, make_colour_dataset, read_results
from PIL import Image
from test_cli import assert_user_error

import utils


@pytest.fixture
def data(tmp_path, demo_data):
    """A private copy of the colour dataset that a test may damage."""
    return shutil.copytree(demo_data, tmp_path / "data")


def train_dir(data, cls="red"):
    return os.path.join(data, "seg_train", "seg_train", cls)


def run(run_cli, data, *flags):
    return run_cli("--data_dir", data, "--epochs", "1", *FAST, *flags)


# --------------------------------------------------------------------------- bad images
@pytest.mark.parametrize("kind", ["zero_byte", "text_as_jpg"])
def test_unreadable_image_stops_before_training_or_is_skipped(run_cli, data, tmp_path, kind):
    bad = os.path.join(train_dir(data), "bad.jpg")
    with open(bad, "wb") as f:
        f.write(b"" if kind == "zero_byte" else b"this is not a picture\n")
    assert_user_error(run(run_cli, data), bad, "--skip_bad_images")
    assert not (tmp_path / "checkpoints" / "baseline" / "last.pt").exists()  # stopped before training

    code, out, err = run(run_cli, data, "--skip_bad_images")
    assert code == 0, err
    log = (tmp_path / "checkpoints" / "baseline" / "train.log").read_text()
    assert "left out 1 unreadable image" in log and bad in log


def test_truncated_jpeg_trains_with_a_warning_or_is_skipped(run_cli, data, tmp_path):
    good = os.path.join(train_dir(data), "0.jpg")
    cut = os.path.join(train_dir(data), "cut.jpg")
    payload = open(good, "rb").read()
    open(cut, "wb").write(payload[: len(payload) * 3 // 4])  # headers intact, pixels cut
    code, out, err = run(run_cli, data)
    assert code == 0, err
    assert "look truncated" in out and "cut.jpg" in out
    code, out, err = run(run_cli, data, "--skip_bad_images", "--overwrite")
    assert code == 0, err
    assert "cut.jpg" in (tmp_path / "checkpoints" / "baseline" / "train.log").read_text()
    assert read_results(tmp_path / "checkpoints" / "baseline")["finished"]


def test_empty_class_folder(run_cli, data):
    os.makedirs(train_dir(data, "yellow"))
    os.makedirs(os.path.join(data, "seg_test", "seg_test", "yellow"))
    assert_user_error(run(run_cli, data), "yellow")


def test_test_classes_must_match_training_classes(run_cli, data):
    shutil.rmtree(os.path.join(data, "seg_test", "seg_test", "red"))
    assert_user_error(run(run_cli, data), "differ")


def test_one_class_is_not_a_classifier(run_cli, tmp_path):
    root = make_colour_dataset(tmp_path / "one")
    for split in ("seg_train", "seg_test"):
        for cls in ("green", "blue"):
            shutil.rmtree(os.path.join(root, split, split, cls))
    assert_user_error(run(run_cli, root), "at least 2")


def test_ten_images_with_batch_256_train(run_cli, tmp_path):
    root = make_colour_dataset(tmp_path / "ten", train_per_class=5, test_per_class=2)
    code, _, err = run_cli("--data_dir", root, "--epochs", "2", *FAST, "--batch_size", "256")
    assert code == 0, err
    results = read_results(tmp_path / "checkpoints" / "baseline")
    assert results["finished"] and len(results["epochs"]) == 2


def test_grayscale_rgba_png_and_odd_sizes_train(run_cli, tmp_path):
    root = make_colour_dataset(tmp_path / "odd", train_per_class=8, test_per_class=2)
    rng = np.random.default_rng(0)
    for i, (mode, size, ext) in enumerate([("L", (31, 17), "jpg"), ("RGBA", (40, 40), "png"), ("P", (9, 50), "png")]):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(os.path.join(train_dir(root), f"odd{i}.{ext}"))
    code, _, err = run_cli("--data_dir", root, "--epochs", "1", *FAST)
    assert code == 0, err


# --------------------------------------------------------------------------- bad settings
def test_device_cuda_without_a_gpu(run_cli, demo_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    flags = [f for f in FAST if f not in ("--device", "cpu")]
    assert_user_error(run_cli("--data_dir", demo_data, *flags, "--device", "cuda"), "no CUDA GPU")


def test_bfloat16_on_a_gpu_without_it(monkeypatch):
    import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(utils.UserError, match="V100 has no bfloat16"):
        config.parse_config(["--device", "cuda", "--amp", "--amp_dtype", "bfloat16"])


@pytest.mark.parametrize(
    "flags",
    [
        ["--save_every_steps", "-1"],
        ["--accum_steps", "0"],
        ["--clip_grad_norm", "0"],
        ["--val_fraction", "0"],
        ["--warmup_epochs", "-1"],
    ],
)
def test_more_bad_values(run_cli, demo_data, flags):
    assert_user_error(run_cli("--data_dir", demo_data, *FAST, *flags), flags[0])


def test_resume_refuses_a_different_image_size_or_classes(run_cli, data, tmp_path):
    assert run(run_cli, data)[0] == 0
    run_dir = tmp_path / "checkpoints" / "baseline"
    # As if stopped during its final test: --resume would test it (a finished run has nothing to resume).
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "finished": False}))
    before = {f: (run_dir / f).read_bytes() for f in ("last.pt", "best.pt", "results.json", "config.json")}
    assert_user_error(run_cli("--data_dir", data, "--resume", "--image_size", "48"), "--image_size 32")
    os.makedirs(train_dir(data, "yellow"))
    for src in ("0.jpg", "1.jpg"):
        shutil.copy(os.path.join(train_dir(data), src), train_dir(data, "yellow"))
    os.makedirs(os.path.join(data, "seg_test", "seg_test", "yellow"))
    shutil.copy(os.path.join(train_dir(data), "2.jpg"), os.path.join(data, "seg_test", "seg_test", "yellow"))
    assert_user_error(run_cli("--data_dir", data, "--resume"), "classes")
    assert before == {f: (run_dir / f).read_bytes() for f in before}


# --------------------------------------------------------------------------- checkpoints
class _Exploit:
    """A pickle whose loading would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["truncated", "foreign", "malicious"])
def test_bad_checkpoints_are_refused(run_cli, demo_data, tmp_path, how):
    assert run(run_cli, demo_data)[0] == 0
    run_dir = tmp_path / "checkpoints" / "baseline"
    marker = tmp_path / "pwned"
    for name in ("last.pt", "best.pt"):
        path = run_dir / name
        if how == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
        elif how == "foreign":
            torch.save({"weights": torch.zeros(3)}, path)
        else:
            with open(path, "wb") as f:
                pickle.dump({"model": _Exploit(str(marker))}, f, protocol=2)
    assert_user_error(run_cli("--data_dir", demo_data, "--resume"), "last.pt")
    assert_user_error(run_cli("--data_dir", demo_data, "--evaluate", *FAST), "best.pt")
    assert not marker.exists()


def test_a_failed_write_keeps_the_previous_checkpoint(run_cli, demo_data, tmp_path, monkeypatch):
    real_save = torch.save
    last_writes = []

    def disk_full_on_second_last_pt(obj, f, *args, **kwargs):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{f.fileno()}"):  # the temporary file's name
            last_writes.append(1)
            if len(last_writes) == 2:
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_last_pt)  # (utils imports torch when it saves)
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "3", *FAST)
    assert code == 1 and err.count("\n") == 1, err
    assert "No space left on device" in err and "previous last.pt is intact" in err
    run_dir = tmp_path / "checkpoints" / "baseline"
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1  # the previous one, whole


def test_a_failed_results_or_plot_write_stops_with_one_line(run_cli, demo_data, tmp_path, monkeypatch):
    import outputs

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "plot_curves", disk_full)
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "2", *FAST)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot write" in err and "curves.png" in err and "No space left on device" in err
    run_dir = tmp_path / "checkpoints" / "baseline"
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1  # saved before the failed plot


# --------------------------------------------------------------------------- numerical faults
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(run_cli, demo_data, tmp_path, monkeypatch):
    import step

    real_loss = step.F.cross_entropy
    calls = []

    def nan_after_first_epoch(logits, targets, *a, **k):
        calls.append(1)
        loss = real_loss(logits, targets, *a, **k)
        return loss * float("nan") if len(calls) > 3 else loss  # 3 training batches an epoch

    monkeypatch.setattr(step.F, "cross_entropy", nan_after_first_epoch)
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "3", *FAST)
    assert code == 1, err
    assert err.count("\n") == 1 and "diverged" in err and "--learning_rate" in err and "bfloat16" in err
    last = torch.load(tmp_path / "checkpoints" / "baseline" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path):
    # (found by review: --pretrained_path RUN/results.json said it "holds Python objects")
    json_file, pickle_file = tmp_path / "results.json", tmp_path / "objects.pt"
    json_file.write_text('{"test_acc": 80.0}')
    with open(pickle_file, "wb") as f:
        pickle.dump({"model": _Exploit(str(tmp_path / "pwned"))}, f, protocol=2)
    for path, words in ((json_file, "not a PyTorch file"), (pickle_file, "Python objects besides tensors")):
        with pytest.raises(Exception) as caught:
            torch.load(path, weights_only=True)
        assert words in utils.torch_load_error(caught.value)
    assert not (tmp_path / "pwned").exists()
