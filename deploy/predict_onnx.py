"""Label a folder of images with a model.onnx written by `main.py --export`, without PyTorch: this
script needs only onnxruntime, numpy and Pillow. It writes the CSV that `main.py --predict` writes
(file,label,confidence; one row per image, sorted by file, paths relative to the folder; confidence
is the softmax probability of the label).

    python deploy/predict_onnx.py checkpoints/NAME/model.onnx my_photos/ --out my_photos.csv

Everything the model needs is in the file's metadata: the class names and the preprocessing
(decode to RGB, resize to `resize` x `resize`, center-crop to `crop` x `crop`, uint8 NCHW; the
graph divides by 255 and normalizes with `mean` and `std` itself)."""

import argparse
import csv
import io
import json
import os
import sys

import numpy as np
import onnxruntime
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as in training: a truncated JPEG loads with its missing part gray
# torchvision's IMG_EXTENSIONS, which --predict reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """A mistake in the input: one line on stderr, exit code 2."""


class OnnxClassifier:
    """model.onnx on onnxruntime's CPU provider, with the preprocessing its metadata describes."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise UserError(f"no model file at {path}: main.py --export writes checkpoints/NAME/model.onnx")
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:  # missing, truncated or not an ONNX file
            raise UserError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in ("class_names", "resize", "crop", "input_name") if key not in meta]
        if missing:
            raise UserError(f"{path} has no {', '.join(missing)} in its metadata: export it with main.py --export")
        self.class_names = json.loads(meta["class_names"])
        self.resize, self.crop, self.input_name = int(meta["resize"]), int(meta["crop"]), meta["input_name"]

    def load(self, path):
        """An image file as the model takes it: uint8 [3, crop, crop], RGB."""
        with Image.open(path) as image:
            if image.mode.startswith("I;16"):  # 16-bit gray: scaled to 8 bits, as --predict does
                gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
                image = Image.fromarray(gray).convert("RGB")
            else:
                image = image.convert("RGB")
            image = image.resize((self.resize, self.resize), Image.BILINEAR)  # antialiased, as training's resize
        top = int(round((self.resize - self.crop) / 2.0))  # torchvision's CenterCrop
        pixels = np.asarray(image)[top : top + self.crop, top : top + self.crop]
        return pixels.transpose(2, 0, 1)

    def predict(self, images):
        """(label, confidence) for each image of a uint8 batch [B, 3, crop, crop]."""
        logits = self.session.run(None, {self.input_name: images})[0].astype(np.float32)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return [(self.class_names[k], p, self.class_names[k2], p2) for k, p, k2, p2 in top_two(probabilities)]


# Top two classes closer than this in probability: a near-tie, which --predict (PyTorch, torchvision's
# resize) and this script (onnxruntime, PIL's resize) may label differently. main.py's NEAR_TIE.
NEAR_TIE = 0.005


def top_two(probabilities):
    """Per row of [N, classes] probabilities: (top-1 index, its probability, runner-up index, its
    probability). An exact tie goes to the class listed first, as main.py --predict breaks it."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :2]
    return [(int(a), float(row[a]), int(b), float(row[b])) for row, (a, b) in zip(probabilities, order)]


def near_tie_note(rows):
    """A line naming the near-ties among (file, label, confidence, runner-up, its confidence) rows ('' if none)."""
    ties = [r for r in rows if r[2] - r[4] < NEAR_TIE]
    if not ties:
        return ""
    file, label, p, other, q = ties[0]
    return (
        f"note: {len(ties)} image(s) are near-ties (top two classes within {NEAR_TIE} in probability), e.g. {file}: "
        f"{label} {p:.4f}, {other} {q:.4f}; --predict and deploy/predict_onnx.py may label them differently"
    )


def image_files(root):
    """The image files under `root` at any depth, relative to it and sorted; hidden files and
    folders (.ipynb_checkpoints, ._photo.jpg) left out, as --predict does."""
    files = []
    for folder, _, names in os.walk(root):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), root)
            if name.lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in relative.split(os.sep)):
                files.append(relative)
    return sorted(files)


def looks_truncated(path):
    """A JPEG whose last bytes are not the end-of-image marker was probably cut off (as main.py checks)."""
    if not path.lower().endswith((".jpg", ".jpeg")):
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 2:
            return True
        f.seek(-2, os.SEEK_END)
        return f.read() != b"\xff\xd9"


def label_folder(classifier, root, batch_size):
    """([(file, label, confidence, runner-up label, its confidence)], [unreadable file: reason])."""
    rows, unreadable, batch, names = [], [], [], []
    files = image_files(root)
    for i, file in enumerate(files):
        try:
            batch.append(classifier.load(os.path.join(root, file)))
            names.append(file)
        except Exception as exc:  # PIL raises many kinds for a bad file
            unreadable.append(f"cannot read image {os.path.join(root, file)}: {exc}")
        if batch and (len(batch) == batch_size or i == len(files) - 1):
            rows += [(name, *answer) for name, answer in zip(names, classifier.predict(np.stack(batch)))]
            batch, names = [], []
    return rows, unreadable


def write_csv(path, rows):
    """`rows` as --predict's CSV (sorted by file, confidence to 4 decimals), written to a
    temporary file first and renamed, so an earlier file is never left half-written."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("file", "label", "confidence"))
    for file, label, confidence, *_ in sorted(rows):
        writer.writerow((file, label, f"{confidence:.4f}"))
    temporary = f"{path}.tmp"
    with open(temporary, "w", newline="") as f:
        f.write(text.getvalue())
    os.replace(temporary, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("model", help="a model.onnx written by main.py --export")
    parser.add_argument("folder", help="the folder of images to label (at any depth)")
    parser.add_argument("--out", default="predictions.csv", help="where to write the CSV")
    parser.add_argument("--batch_size", type=int, default=32, help="images per onnxruntime call")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
        if not os.path.isdir(args.folder):
            raise UserError(f"{args.folder} is not a folder of images")
        classifier = OnnxClassifier(args.model)
        rows, unreadable = label_folder(classifier, args.folder, args.batch_size)
        if not rows:
            raise UserError(f"no readable image in {args.folder}; {args.out} was not written")
        for error in unreadable:
            print(f"skipped: {error}", file=sys.stderr)
        truncated = [file for file, *_ in rows if looks_truncated(os.path.join(args.folder, file))]
        if truncated:  # labeled all the same, as main.py --predict does
            print(
                f"warning: {len(truncated)} JPEG(s) look truncated, e.g. {os.path.join(args.folder, truncated[0])}; "
                "they were labeled with the missing part gray",
                file=sys.stderr,
            )
        if near_tie_note(rows):
            print(near_tie_note(rows), file=sys.stderr)
        try:
            write_csv(args.out, rows)
        except OSError as exc:
            raise UserError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} predictions for {args.folder} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
