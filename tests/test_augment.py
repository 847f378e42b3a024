"""Issue 12, item 5: the training augmentations (--random_crop, --vflip, --auto_augment,
--random_erase) run on uint8 images in the data loading, seeded per sample so that every
replay (another loader, worker count, --cache, a resumed epoch, a rank's share) sees the same
images; evaluation and prediction take the center crop."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST
from torchvision.transforms.v2 import functional as TF

import config
from dataset import Transformed, build_loaders, build_predict_loader, build_test_loader
from utils import UserError


def settings(data, *flags):
    """The resolved config of a run on `data` with FAST's sizes (32 px, batch 16) and `flags`."""
    return config.parse_config(["--data_dir", str(data), *FAST, "--seed", "3", *flags])[0]


def train_batches(cfg, epoch=1, skip=0, rank=0, world_size=1):
    """(images, targets) of the training loader's epoch `epoch`, from `skip` samples on."""
    loader = build_loaders(cfg, "cpu", rank, world_size)[0]
    loader.sampler.set_epoch(epoch, skip=skip)
    return list(loader)


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def changed_images(batches, reference):
    """How many images of `batches` differ from `reference`'s (the same samples, unaugmented)."""
    return sum(int((xa != xb).flatten(1).any(1).sum()) for (xa, _), (xb, _) in zip(batches, reference))


@pytest.fixture(scope="module")
def plain(demo_data):
    """Epoch 1 of the colours' training loader without augmentation (48 images, 3 batches)."""
    return train_batches(settings(demo_data))


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_auto_augment_changes_images_and_replays_with_the_seed(demo_data, plain, policy):
    cfg = settings(demo_data, "--auto_augment", policy)
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    augmented = train_batches(cfg)
    # In the main process (--num_workers 0) the augmentation leaves the global RNG alone.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [y.tolist() for _, y in augmented] == [y.tolist() for _, y in plain]  # same samples, same order
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) for x, _ in augmented)
    # (A policy may draw the identity for an image now and then; most change.)
    assert changed_images(augmented, plain) > sum(len(y) for _, y in plain) // 2
    assert_same_batches(train_batches(cfg), augmented)  # replays: another loader, the same images
    assert changed_images(train_batches(cfg, epoch=2), augmented) > 0  # another epoch, other draws


def test_another_seed_augments_the_same_sample_differently(demo_data):
    train_set = build_loaders(settings(demo_data, "--auto_augment", "randaugment"), "cpu")[0].dataset
    other_seed = Transformed(train_set.dataset, train_set.transform, seed=4)
    keys = [(index, 0) for index in range(len(train_set))]
    assert all(torch.equal(train_set[key][0], train_set[key][0]) for key in keys)
    assert sum(not torch.equal(train_set[key][0], other_seed[key][0]) for key in keys) > len(keys) // 2


ALL_FLAGS = ["--auto_augment", "trivialaugment", "--random_crop", "24", "--vflip", "--random_erase", "0.5"]


def test_same_batches_with_workers_and_with_cache(demo_data):
    reference = train_batches(settings(demo_data, *ALL_FLAGS))
    assert_same_batches(train_batches(settings(demo_data, *ALL_FLAGS, "--num_workers", "2")), reference)
    assert_same_batches(train_batches(settings(demo_data, *ALL_FLAGS, "--cache")), reference)


def test_a_resumed_epoch_gets_the_same_augmented_batches(demo_data):
    cfg = settings(demo_data, *ALL_FLAGS)
    whole = train_batches(cfg)
    assert_same_batches(train_batches(cfg, skip=cfg.batch_size), whole[1:])  # resumed after its first batch


def test_each_rank_augments_its_share_as_one_process_would(demo_data):
    cfg = settings(demo_data, *ALL_FLAGS)
    loader = build_loaders(cfg, "cpu")[0]
    one_process = loader.dataset
    for rank in (0, 1):
        shard = build_loaders(cfg, "cpu", rank, world_size=2)[0]
        shard.sampler.set_epoch(1)
        keys, images = list(shard.sampler), torch.cat([x for x, _ in shard])
        assert torch.equal(images, torch.stack([one_process[key][0] for key in keys]))


def crop_offset(crop, image):
    """(top, left) where `crop` lies in `image`, or None."""
    size = crop.shape[-1]
    for top in range(image.shape[-2] - size + 1):
        for left in range(image.shape[-1] - size + 1):
            if torch.equal(image[:, top : top + size, left : left + size], crop):
                return top, left
    return None


def test_random_crop_trains_on_crops_and_evaluates_the_center(demo_data, plain):
    cfg = settings(demo_data, "--random_crop", "20")
    train, val, test, _ = build_loaders(cfg, "cpu")
    train.sampler.set_epoch(1)
    (crops, _), (resized, _) = next(iter(train)), plain[0]
    assert crops.shape[1:] == (3, 20, 20)
    offsets = [crop_offset(c, r) for c, r in zip(crops, resized)]
    assert None not in offsets and len(set(offsets)) > 1  # windows of the resized images, at random places
    other_epoch = [train.dataset[(index, 2)][0] for index, _ in list(train.sampler)[: len(crops)]]
    assert any(not torch.equal(a, b) for a, b in zip(other_epoch, crops))  # the same images, another epoch: other crops
    # Validation and test: the center crop of the resized image, in order.
    uncropped = build_loaders(settings(demo_data), "cpu")
    for loader, full in ((val, uncropped[1]), (test, uncropped[2])):
        for (x, y), (xf, yf) in zip(loader, full):
            assert torch.equal(x, TF.center_crop(xf, [20, 20])) and torch.equal(y, yf)
    # --evaluate's test loader crops alike.
    alone, _ = build_test_loader(cfg, "cpu")
    assert_same_batches(list(alone), list(test))


def test_predict_takes_the_center_crop_even_of_an_unreadable_file(demo_data, tmp_path):
    folder = tmp_path / "pictures"
    shutil.copytree(Path(demo_data) / "seg_test" / "seg_test" / "red", folder)
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    images, files, errors = next(
        iter(build_predict_loader(str(folder), settings(demo_data, "--random_crop", "20"), "cpu")[0])
    )
    assert images.shape[1:] == (3, 20, 20)  # the unreadable file's black placeholder too
    assert "broken.jpg" in files and any(errors)


def test_vflip_flips_some_images_vertically_and_nothing_else(demo_data, plain):
    flipped = train_batches(settings(demo_data, "--vflip"))
    kinds = []
    for (x, _), (original, _) in zip(flipped, plain):
        for image, source in zip(x, original):
            assert torch.equal(image, source) or torch.equal(image, source.flip(-2))
            kinds.append(torch.equal(image, source))
    assert True in kinds and False in kinds


def test_random_erase_1_erases_a_black_rectangle_in_every_image(demo_data, plain):
    erased = train_batches(settings(demo_data, "--random_erase", "1.0"))
    for (x, _), (original, _) in zip(erased, plain):
        for image, source in zip(x, original):
            changed = (image != source).any(0)
            assert changed.any()
            rows, cols = changed.any(1), changed.any(0)
            rectangle = rows[:, None] & cols[None, :]
            assert (image[:, rectangle] == 0).all()  # the changed pixels' bounding box is all black
            assert torch.equal(image[:, ~rectangle], source[:, ~rectangle])  # and nothing outside it changed


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--random_crop", "40"], "--random_crop must be between 1 and --image_size (32), got 40"),
        (["--random_crop", "0"], "--random_crop must be between 1 and --image_size (32), got 0"),
        (["--random_erase", "1.5"], "--random_erase is a probability: between 0 and 1, got 1.5"),
        (["--random_erase", "-0.1"], "--random_erase is a probability: between 0 and 1, got -0.1"),
        (["--random_erase", "nan"], "--random_erase is a probability: between 0 and 1, got nan"),
        (["--auto_augment", "augmix"], "argument --auto_augment: invalid choice: 'augmix'"),
        # BatchNorm's one-image batches are judged at the model's input size: the crop's.
        (["--batch_size", "1", "--image_size", "64", "--random_crop", "32"], "train on at --random_crop 32"),
    ],
)
def test_bad_values_are_refused_with_one_line(demo_data, flags, message):
    with pytest.raises(UserError) as error:
        settings(demo_data, *flags)
    assert message in str(error.value) and "\n" not in str(error.value)
