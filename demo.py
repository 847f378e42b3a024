"""The demo dataset: six classes of generated pictures (stripes, checkerboards, circles, ...)
written in the Kaggle layout, so the template runs end to end without a download."""

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from utils import UserError

DEMO_CLASSES = ("checkerboard", "circles", "diagonal", "horizontal_stripes", "squares", "vertical_stripes")


def _demo_image(kind, generator, size):
    """A procedural picture: the pattern gives the class; colours, phase, scale and noise vary."""

    def rand(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def colour():
        return tuple(int(rand(0, 255)) for _ in range(3))

    background, ink = colour(), colour()
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    period = int(rand(size / 10, size / 5))
    offset = int(rand(0, period))
    half = max(period // 2, 1)
    for k in range(-size, 2 * size, period):
        p = k + offset
        if kind == "horizontal_stripes":
            draw.rectangle([0, p, size, p + half], fill=ink)
        elif kind == "vertical_stripes":
            draw.rectangle([p, 0, p + half, size], fill=ink)
        elif kind == "diagonal":
            draw.polygon([(p, 0), (p + half, 0), (p + half - size, size), (p - size, size)], fill=ink)
        elif kind == "checkerboard":
            for j in range(-size, 2 * size, period):
                if ((k + j) // period) % 2 == 0:
                    draw.rectangle([p, j + offset, p + half * 2, j + offset + half * 2], fill=ink)
    for _ in range(int(rand(3, 8)) if kind in ("circles", "squares") else 0):
        r = rand(size / 12, size / 5)
        cx, cy = rand(r, size - r), rand(r, size - r)
        box = [cx - r, cy - r, cx + r, cy + r]
        (draw.ellipse if kind == "circles" else draw.rectangle)(box, fill=ink)
    noise = (torch.randn(size, size, 3, generator=generator) * 12).round()
    pixels = (torch.from_numpy(np.array(img)).float() + noise).clamp(0, 255).byte()
    return Image.fromarray(pixels.numpy())


def foreign_entries(root):
    """What is in `root` that a (perhaps interrupted) demo generation would not have written."""
    if not os.path.isdir(root):
        return []
    foreign = [name for name in os.listdir(root) if name not in ("seg_train", "seg_test", "seg_pred")]
    for split in ("seg_train", "seg_test"):
        outer, inner = os.path.join(root, split), os.path.join(root, split, split)
        if os.path.isdir(outer):
            foreign += [os.path.join(split, name) for name in os.listdir(outer) if name != split]
        if os.path.isdir(inner):
            foreign += [os.path.join(split, split, name) for name in os.listdir(inner) if name not in DEMO_CLASSES]
    return foreign


def make_demo_dataset(root, train_per_class=100, test_per_class=30, size=150, seed=0):
    """Write a six-class generated dataset in the Kaggle layout under `root` (if not there)."""
    done_marker = os.path.join(root, ".complete")
    if os.path.exists(done_marker):
        return False
    foreign = foreign_entries(root)
    if foreign:  # never write generated pictures into the user's own data
        raise UserError(
            f"--demo writes its generated dataset to --data_dir {root}, which holds other things "
            f"({foreign[0]}); give an empty or new folder, or leave --data_dir out (data/demo)"
        )
    generator = torch.Generator().manual_seed(seed)
    for split, per_class in (("seg_train", train_per_class), ("seg_test", test_per_class)):
        for kind in DEMO_CLASSES:
            folder = os.path.join(root, split, split, kind)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                _demo_image(kind, generator, size).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
    pred = os.path.join(root, "seg_pred", "seg_pred")
    os.makedirs(pred, exist_ok=True)
    for i in range(2 * len(DEMO_CLASSES)):
        kind = DEMO_CLASSES[i % len(DEMO_CLASSES)]
        _demo_image(kind, generator, size).save(os.path.join(pred, f"{i:04d}.jpg"), quality=90)
    open(done_marker, "w").close()
    return True
