"""The model: torchvision's ResNet-18, ImageNet weights when asked, a new head for our classes."""
import os
import urllib.error

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from utils import UserError

WEIGHTS = ResNet18_Weights.IMAGENET1K_V1


def cached_weights_path():
    """Where torchvision looks for (and downloads) the ImageNet weights: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS.url))


def load_state_dict_file(path):
    """A state dict from a file, refusing anything that is not plain tensors (weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file not found: {path}") from None
    except Exception as exc:  # truncated, foreign, or a pickle that would run code
        raise UserError(f"cannot load weights from {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # one of our own checkpoints
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state


def imagenet_state_dict(pretrained_path=None):
    """ImageNet ResNet-18 weights: from `pretrained_path`, else through torchvision's weights
    API (the hub cache first, then a download), with a clear error when offline."""
    if pretrained_path:
        return load_state_dict_file(pretrained_path)
    if os.path.exists(cached_weights_path()):
        return load_state_dict_file(cached_weights_path())
    try:  # downloads into the cache
        return WEIGHTS.get_state_dict(progress=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"ImageNet weights for ResNet-18 are not cached and could not be downloaded ({reason}); "
            f"put {os.path.basename(WEIGHTS.url)} from {WEIGHTS.url} at {cached_weights_path()}, "
            "or pass --pretrained_path FILE, or --no_pretrained to train from scratch"
        ) from None


def build_model(num_classes, pretrained=True, pretrained_path=None):
    """ResNet-18 with a `num_classes` head. Its state dict loads into a plain
    `torchvision.models.resnet18(num_classes=num_classes)`."""
    if not pretrained:
        return resnet18(num_classes=num_classes)
    model = resnet18()
    try:
        model.load_state_dict(imagenet_state_dict(pretrained_path))
    except RuntimeError as exc:  # wrong keys or shapes: not a ResNet-18 ImageNet file
        raise UserError(f"the pretrained weights do not fit ResNet-18: {str(exc).splitlines()[0]}") from None
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
