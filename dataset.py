"""The user's data: find the image folders, decode and check the images, split train/val, build
the loaders (or the test loader alone), augment the training images (uint8, seeded per sample),
and turn uint8 batches into normalized model inputs on the device. (The generated demo dataset
is demo.py's.)"""

import logging
import math
import multiprocessing
import os
import re
import signal
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still decode
# JPEGs 1.8x faster than PIL here, and load_image_uint8 falls back to PIL without them.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")
try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision without its own decoders: PIL decodes everything
    decode_image = None
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from utils import UserError, derived_seed, progress_bar

# A truncated JPEG (say, an interrupted download) loads with its missing part gray instead of
# crashing an epoch; the check before training warns about such files.
ImageFile.LOAD_TRUNCATED_IMAGES = True

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTEL_URL = "https://www.kaggle.com/datasets/puneet6060/intel-image-classification"

# Folder names tried for each split, in order; Kaggle's zip nests each split in itself.
# A validation folder (torchvision's reference and timm read train/ and val/) is the validation split.
SPLIT_NAMES = {
    "train": ("seg_train", "train"),
    "test": ("seg_test", "test"),
    "pred": ("seg_pred", "pred"),
    "val": ("val", "valid", "validation"),
}


# --------------------------------------------------------------------------- finding the data
def find_split_dir(data_dir, split):
    """The folder holding `split`'s images: DATA/seg_train/seg_train, DATA/seg_train,
    DATA/train, ... whichever exists first; None if none does."""
    for name in SPLIT_NAMES[split]:
        for candidate in (os.path.join(data_dir, name, name), os.path.join(data_dir, name)):
            if os.path.isdir(candidate):
                return candidate
    return None


def expected_layout(data_dir, splits=("train", "test")):
    """What `data_dir` should hold for `splits`, for error messages."""
    folders = " and ".join(f"{data_dir}/{SPLIT_NAMES[s][0]}/{SPLIT_NAMES[s][0]}/<class>/*.jpg" for s in splits)
    other_names = " and ".join(SPLIT_NAMES[s][1] for s in splits)
    return (
        f"expected {folders} (or without the repeated folder, or named {other_names}), "
        f"e.g. Kaggle's Intel Image Classification from {INTEL_URL}; "
        "or run `python main.py --demo` for a generated dataset"
    )


def _as_uint8(image):
    """A decoded image of any depth as uint8, scaled (65535 -> 255): 16-bit PNGs decode to
    uint16, which would not batch with 8-bit images nor normalize like them."""
    return TF.to_dtype(image, torch.uint8, scale=True)


def _torchvision_decode(path):
    """RGB uint8 [3, H, W] by torchvision's decoders, which fail on a truncated file."""
    return _as_uint8(decode_image(path, mode=ImageReadMode.RGB))


def _pil_decode(path):
    """RGB uint8 [3, H, W] by PIL, which fills a truncated file's missing part with gray."""
    with Image.open(path) as img:
        if img.mode.startswith("I;16"):  # 16-bit gray: PIL's convert("RGB") would clip it at 255, not scale it
            gray = torch.from_numpy(np.asarray(img).astype(np.uint16))
            return _as_uint8(gray).expand(3, -1, -1).contiguous()
        return TF.pil_to_tensor(img.convert("RGB"))


# torchvision decodes JPEGs (libjpeg-turbo: 1.8x PIL's speed, and a corrupt file raises). Its
# PNG decoder can crash the whole process on corrupt pixel data (torchvision 0.29: libpng's
# "bad adaptive filter value" is a segfault), so PIL decodes everything else.
TORCHVISION_DECODES = (".jpg", ".jpeg")


def _decode(path):
    """torchvision's decoder for JPEGs, else PIL (raising what PIL raises)."""
    if decode_image is not None and path.lower().endswith(TORCHVISION_DECODES):
        try:
            return _torchvision_decode(path)
        except RuntimeError:
            pass
    return _pil_decode(path)


def load_image_uint8(path):
    """Decode any image file to an RGB uint8 tensor [3, H, W]: JPEGs with torchvision's
    libjpeg-turbo decoder, everything else with PIL (see TORCHVISION_DECODES). Grayscale,
    palette and RGBA images are converted to RGB, 16-bit ones scaled to 8 bits."""
    try:
        return _decode(path)
    except Exception as exc:  # PIL raises many types for a bad file
        raise UserError(f"cannot read image {path}: {exc}") from None


class ResizeUint8:
    """Resize((S, S)) on a uint8 tensor, antialiased like PIL's bilinear resize."""

    def __init__(self, size):
        self.size = [size, size]

    def __call__(self, image):
        return TF.resize(image, self.size, antialias=True)


def is_visible_image(relative_path):
    """An image file with no hidden name (starting with '.') on its path below the split
    folder: Jupyter's .ipynb_checkpoints copies and macOS's ._photo.jpg files are no data."""
    parts = relative_path.split(os.sep)
    return parts[-1].lower().endswith(IMG_EXTENSIONS) and not any(part.startswith(".") for part in parts)


class VisibleImageFolder(ImageFolder):
    """ImageFolder leaving out hidden folders (no `.ipynb_checkpoints` class) and hidden files."""

    def __init__(self, root, transform):
        super().__init__(
            root,
            transform=transform,
            loader=load_image_uint8,
            is_valid_file=lambda path: is_visible_image(os.path.relpath(path, root)),
        )

    def find_classes(self, directory):
        classes = sorted(
            entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}


def image_folder(root, image_size):
    """An ImageFolder whose items are (uint8 tensor [3, S, S], class index)."""
    try:
        return VisibleImageFolder(root, transform=ResizeUint8(image_size))
    except FileNotFoundError:  # no class folders, or a class folder without images
        raise UserError(folder_problem(root)) from None


def folder_problem(root):
    """Why ImageFolder found no data in `root`, in one line that says what to do (its own words
    name no remedy, e.g. "Found no valid file for the classes zebra. ")."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    kinds = ", ".join(IMG_EXTENSIONS)
    if not classes:
        return (
            f"{root} holds no class folders: put each class's images in a folder of its own, {root}/<class>/ ({kinds})"
        )
    empty = [
        name
        for name in classes
        if not any(
            is_visible_image(os.path.relpath(os.path.join(folder, file), root))
            for folder, _, files in os.walk(os.path.join(root, name))
            for file in files
        )
    ]
    return (
        f"{root}: the class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
        f"{'hold' if len(empty) > 1 else 'holds'} no images ({kinds}): add its images, or move the folder out "
        "of the split if it is no class"
    )


def not_a_folder(path):
    """Why `path`, which is no folder, is not one: for error messages."""
    return "is not a folder" if os.path.exists(path) else "does not exist"


def split_folders(cfg, splits):
    """The ImageFolder of each of `splits` ("train", "test") in `cfg.data_dir`; a UserError
    saying what is expected if the folder or a split is missing (before reading any)."""
    data_dir = cfg.data_dir
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} {not_a_folder(data_dir)}: {expected_layout(data_dir, splits)}")
    roots = [find_split_dir(data_dir, split) for split in splits]
    for split, root in zip(splits, roots):
        if root is None:
            raise UserError(missing_split(data_dir, split, splits))
    return [image_folder(root, cfg.image_size) for root in roots]


def class_folders(data_dir):
    """The folders directly in `data_dir` that hold images directly, as class folders do."""
    return sorted(
        entry.name
        for entry in os.scandir(data_dir)
        if entry.is_dir()
        and not entry.name.startswith(".")
        and any(is_visible_image(name) for name in os.listdir(entry.path))
    )


def missing_split(data_dir, split, splits):
    """Why `split` is missing from `data_dir`, and what to do, in one line: make the split, or
    let --test_fraction hold one out of the class folders found (or the training split)."""
    classes = class_folders(data_dir)
    if classes:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        return (
            f"{data_dir} holds {len(classes)} class folder(s) ({shown}) but no training and test split: move "
            f"them into {data_dir}/train/<class>/ and {data_dir}/test/<class>/, or pass --test_fraction F (e.g. "
            "0.2) to hold out a stratified test split of their images, seeded by --seed like the validation split"
        )
    val_root = find_split_dir(data_dir, "val")
    if split == "test" and find_split_dir(data_dir, "train") is not None and val_root is not None:
        return (
            f"no test split found in {data_dir}, only a training split and a validation split ({val_root}, as "
            "torchvision's reference lays out ImageNet): pass --test_fraction F (e.g. 0.1) to hold out a "
            f"stratified test split of the training images, or add {data_dir}/test/<class>/ (or rename "
            f"{val_root} to {data_dir}/test to test on it; validation is then --val_fraction of the training split)"
        )
    if split == "test" and find_split_dir(data_dir, "train") is not None:
        return (
            f"no test split found in {data_dir}: {expected_layout(data_dir, splits)}; or pass --test_fraction F "
            "to hold out a stratified test split of the training images"
        )
    return (
        f"no {'training' if split == 'train' else split} split found in {data_dir}: {expected_layout(data_dir, splits)}"
    )


def held_out_source(cfg):
    """--test_fraction's images: the training split's folder, else DATA_DIR's class folders
    (refused where a test split exists: it would be left unused)."""
    data_dir = cfg.data_dir
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} {not_a_folder(data_dir)}: {expected_layout(data_dir)}")
    test_root = find_split_dir(data_dir, "test")
    if test_root is not None:
        raise UserError(
            f"--test_fraction holds a test split out of the training images, but {data_dir} has one "
            f"({test_root}); drop --test_fraction to test on it"
        )
    return image_folder(find_split_dir(data_dir, "train") or data_dir, cfg.image_size)


class UnlabeledImages(Dataset):
    """The image files under `root` (at any depth), sorted by their path relative to `root`.
    An item is (uint8 tensor [3, S, S], relative path, error): an unreadable file gives a black
    image and the reason, so one bad file does not stop a prediction run."""

    def __init__(self, root, image_size):
        self.root = root
        self.resize = ResizeUint8(image_size)
        self.image_size = image_size
        files = (
            os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root) for name in names
        )
        self.files = sorted(file for file in files if is_visible_image(file))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        file = self.files[index]
        try:
            return self.resize(load_image_uint8(os.path.join(self.root, file))), file, ""
        except UserError as exc:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), file, str(exc)


# --------------------------------------------------------------------------- splitting
def stratified_split(targets, val_fraction, seed):
    """Split indices into (train, val) keeping each class's share: round(val_fraction * n)
    of each class goes to val, chosen by a generator seeded with `seed` alone, so the split
    is the same in every run and every resume with that seed."""
    by_class = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for target in sorted(by_class):
        indices = by_class[target]
        order = torch.randperm(len(indices), generator=generator).tolist()
        n_val = min(round(val_fraction * len(indices)), len(indices) - 1)
        val.extend(indices[i] for i in order[:n_val])
        train.extend(indices[i] for i in order[n_val:])
    return sorted(train), sorted(val)


class EpochSampler(Sampler):
    """Yields this process's share of the indices for one epoch.

    The order is a permutation seeded by (seed, epoch) alone, so a resumed run replays it
    exactly; `skip` drops the samples already trained on in an interrupted epoch. Under DDP
    each rank takes every world-th index; training pads the order so every rank gets the
    same number of samples (DDP needs that), at least `min_per_rank`, repeating it as often as
    needed (a set smaller than the world); evaluation does not pad (so no image counts twice).
    """

    def __init__(self, size, shuffle, seed=0, rank=0, world_size=1, pad=False, min_per_rank=1):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad, self.min_per_rank = rank, world_size, pad, min_per_rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _indices(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.size:
            total = max(math.ceil(self.size / self.world_size), self.min_per_rank) * self.world_size
            order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.skip :])

    def __len__(self):
        # A run stopped after the last (partial) batch of an epoch skips past the end: nothing is left.
        return max(len(self._indices()) - self.skip, 0)

    def samples_per_epoch(self):
        return len(self._indices())


class KeyedEpochSampler(EpochSampler):
    """EpochSampler yielding (index, epoch) keys, for an augmented training set (Transformed
    with a seed): the epoch travels with each index to whichever worker loads it."""

    def __iter__(self):
        return ((index, self.epoch) for index in super().__iter__())


# --------------------------------------------------------------------------- augmentation
# --auto_augment's policies, by name (torchvision.transforms.v2, on uint8 tensors).
AUTO_AUGMENT = {
    "randaugment": v2.RandAugment,
    "trivialaugment": v2.TrivialAugmentWide,
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
}
# derived_seed's last part for a sample's augmentation (the device flips' is the rank, far below).
AUGMENT_STREAM = 0xA06_0000_0000


def train_augmentation(cfg):
    """The random transforms of --random_crop, --vflip, --auto_augment and --random_erase on a
    resized uint8 image, in that order (erasing last, on what the others made); None without
    any, so the default pipeline stays untouched."""
    steps = []
    if getattr(cfg, "random_crop", None):
        steps.append(v2.RandomCrop(cfg.random_crop))
    if getattr(cfg, "vflip", False):
        steps.append(v2.RandomVerticalFlip())
    if getattr(cfg, "auto_augment", None):
        steps.append(AUTO_AUGMENT[cfg.auto_augment]())
    if getattr(cfg, "random_erase", 0):
        steps.append(v2.RandomErasing(p=cfg.random_erase))
    return v2.Compose(steps) if steps else None


class Transformed(Dataset):
    """`dataset`'s items with `transform` applied to their image (the item's first element).

    Without a `seed` the transform is deterministic (evaluation's center crop) and items are
    plain indices. With one, items are (index, epoch) keys (KeyedEpochSampler) and the
    transform runs with torch's RNG seeded by derived_seed(seed, epoch, index): a sample's
    augmentation is a pure function of them, the same in any worker, with any --num_workers,
    --cache or not, after a resume, on any rank. (DDP's padding repeats a few samples in an
    epoch; a repeat gets the same augmentation.) Over CachedImages a batch is read from RAM in
    one indexing and transformed image by image, so it equals the uncached batch."""

    def __init__(self, dataset, transform, seed=None):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.cached = isinstance(dataset, CachedImages)

    def __len__(self):
        return len(self.dataset)

    def _index(self, key):
        return key if self.seed is None else key[0]

    def _apply(self, image, key):
        if self.seed is None:
            return self.transform(image)
        index, epoch = key
        # v2 transforms draw from torch's global RNG: seed it for this sample, and leave the
        # main process's own draws (--num_workers 0, --cache) where they were.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derived_seed(self.seed, epoch, index, AUGMENT_STREAM))
            return self.transform(image)

    def __getitem__(self, key):
        image, *rest = self.dataset[self._index(key)]
        return (self._apply(image, key), *rest)

    def __getitems__(self, keys):
        """A batch (the DataLoader calls this): from the cache as one tensor, else item by item."""
        if not self.cached:
            return [self[key] for key in keys]
        images, targets = self.dataset.__getitems__([self._index(key) for key in keys])
        return torch.stack([self._apply(image, key) for image, key in zip(images, keys)]), targets


def evaluation_view(dataset, cfg):
    """`dataset` as evaluation and prediction see it: with --random_crop C, the center C x C of
    each resized image (the model's input size)."""
    crop = getattr(cfg, "random_crop", None)
    return Transformed(dataset, v2.CenterCrop(crop)) if crop else dataset


def sample_files(dataset):
    """Each sample's image file, by the dataset's index: its path below the split's folder
    (`<class>/<name>.jpg`, with '/'), through evaluation_view, Subset and --cache."""
    if isinstance(dataset, Transformed):
        return sample_files(dataset.dataset)
    if isinstance(dataset, Subset):
        files = sample_files(dataset.dataset)
        return [files[i] for i in dataset.indices]
    if isinstance(dataset, CachedImages):
        return dataset.files
    return [os.path.relpath(path, dataset.root).replace(os.sep, "/") for path, _ in dataset.samples]


def loader_files(loader):
    """The files of this process's share of an evaluation loader, in the order it yields them."""
    files = sample_files(loader.dataset)
    return [files[i] for i in loader.sampler]


# --------------------------------------------------------------------------- on the device
class DeviceTransform:
    """uint8 batch [B, 3, S, S] -> normalized float batch on the device, with a random
    horizontal flip when training. Doing this on the device keeps the workers' job to decoding
    and resizing, and sends 4x fewer bytes (uint8) to the GPU."""

    def __init__(self, device, channels_last=False):
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std

    def __call__(self, images, flip_seed=None):
        """`flip_seed` (training only) fixes which images are flipped, so a batch replays exactly."""
        images = images.to(self.device, non_blocking=True)
        if flip_seed is not None:
            flip = flip_mask(images.shape[0], flip_seed, self.device).to(self.device, non_blocking=True)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        images = images.to(dtype=torch.float32, memory_format=self.memory_format)
        return images.mul_(self.scale).sub_(self.shift)


def training_inputs(loader, transform, cfg, epoch, rank=0):
    """The device inputs of epoch `epoch`'s first cfg.precise_bn training batches on this rank,
    as the training step got them (augmented and flipped from the same seeds as in
    Trainer.train_one_epoch; never mixed: evaluation sees no mixed images), with a progress
    bar (rank 0): what precise BatchNorm forwards."""
    loader.sampler.set_epoch(epoch)
    count = min(cfg.precise_bn, len(loader))
    batches = zip(range(count), loader)  # (range first: the loader is not asked for one batch too many)
    for i, (images, _) in progress_bar(batches, "precise BatchNorm" if cfg.progress and rank == 0 else "", count):
        yield transform(images, flip_seed=derived_seed(cfg.seed, epoch, i, rank))


def flip_mask(batch_size, seed, device):
    """Which images of a batch to flip: drawn on the CPU from the batch's seed, so every device
    flips the same images. For a GPU the mask is pinned, so its non-blocking copy is a true
    asynchronous one: from pageable memory CUDA may stage the copy synchronously, with the host
    waiting."""
    flip = torch.rand(batch_size, generator=torch.Generator().manual_seed(seed)) < 0.5
    return flip.pin_memory() if torch.device(device).type == "cuda" else flip


# --------------------------------------------------------------------------- loaders
def stop_loader_workers():
    """Kill the data-loading workers still alive. They ignore SIGTERM (see below), and SIGTERM
    is how Python ends them at exit after an error: without this a failed run would print its
    error and then wait for them forever."""
    workers = multiprocessing.active_children()
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loaders' own handler would report the kill as a crash
    for worker in workers:
        worker.kill()
        worker.join()


def _ignore_stop_signals(worker_id):
    """Workers leave Ctrl-C, SIGTERM and SIGHUP (a closed terminal signals the whole process
    group) to the main process, which finishes its step and saves; they exit with it."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset, sampler, batch_size, cfg, device, drop_last=False):
    cached = isinstance(dataset, CachedImages) or isinstance(dataset, Transformed) and dataset.cached
    workers = 0 if cached else cfg.num_workers  # slicing a tensor in RAM needs no helpers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_already_batched if cached else None,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=workers > 0,
        drop_last=drop_last,
        worker_init_fn=_ignore_stop_signals,
        # The loader seeds its workers from this generator, not the global RNG; no worker
        # randomness depends on it anyway (Transformed seeds each sample's augmentation).
        generator=torch.Generator().manual_seed(cfg.seed),
    )


# --------------------------------------------------------------------------- --cache
class CachedImages(torch.utils.data.Dataset):
    """Images kept as one uint8 tensor [N, 3, S, S] in RAM, with their labels."""

    def __init__(self, images, targets, files=None):
        self.images, self.targets = images, targets
        self.files = files  # each image's file (sample_files), for per-image reports

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]

    def __getitems__(self, indices):
        """A whole batch in one indexing operation (the DataLoader calls this)."""
        indices = torch.as_tensor(indices)
        return self.images[indices], self.targets[indices]

    def nbytes(self):
        return self.images.numel() * self.images.element_size()


def human_bytes(n):
    """A byte count for people: '512 B', '3.4 MiB', '2.10 GiB'."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.2f} GiB"


def _already_batched(batch):
    return batch


def cache_dataset(dataset, workers=0, progress=False):
    """Decode and resize a split once (in parallel) into CachedImages: later epochs skip
    decoding. The pixels are exactly what `dataset` itself returns. With `progress`, a bar."""
    first, _ = dataset[0]
    images = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)
    targets = torch.empty(len(dataset), dtype=torch.int64)
    start = 0
    batches = DataLoader(dataset, batch_size=64, num_workers=workers)  # in order
    for batch, labels in progress_bar(batches, "--cache: decoding" if progress else ""):
        images[start : start + len(batch)] = batch
        targets[start : start + len(batch)] = labels
        start += len(batch)
    return CachedImages(images, targets, sample_files(dataset))


# --------------------------------------------------------------------------- bad images
def quick_image_problem(path):
    """Why `path` cannot be an image, from its size and header alone ('' if it looks fine)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path):
            return ""
    except Exception as exc:  # PIL raises several types for a file that is not an image
        return str(exc) or type(exc).__name__


def looks_truncated(path):
    """A JPEG whose last bytes are not the end-of-image marker was probably cut off."""
    if not path.lower().endswith((".jpg", ".jpeg")):
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 2:  # (too short to end with the marker: seeking 2 bytes back would fail)
            return True
        f.seek(-2, os.SEEK_END)
        return f.read() != b"\xff\xd9"


# torchvision's errors read "decode_jpeg, /.../csrc/.../decode_jpeg.cpp:171, Image is incomplete",
# or, in some builds, add "Exception raised from ... at /.../file.cpp:67" and C++ stack frames.
_CPP_LOCATION = re.compile(r"^.*?\.(?:cpp|cc|cu|h|hpp)(?::\d+)?,\s*")
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")


def error_summary(exc):
    """The first sentence of an exception's message, on one line, without C++ source paths."""
    message = str(exc).split("Exception raised from")[0].strip()
    first_line = message.splitlines()[0] if message else ""
    summary = _SENTENCE_END.split(_CPP_LOCATION.sub("", first_line))[0].strip().rstrip(".")
    return summary or type(exc).__name__


def decode_problem(path):
    """Why `path` does not decode ('' if it does), in one line. Strict: a truncated file fails
    here, though training would load it with its missing part gray."""
    strict_jpeg = decode_image is not None and path.lower().endswith(TORCHVISION_DECODES)
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        (_torchvision_decode if strict_jpeg else _pil_decode)(path)
        return ""
    except Exception as exc:  # each decoder raises its own types
        return f"not a decodable image ({error_summary(exc)})"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


class _DecodeCheck(torch.utils.data.Dataset):
    """(path, decode_problem(path)) items, so a DataLoader's workers check images in parallel."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.paths[index], decode_problem(self.paths[index])


def find_bad_images(paths, decode=False, workers=0, progress=False):
    """{path: reason} for the images that cannot be read. Without `decode`, a quick look at
    each file's size and header; with it, every image is decoded (in `workers` processes).
    With `progress`, a bar."""
    if not decode:
        problems = ((p, quick_image_problem(p)) for p in progress_bar(paths, "checking images" if progress else ""))
    else:
        loader = DataLoader(_DecodeCheck(paths), batch_size=64, num_workers=workers, collate_fn=list)
        batches = progress_bar(loader, "--skip_bad_images: decoding" if progress else "")
        problems = (item for batch in batches for item in batch)
    return {path: reason for path, reason in problems if reason}


def drop_images(folder, bad):
    """Remove `bad` paths from an ImageFolder in place."""
    folder.samples = [s for s in folder.samples if s[0] not in bad]
    folder.imgs = folder.samples
    folder.targets = [target for _, target in folder.samples]


def check_images(folders, cfg, progress=False):
    """Stop before training on unreadable images, or with --skip_bad_images leave them out
    and log which."""
    log = logging.getLogger("amp")
    paths = [path for folder in folders for path, _ in folder.samples]
    bad = find_bad_images(paths, decode=cfg.skip_bad_images, workers=cfg.num_workers, progress=progress)
    if bad and not cfg.skip_bad_images:
        path, reason = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(
            f"unreadable image {path}: {reason}{more}; remove it, or pass --skip_bad_images to leave such files out"
        )
    if bad:
        log.info(f"--skip_bad_images: left out {len(bad)} unreadable image(s):")
        for path, reason in bad.items():
            log.info(f"  {path}: {reason}")
        for folder in folders:
            drop_images(folder, bad)
        for folder in folders:
            if len(set(folder.targets)) < len(folder.classes):
                empty = sorted(set(range(len(folder.classes))) - set(folder.targets))
                raise UserError(f"{folder.root}: class folder {folder.classes[empty[0]]!r} has no readable image left")
    elif not cfg.skip_bad_images:
        warning = truncated_warning(paths)
        if warning:
            log.info(warning)


def truncated_warning(paths):
    """The warning about the JPEGs among `paths` that look truncated ('' if none): they load
    with their missing part gray (training, --evaluate and --predict alike)."""
    truncated = [p for p in paths if looks_truncated(p)]
    if not truncated:
        return ""
    return (
        f"warning: {len(truncated)} JPEG(s) look truncated, e.g. {truncated[0]}; they load with the "
        "missing part gray. --skip_bad_images decodes every image and leaves out the broken ones"
    )


def check_unlabeled_images(images, cfg, progress=False):
    """The files of `images` (UnlabeledImages) checked as check_images checks training images:
    with --skip_bad_images each is decoded first and the broken ones (a truncated JPEG too)
    are left out, in place; without, a JPEG that looks truncated gets training's warning.
    (["path: why" for each file left out], the warning or '')."""
    paths = [os.path.join(images.root, file) for file in images.files]
    if not cfg.skip_bad_images:
        return [], truncated_warning(paths)
    bad = find_bad_images(paths, decode=True, workers=cfg.num_workers, progress=progress)
    images.files = [file for file, path in zip(images.files, paths) if path not in bad]
    return [f"{path}: {reason}" for path, reason in bad.items()], ""


# derived_seed's last part for --test_fraction's split (the validation split's seed is --seed itself).
TEST_SPLIT_STREAM = 0x7E57


def build_datasets(cfg, progress=False):
    """(train, val, test) datasets and the class names, checked for a usable layout (with
    `progress`, a bar while the images are checked). With --test_fraction the test split is
    held out of the training images first (stratified, seeded), then validation out of the rest;
    a validation folder (DATA_DIR/val) is the validation split, and the training split is all of
    the rest."""
    test_fraction = getattr(cfg, "test_fraction", None)
    if test_fraction:
        full_train = held_out_source(cfg)
        check_images((full_train,), cfg, progress)
        pool, test_idx = stratified_split(full_train.targets, test_fraction, derived_seed(cfg.seed, TEST_SPLIT_STREAM))
        if not test_idx:
            raise UserError(f"{full_train.root} is too small for a test split of {test_fraction}")
        test = Subset(full_train, test_idx)
    else:
        full_train, test = split_folders(cfg, ("train", "test"))
        check_images((full_train, test), cfg, progress)
        check_same_classes("test", test, full_train)
        pool = range(len(full_train))
    if len(full_train.classes) < 2:
        raise UserError(f"{full_train.root} has {len(full_train.classes)} class folder; a classifier needs at least 2")
    # A validation folder is used only by a run that chose it at its start (use_validation_folder
    # set val_fraction to None): a run that validates on a fraction split keeps it, on --resume too.
    val_root = find_split_dir(cfg.data_dir, "val") if cfg.val_fraction is None else None
    if val_root is not None:  # its own folder: no share of the training images is split off
        val = image_folder(val_root, cfg.image_size)
        check_images((val,), cfg, progress)
        check_same_classes("validation", val, full_train)
        return Subset(full_train, list(pool)), val, test, full_train.classes
    if cfg.val_fraction is None:  # (a run that validated on a validation folder, resumed without it)
        raise UserError(f"the run validated on a validation folder ({cfg.data_dir}/val), which is not there now")
    train_idx, val_idx = stratified_split([full_train.targets[i] for i in pool], cfg.val_fraction, cfg.seed)
    if not val_idx:
        held_out = (
            f" once --test_fraction {cfg.test_fraction} held its test split out"
            if getattr(cfg, "test_fraction", None)
            else ""
        )
        raise UserError(f"{full_train.root} is too small for a validation split of {cfg.val_fraction}{held_out}")
    return (
        Subset(full_train, [pool[i] for i in train_idx]),
        Subset(full_train, [pool[i] for i in val_idx]),
        test,
        full_train.classes,
    )


def check_same_classes(name, split, train):
    """`split` (an ImageFolder) must have the training split's classes, in its order."""
    if split.classes != train.classes:
        raise UserError(
            f"the {name} classes in {split.root} ({', '.join(split.classes)}) differ from the training "
            f"classes in {train.root} ({', '.join(train.classes)})"
        )


def use_validation_folder(cfg, explicit):
    """Where `cfg.data_dir` has a validation folder (train/ and val/, as torchvision's reference
    and timm lay out ImageNet), build_datasets validates on it: refuse --val_fraction, which would
    do nothing, and set cfg.val_fraction to None, so config.json says no share of the training
    images was split off."""
    val_root = find_split_dir(cfg.data_dir, "val") if os.path.isdir(cfg.data_dir) else None
    if val_root is None:
        return
    if "val_fraction" in explicit:
        raise UserError(
            f"--val_fraction splits validation images off the training split, but {cfg.data_dir} has a "
            f"validation split of its own ({val_root}); drop --val_fraction"
        )
    cfg.val_fraction = None


def unused_validation_folder_note(cfg):
    """One line where DATA_DIR/val exists but the run validates on its --val_fraction split
    (a folder added after the run started is not switched to on --resume); else None."""
    if cfg.val_fraction is None or not os.path.isdir(cfg.data_dir):
        return None
    val_root = find_split_dir(cfg.data_dir, "val")
    if val_root is None:
        return None
    return (
        f"{val_root} is not used: this run validates on its --val_fraction {cfg.val_fraction} split of the "
        "training images (a new run would validate on the folder)"
    )


def per_rank_batch(cfg, world_size):
    """`cfg.batch_size` is the global batch: each of the `world_size` processes loads its share."""
    return max(cfg.batch_size // world_size, 1)


def evaluation_loader(dataset, cfg, device, rank, world_size):
    """`dataset` in order (center-cropped with --random_crop), each image on one rank only (no
    padding: none counts twice)."""
    sampler = EpochSampler(len(dataset), False, 0, rank, world_size)
    dataset = evaluation_view(dataset, cfg)
    return make_loader(dataset, sampler, per_rank_batch(cfg, world_size), cfg, device)


def build_loaders(cfg, device, rank=0, world_size=1):
    """Train, val and test loaders plus the class names, for process `rank` of `world_size`."""
    progress = getattr(cfg, "progress", False) and rank == 0
    train_set, val_set, test_set, class_names = build_datasets(cfg, progress)
    if isinstance(val_set, ImageFolder):  # (else a share of the training split)
        logging.getLogger("amp").info(f"validation split: {val_set.root} ({len(val_set)} images)")
    unused = unused_validation_folder_note(cfg)
    if unused:
        logging.getLogger("amp").info(unused)
    if getattr(cfg, "cache", False):
        train_set, val_set, test_set = (
            cache_dataset(d, cfg.num_workers, progress) for d in (train_set, val_set, test_set)
        )
        size = human_bytes(sum(d.nbytes() for d in (train_set, val_set, test_set)))
        logging.getLogger("amp").info(
            f"--cache: {len(train_set)} train, {len(val_set)} val and {len(test_set)} test images decoded "
            f"into {size} of RAM"
        )
    batch = per_rank_batch(cfg, world_size)
    # BatchNorm cannot train on a batch of one image (and under DDP, without --sync_bn, each
    # rank's batch is its own): give every rank at least two samples, and drop a last batch
    # of one (one image an epoch; at least one batch is left, as the share is over `batch`).
    augmentation = train_augmentation(cfg)
    sampler_class = EpochSampler if augmentation is None else KeyedEpochSampler
    train_sampler = sampler_class(len(train_set), True, cfg.seed, rank, world_size, pad=True, min_per_rank=2)
    if augmentation is not None:  # (after --cache: the cache holds the resized pixels, augmented per epoch)
        train_set = Transformed(train_set, augmentation, cfg.seed)
    drop_last = train_sampler.samples_per_epoch() % batch == 1
    train = make_loader(train_set, train_sampler, batch, cfg, device, drop_last=drop_last)
    val = evaluation_loader(val_set, cfg, device, rank, world_size)
    test = evaluation_loader(test_set, cfg, device, rank, world_size)
    return train, val, test, class_names


def build_test_loader(cfg, device, rank=0, world_size=1):
    """(test loader, class names) from the test split alone, for --evaluate: no training
    images needed. Its batches are build_loaders' test batches; --cache is left out, as
    decoding the images into RAM first gains nothing for a single pass. (With --test_fraction
    the test split is held out of the training images again, as the run did.)"""
    progress = getattr(cfg, "progress", False) and rank == 0
    if getattr(cfg, "test_fraction", None):
        _, _, test_set, classes = build_datasets(cfg, progress)
    else:
        (test_set,) = split_folders(cfg, ("test",))
        check_images((test_set,), cfg, progress)
        classes = test_set.classes
    return evaluation_loader(test_set, cfg, device, rank, world_size), classes


def build_predict_loader(root, cfg, device):
    """(batches of (images, relative paths, errors) over the image files under `root`, in order;
    the files left out and the warning of check_unlabeled_images)."""
    if not os.path.isdir(root):
        raise UserError(f"{root} {not_a_folder(root)}: --predict_dir takes a folder of images")
    images = UnlabeledImages(root, cfg.image_size)
    if not len(images):
        raise UserError(f"no image files in {root} (looked for {', '.join(IMG_EXTENSIONS)})")
    left_out, warning = check_unlabeled_images(images, cfg, getattr(cfg, "progress", False))
    # (An unreadable file's black placeholder is cropped too: every batch has the model's input size.)
    return make_loader(evaluation_view(images, cfg), None, cfg.batch_size, cfg, device), left_out, warning
