"""Issue 10's data items: 16-bit PNGs, tiny DDP shares, hidden folders, clear messages, and a
test loader that needs only the test split."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from dataset import build_loaders, find_bad_images, load_image_uint8
from test_data import cfg, make_layout, write_images


def write_png16(path, pixels):
    """A 16-bit RGB PNG of `pixels` (uint16 [H, W, 3]), written by hand: PIL saves no 16-bit RGB."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter byte 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


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
