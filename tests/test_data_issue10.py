"""Issue 10's data items: 16-bit PNGs, tiny DDP shares, hidden folders, clear messages, and a
test loader that needs only the test split."""

import logging
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import cfg, make_layout, write_images
from torchvision.io import ImageReadMode, decode_image

from dataset import (
    EpochSampler,
    UnlabeledImages,
    build_datasets,
    build_loaders,
    build_test_loader,
    error_summary,
    find_bad_images,
    human_bytes,
    load_image_uint8,
)
from utils import UserError


def write_png16(path, pixels):
    """A 16-bit RGB PNG of `pixels` (uint16 [H, W, 3]), written by hand: PIL saves no 16-bit RGB."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter byte 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        )


def png16_with_known_values(path, size=6):
    pixels = np.zeros((size, size, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 65535, 32896, 257
    write_png16(path, pixels)
    assert decode_image(str(path), mode=ImageReadMode.RGB).dtype == torch.uint16  # really a 16-bit file
    return str(path)


# --------------------------------------------------------------------------- 16-bit PNGs (item 4)
def test_16_bit_png_loads_as_scaled_uint8(tmp_path):
    image = load_image_uint8(png16_with_known_values(tmp_path / "deep.png"))
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 6)
    assert image[:, 0, 0].tolist() == [255, 128, 1]


@pytest.mark.parametrize("ext", ["png", "tif"])  # torchvision decodes the PNG, PIL the TIFF
def test_16_bit_grayscale_loads_as_scaled_uint8(tmp_path, ext):
    gray = np.full((5, 4), 32896, dtype=np.uint16)
    gray[0, 0] = 65535
    path = tmp_path / f"gray16.{ext}"
    Image.fromarray(gray).save(path)  # PIL saves uint16 as 16-bit grayscale ("I;16")
    image = load_image_uint8(str(path))
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 4)
    assert image[:, 0, 0].tolist() == [255] * 3 and image[:, 1, 1].tolist() == [128] * 3


def test_16_bit_and_8_bit_images_batch_together(tmp_path):
    make_layout(tmp_path, nested=True, classes=("cat", "dog"), n=4)
    for split in ("seg_train", "seg_test"):
        for cls in ("cat", "dog"):
            png16_with_known_values(tmp_path / split / split / cls / "deep.png", size=20)
    assert not find_bad_images([str(tmp_path / "seg_train/seg_train/cat/deep.png")], decode=False)
    assert not find_bad_images([str(tmp_path / "seg_train/seg_train/cat/deep.png")], decode=True)
    # The quick check, the one that decodes every image, and --cache (which decodes before training)
    for flags in ({}, {"skip_bad_images": True}, {"cache": True}):
        loaders = build_loaders(cfg(tmp_path, batch_size=64, **flags), "cpu")[:3]
        for loader in loaders:
            images, _ = next(iter(loader))  # every split mixes both kinds in its one batch
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
        assert len(loaders[2].dataset) == 10


# --------------------------------------------------------------------------- tiny DDP shares (item 6)
@pytest.mark.parametrize("size,world_size", [(3, 8), (1, 4), (7, 2), (10, 3), (8, 4)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_training_pads_every_rank_to_the_same_share(size, world_size, shuffle):
    shares = [
        list(EpochSampler(size, shuffle, seed=1, rank=r, world_size=world_size, pad=True)) for r in range(world_size)
    ]
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) > 0
    assert len(shares[0]) == -(-size // world_size)  # padded no further than needed
    assert {i for share in shares for i in share} == set(range(size))  # every image is used


@pytest.mark.parametrize("size,world_size", [(3, 8), (1, 4), (7, 2)])
def test_evaluation_shares_are_not_padded(size, world_size):
    shares = [list(EpochSampler(size, False, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sorted(i for share in shares for i in share) == list(range(size))  # each image once


def test_training_pads_to_a_minimum_share():
    shares = [list(EpochSampler(3, True, rank=r, world_size=8, pad=True, min_per_rank=2)) for r in range(8)]
    assert all(len(share) == 2 for share in shares)
    assert {i for share in shares for i in share} == {0, 1, 2}
    assert len(EpochSampler(20, True, world_size=8, pad=True, min_per_rank=2)) == 3  # a bigger share is kept


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("batch_size", [2, 3, 4, 16])
def test_no_rank_trains_on_a_batch_of_one_image(tmp_path, world_size, batch_size):
    """BatchNorm cannot train on one image (per rank, without --sync_bn): no such batch, even
    with fewer training images than processes; and every rank has as many batches."""
    make_layout(tmp_path, nested=True, classes=("cat", "dog"), n=3)  # 4 train, 2 val, 6 test images
    batch_counts = set()
    for rank in range(world_size):
        train = build_loaders(cfg(tmp_path, batch_size=batch_size), "cpu", rank, world_size)[0]
        batches = list(train.batch_sampler)
        assert batches and all(len(b) > 1 for b in batches) or train.batch_size == 1, batches
        batch_counts.add(len(batches))
    assert len(batch_counts) == 1


# --------------------------------------------------------------------------- hidden folders (item 15)
def test_hidden_folders_and_files_are_not_classes_or_samples(tmp_path):
    make_layout(tmp_path, nested=True, classes=("cat", "dog"), n=5)
    for split in ("seg_train", "seg_test"):
        base = tmp_path / split / split
        write_images(base / ".ipynb_checkpoints", 2)  # Jupyter's copies: a folder of images
        os.makedirs(base / ".cache")  # and one without any
        write_images(base / "cat" / ".ipynb_checkpoints", 2)  # hidden folder inside a class
        (base / "dog" / "._0.jpg").write_bytes(b"macOS resource fork, not a picture")
    train, val, test, classes = build_datasets(cfg(tmp_path))
    assert classes == ["cat", "dog"] and test.classes == ["cat", "dog"]
    assert (len(train) + len(val), len(test)) == (10, 10)
    assert not any("/." in path for path, _ in test.samples)


def test_hidden_files_are_not_images_to_label(tmp_path):
    write_images(tmp_path / "pred", 2)
    write_images(tmp_path / "pred" / ".ipynb_checkpoints", 2)
    (tmp_path / "pred" / ".0.jpg").write_bytes(b"hidden")
    assert UnlabeledImages(str(tmp_path / "pred"), 16).files == ["0.jpg", "1.jpg"]


def test_a_hidden_data_dir_is_still_read(tmp_path):
    """Only names below the split folder count: data kept under ~/.cache is fine."""
    make_layout(tmp_path / ".cache" / "data", nested=True, classes=("cat", "dog"), n=5)
    assert len(build_datasets(cfg(tmp_path / ".cache" / "data"))[2]) == 10


# --------------------------------------------------------------------------- messages (item 17)
def test_human_bytes():
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(int(3.4 * 2**20)) == "3.4 MiB"
    assert human_bytes(2**30 - 2**20) == "1023.0 MiB"
    assert human_bytes(2**30) == "1.00 GiB" and human_bytes(int(2.5 * 2**30)) == "2.50 GiB"


def test_cache_logs_a_readable_size(tmp_path, caplog, monkeypatch):
    make_layout(tmp_path, nested=True, classes=("cat", "dog"), n=5)  # 20 images of 3x16x16 bytes
    monkeypatch.setattr(logging.getLogger("amp"), "propagate", True)  # a run earlier in the suite turned it off
    with caplog.at_level(logging.INFO, logger="amp"):
        build_loaders(cfg(tmp_path, batch_size=4, cache=True), "cpu")
    assert "decoded into 15.0 KiB of RAM" in caplog.text, caplog.text


def broken_files(folder):
    """A truncated JPEG, a truncated PNG, a text file named .jpg, an empty PNG and a bad BMP."""
    write_images(folder, 1, size=40)
    write_images(folder, 1, size=40, ext="png")
    jpeg, png = (folder / "0.jpg").read_bytes(), (folder / "0.png").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "text.jpg").write_bytes(b"this is not a picture\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "junk.bmp").write_bytes(b"BM" + b"junk" * 10)
    return [str(folder / name) for name in ("cut.jpg", "cut.png", "text.jpg", "empty.png", "junk.bmp")]


def test_skip_bad_images_reasons_are_one_clean_line(tmp_path):
    paths = broken_files(tmp_path)
    reasons = find_bad_images(paths + [str(tmp_path / "0.jpg"), str(tmp_path / "0.png")], decode=True)
    assert sorted(reasons) == sorted(paths)
    for reason in reasons.values():
        assert reason.startswith("not a decodable image (") and reason.endswith(")"), reason
        for junk in ("csrc", ".cpp", "Exception raised from", "frame #", "\n"):
            assert junk not in reason, reason
    assert reasons[paths[0]] == "not a decodable image (Image is incomplete or truncated)"
    assert reasons[paths[2]] == "not a decodable image (Unsupported image file)"


def test_error_summary_drops_cpp_locations_and_stack_frames():
    compact = RuntimeError(
        "decode_jpeg, /__w/vision/vision/pytorch/vision/torchvision/csrc/io/image/cpu/"
        "decode_jpeg.cpp:171, Image is incomplete or truncated"
    )
    with_frames = RuntimeError(
        "Unsupported image file. Only jpeg, png, webp and gif are currently supported.\n"
        "Exception raised from decode_image at /pytorch/vision/torchvision/csrc/io/image/cpu/decode_image.cpp:67 "
        "(most recent call first):\nframe #0: c10::Error::Error(c10::SourceLocation) + 0x96 (0x7f in libc10.so)\n"
    )
    assert error_summary(compact) == "Image is incomplete or truncated"
    assert error_summary(with_frames) == "Unsupported image file"
    assert error_summary(OSError("cannot identify image file 'a.bmp'")) == "cannot identify image file 'a.bmp'"
    assert error_summary(ValueError()) == "ValueError"


def test_missing_data_dir_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"--data_dir {missing} does not exist") as error:
        build_datasets(cfg(missing))
    assert "seg_train/seg_train/<class>" in str(error.value) and "--demo" in str(error.value)
    assert "\n" not in str(error.value)
    os.makedirs(missing)
    with pytest.raises(
        UserError, match=f"no training split found in {missing}: expected .*seg_train/seg_train/<class>"
    ):
        build_datasets(cfg(missing))


# --------------------------------------------------------------------------- test split alone (item 11)
@pytest.mark.parametrize("world_size", [1, 2])
def test_test_loader_needs_only_the_test_split(tmp_path, world_size):
    full, test_only = tmp_path / "full", tmp_path / "test_only"
    make_layout(full, nested=True, classes=("cat", "dog", "owl"), n=7)
    shutil.copytree(full / "seg_test", test_only / "seg_test")
    for rank in range(world_size):
        settings = cfg(test_only, batch_size=4)
        loader, classes = build_test_loader(settings, "cpu", rank, world_size)
        *_, reference, reference_classes = build_loaders(cfg(full, batch_size=4), "cpu", rank, world_size)
        assert classes == reference_classes == ["cat", "dog", "owl"]
        assert len(loader) == len(reference) > 0
        for (images, targets), (want_images, want_targets) in zip(loader, reference):
            assert torch.equal(images, want_images) and torch.equal(targets, want_targets)


def test_test_loader_checks_the_test_images(tmp_path):
    make_layout(tmp_path, nested=True, classes=("cat", "dog"), n=3)
    shutil.rmtree(tmp_path / "seg_train")
    (tmp_path / "seg_test" / "seg_test" / "cat" / "bad.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="bad.jpg: empty file"):
        build_test_loader(cfg(tmp_path, batch_size=4), "cpu")
    loader, _ = build_test_loader(cfg(tmp_path, batch_size=4, skip_bad_images=True), "cpu")
    assert len(loader.dataset) == 6


def test_test_loader_names_what_it_looked_for(tmp_path):
    make_layout(tmp_path, nested=True, classes=("cat", "dog"), n=3)
    shutil.rmtree(tmp_path / "seg_test")
    with pytest.raises(UserError, match="no test split found") as error:
        build_test_loader(cfg(tmp_path, batch_size=4), "cpu")
    message = str(error.value)
    assert f"{tmp_path}/seg_test/seg_test/<class>" in message and "seg_train" not in message
    with pytest.raises(UserError, match="does not exist"):
        build_test_loader(cfg(tmp_path / "nowhere", batch_size=4), "cpu")
