"""The model: torchvision's ResNet-18, ImageNet (or an earlier run's) weights when asked, a head for our classes."""
import logging
import os
import re
import urllib.error

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils import UserError, torch_load_error

WEIGHTS = ResNet18_Weights.IMAGENET1K_V1


def cached_weights_path():
    """Where torchvision looks for (and downloads) the ImageNet weights: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS.url))


def load_weights_file(path):
    """(state dict, class names or None) from a weights file: a plain state dict (the ImageNet
    file) or a checkpoint of this template, whose classes it names. weights_only: plain tensors only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"--pretrained_path {path} is a folder, not a weights file") from None
    except Exception as exc:  # truncated, foreign, or a pickle that would run code
        raise UserError(f"cannot load weights from {path}: {torch_load_error(exc)}") from None
    class_names = None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # one of our own checkpoints
        class_names = state.get("class_names")
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state, class_names


def imagenet_state_dict():
    """ImageNet ResNet-18 weights through torchvision's weights API (the hub cache first, then a
    download), with a clear error when offline."""
    if os.path.exists(cached_weights_path()):
        return load_weights_file(cached_weights_path())[0]
    try:  # downloads into the cache
        return WEIGHTS.get_state_dict(progress=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"ImageNet weights for ResNet-18 are not cached and could not be downloaded ({reason}); "
            f"put {os.path.basename(WEIGHTS.url)} from {WEIGHTS.url} at {cached_weights_path()}, "
            "or pass --pretrained_path FILE, or --no_pretrained to train from scratch"
        ) from None


# Keys a weights file may lack: BatchNorm's step counters (files saved before PyTorch had them,
# such as the ImageNet ResNet-18) and the head, which is replaced anyway when missing.
OPTIONAL_KEYS = re.compile(r"(^|\.)num_batches_tracked$|^fc\.")
# Prefixes a wrapped model's state dict carries: DistributedDataParallel's and torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped(state):
    """`state` without the DDP/torch.compile prefixes its keys may carry."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def misfit(model, state):
    """Why `state` does not load into `model`, in one line ('' if it does)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not OPTIONAL_KEYS.search(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    parts = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if keys]
    return "; ".join(parts)


def residual_gammas(model):
    """The weight (gamma) of the last BatchNorm of each residual block, by the block's name:
    bn2 of a BasicBlock, bn3 of a Bottleneck. Empty for a model without residual blocks."""
    gammas = {}
    for name, block in model.named_modules():
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2 if isinstance(block, BasicBlock) else None
        if last_bn is not None and last_bn.weight is not None:
            gammas[name] = last_bn.weight
    return gammas


@torch.no_grad()
def zero_init_residual(model):
    """Zero each residual block's last BatchNorm weight, so every block starts as the identity
    (torchvision's `zero_init_residual=True`, here also after loading weights). Says in one
    line what it did."""
    gammas = residual_gammas(model)
    for gamma in gammas.values():
        gamma.zero_()
    log = logging.getLogger("amp")
    if gammas:
        log.info(f"--zero_init_residual: zeroed the last BatchNorm weight of {len(gammas)} residual blocks")
    else:
        log.info(f"--zero_init_residual: {type(model).__name__} has no residual blocks; nothing to zero")
    return model


def build_model(num_classes, pretrained=True, pretrained_path=None, class_names=None, zero_residual=False):
    """ResNet-18 with a `num_classes` head; its state dict loads into a plain
    `torchvision.models.resnet18(num_classes=num_classes)`.

    With `pretrained`, the weights come from `pretrained_path` or the ImageNet file. A run of
    this template keeps its head when it was trained on `class_names` (training a finished run
    further); any other head is replaced by a new one for our classes (fine-tuning). With
    `zero_residual`, the blocks' last BatchNorm weights are zeroed after that (zero_init_residual)."""
    model = load_model(num_classes, pretrained, pretrained_path, class_names)
    return zero_init_residual(model) if zero_residual else model


def load_model(num_classes, pretrained, pretrained_path, class_names):
    """build_model's model before zero_init_residual."""
    if not pretrained:
        return resnet18(num_classes=num_classes)
    state, file_classes = load_weights_file(pretrained_path) if pretrained_path else (imagenet_state_dict(), None)
    state = unwrapped(state)
    head = state.get("fc.weight")
    model = resnet18(num_classes=head.shape[0] if head is not None and head.dim() == 2 else 1000)
    problem = misfit(model, state)
    if problem:
        raise UserError(f"the weights in {pretrained_path or cached_weights_path()} do not fit ResNet-18: {problem}")
    model.load_state_dict(state, strict=False)  # strict but for OPTIONAL_KEYS, checked by misfit
    if file_classes is not None and list(file_classes) == list(class_names or []) and head is not None:
        logging.getLogger("amp").info(f"--pretrained_path: starting from {pretrained_path} with its head "
                                      f"(the same {len(file_classes)} classes)")
        return model
    if file_classes is not None:
        logging.getLogger("amp").info(
            f"--pretrained_path: fine-tuning {pretrained_path}; its head for {len(file_classes)} classes "
            f"({', '.join(file_classes)}) is replaced by a new one for this data's {num_classes}")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
