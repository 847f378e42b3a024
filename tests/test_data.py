"""Finding the data, splitting it, decoding odd images, and what the model sees."""

import os
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
