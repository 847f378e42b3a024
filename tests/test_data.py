"""Finding the data, splitting it, decoding odd images, and what the model sees."""

import os
import shutil
from argparse import Namespace
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceTransform,
    build_datasets,
    find_split_dir,
    load_image_uint8,
    stratified_split,
    use_validation_folder,
)
from utils import UserError


def write_images(folder, n, size=20, mode="RGB", ext="jpg", seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(os.path.join(folder, f"{i}.{ext}"))


def make_layout(root, nested, classes=("cat", "dog", "owl"), n=10):
    for split in ("seg_train", "seg_test"):
        base = os.path.join(root, split, split) if nested else os.path.join(root, split)
        for c in classes:
            write_images(os.path.join(base, c), n)


def cfg(data_dir, **kw):
    return Namespace(
        **{
            "data_dir": str(data_dir),
            "image_size": 16,
            "val_fraction": 0.2,
            "seed": 42,
            "skip_bad_images": False,
            "num_workers": 0,
            **kw,
        }
    )


@pytest.mark.parametrize("nested", [True, False])
def test_kaggle_layouts_are_found_without_flags(tmp_path, nested):
    make_layout(tmp_path, nested)
    train, val, test, classes = build_datasets(cfg(tmp_path))
    assert classes == ["cat", "dog", "owl"]  # from the folders, not hard-coded
    assert (len(train), len(val), len(test)) == (24, 6, 30)
    expected = os.path.join(tmp_path, "seg_train", "seg_train") if nested else os.path.join(tmp_path, "seg_train")
    assert find_split_dir(str(tmp_path), "train") == expected
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)


def test_stratified_split_keeps_class_shares_and_is_fixed_by_seed():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    train, val = stratified_split(targets, 0.2, seed=42)
    assert sorted(train + val) == list(range(100))
    assert Counter(targets[i] for i in val) == {0: 10, 1: 6, 2: 4}
    assert stratified_split(targets, 0.2, seed=42) == (train, val)
    assert stratified_split(targets, 0.2, seed=7)[1] != val


def test_odd_images_are_converted(tmp_path):
    folder = tmp_path / "odd"
    write_images(folder / "gray", 1, size=30, mode="L")
    write_images(folder / "rgba", 1, size=17, mode="RGBA", ext="png")
    write_images(folder / "palette", 1, size=40, mode="P", ext="png")
    write_images(folder / "bmp", 1, size=25, ext="bmp")
    for path in folder.rglob("*.*"):
        image = load_image_uint8(str(path))
        assert image.dtype == torch.uint8 and image.shape[0] == 3, path


def test_missing_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="seg_train/seg_train/<class>"):
        build_datasets(cfg(tmp_path / "nothing"))
    os.makedirs(tmp_path / "empty" / "seg_train")
    os.makedirs(tmp_path / "empty" / "seg_test")
    with pytest.raises(UserError):
        build_datasets(cfg(tmp_path / "empty"))


def test_device_transform_matches_the_reference_transforms():
    """Flip + ToTensor + Normalize on the device equals torchvision's PIL-style pipeline."""
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    reference = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    plain = DeviceTransform("cpu")(images)
    expected = torch.stack([reference(img.float() / 255) for img in images])
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)

    flipped = DeviceTransform("cpu")(images, flip_seed=3)
    again = DeviceTransform("cpu", channels_last=True)(images, flip_seed=3)
    torch.testing.assert_close(flipped, again)  # same seed, same flips; memory format changes nothing
    for got, want in zip(flipped, expected):  # every image is either itself or its mirror
        assert torch.allclose(got, want, atol=1e-5) or torch.allclose(got, want.flip(-1), atol=1e-5)
    seeds = [DeviceTransform("cpu")(images, flip_seed=s) for s in range(20)]
    assert any(not torch.allclose(s, plain) for s in seeds) and any(torch.allclose(s, plain) for s in seeds)


# --------------------------------------------------------------------------- a validation folder (issue 30)
def make_torchvision_layout(root, splits=("train", "val", "test"), classes=("cat", "dog", "owl")):
    """train/, val/ (and test/) of class folders, as torchvision's reference and timm read ImageNet."""
    for split, n in (("train", 10), ("val", 4), ("test", 5)):
        if split in splits:
            for c in classes:
                write_images(os.path.join(root, split, c), n)


def test_a_val_folder_is_the_validation_split_and_train_is_all_of_train(tmp_path):
    make_torchvision_layout(tmp_path)
    train, val, test, classes = build_datasets(cfg(tmp_path, val_fraction=None))
    assert classes == ["cat", "dog", "owl"]
    assert (len(train), len(val), len(test)) == (30, 12, 15)
    assert os.path.dirname(os.path.dirname(val.samples[0][0])) == str(tmp_path / "val")


def test_train_and_val_without_test_say_what_was_found_and_what_to_do(tmp_path):
    make_torchvision_layout(tmp_path, splits=("train", "val"))
    with pytest.raises(UserError) as error:
        build_datasets(cfg(tmp_path))
    message = str(error.value)
    assert message.startswith(f"no test split found in {tmp_path}, only a training split and a validation split")
    assert f"({tmp_path}/val," in message and "--test_fraction F" in message and "rename" in message
    # --test_fraction holds the test split out of train/; val/ still validates
    train, val, test, _ = build_datasets(cfg(tmp_path, val_fraction=None, test_fraction=0.2))
    assert (len(train), len(val), len(test)) == (24, 12, 6)


def test_val_classes_must_be_the_training_classes(tmp_path):
    make_torchvision_layout(tmp_path)
    shutil.rmtree(tmp_path / "val" / "owl")
    with pytest.raises(UserError, match=r"the validation classes in .*/val \(cat, dog\) differ from the training"):
        build_datasets(cfg(tmp_path, val_fraction=None))


def test_val_fraction_is_refused_beside_a_val_folder_and_recorded_as_unused(tmp_path):
    make_torchvision_layout(tmp_path)
    with pytest.raises(UserError, match=r"--val_fraction .* has a validation split of its own .*; drop --val_fraction"):
        use_validation_folder(cfg(tmp_path), {"val_fraction"})
    settings = cfg(tmp_path)
    use_validation_folder(settings, set())
    assert settings.val_fraction is None  # config.json: no share of train/ was split off
    kaggle = cfg(tmp_path / "kaggle")
    make_layout(tmp_path / "kaggle", nested=True)
    use_validation_folder(kaggle, {"val_fraction"})  # no validation folder: the flag does its job
    assert kaggle.val_fraction == 0.2 and len(build_datasets(kaggle)[1]) == 6


def test_a_run_on_a_torchvision_layout_validates_on_val(run_cli, tmp_path):
    import json

    from conftest import FAST, SMALL_MODEL, assert_user_error, make_colour_dataset

    data = tmp_path / "imagenet_like"
    make_colour_dataset(data, train_per_class=6, test_per_class=4)
    os.rename(data / "seg_train" / "seg_train", data / "train")
    shutil.copytree(data / "seg_test" / "seg_test", data / "val")
    os.rename(data / "seg_test" / "seg_test", data / "test")
    for kaggle in ("seg_train", "seg_test"):
        os.rmdir(data / kaggle)
    flags = ["--data-path", data, "--epochs", "1", *FAST, *SMALL_MODEL]
    assert_user_error(run_cli(*flags, "--val_fraction", "0.1"), "--val_fraction", f"{data}/val")
    code, out, err = run_cli(*flags)
    assert code == 0, err
    run_dir = tmp_path / "checkpoints" / "baseline"
    assert json.loads((run_dir / "config.json").read_text())["val_fraction"] is None
    assert f"validation split: {data}/val (12 images)" in (run_dir / "train.log").read_text()
    shutil.rmtree(run_dir)


def test_resume_keeps_its_fraction_split_when_a_val_folder_appears(run_cli, tmp_path, monkeypatch):
    """A val/ folder added while a run is stopped does not change what --resume validates on:
    the run keeps its --val_fraction split (same sizes) and says once why val/ is unused."""
    from conftest import FAST, SMALL_MODEL, SimulatedCrash, crash_in_epoch, make_colour_dataset

    import dataset

    data = make_colour_dataset(tmp_path / "colours", train_per_class=10, test_per_class=4)
    sizes = []
    original = dataset.build_datasets

    def recording(cfg, progress=False):
        train, val, test, classes = original(cfg, progress)
        sizes.append((len(train), len(val), len(test)))
        return train, val, test, classes

    monkeypatch.setattr(dataset, "build_datasets", recording)
    restore = crash_in_epoch(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        run_cli("--data_dir", data, "--epochs", "2", *FAST, *SMALL_MODEL)
    restore()
    shutil.copytree(os.path.join(data, "seg_test", "seg_test"), os.path.join(data, "val"))
    code, out, err = run_cli("--data_dir", data, "--resume", "--no_progress")
    assert code == 0, err
    assert sizes == [(24, 6, 12), (24, 6, 12)]  # 30 training images, 0.2 of them validate, both times
    note = f"{data}/val is not used: this run validates on its --val_fraction 0.2 split"
    run_dir = tmp_path / "checkpoints" / "baseline"
    assert note in out and (run_dir / "train.log").read_text().count(note) == 1
    shutil.rmtree(run_dir)
