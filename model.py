"""The model: any classification model of torchvision by its name (ResNet-18 by default), with
ImageNet (or an earlier run's) weights when asked, and a head for our classes."""

import bisect
import contextlib
import difflib
import functools
import logging
import os
import re
import urllib.error

import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils import UserError, torch_load_error

DEFAULT_MODEL = "resnet18"
# What a family needs besides num_classes. GoogLeNet and Inception v3 without their auxiliary
# classifiers, so a training forward returns the logits alone (best.pt then loads into
# get_model(name, num_classes=N, aux_logits=False)); transform_input rescales our
# ImageNet-normalized input to the [-1, 1] their ImageNet weights learned on (what torchvision's
# builders set with those weights); init_weights: the init it has now, without its warning.
BUILD_KWARGS = {
    name: dict(aux_logits=False, transform_input=True, init_weights=True) for name in ("googlenet", "inception_v3")
}
# Keys of those auxiliary classifiers in the ImageNet files: left out when loading.
AUXILIARY_KEYS = re.compile(r"^(aux1|aux2|AuxLogits)\.")
# DenseNet's ImageNet files name its layers' parts norm.1, conv.2, ...: now norm1, conv2 (as
# torchvision's builder renames them).
DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
# ImageNet's image size, which every classification model of torchvision takes.
REFERENCE_SIZE = 224


@functools.cache
def model_names():
    """The classification models of torchvision (not its detection, video, quantized, ... ones)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name):
    """A name --model does not know is a one-line error naming the close ones."""
    if name in model_names():
        return
    if name.lower() in model_names():
        raise UserError(f"--model {name!r}: torchvision's model names are lowercase: --model {name.lower()}")
    close = difflib.get_close_matches(name.lower(), model_names(), n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "see torchvision.models.list_models()"
    raise UserError(f"--model {name!r} is not a classification model of torchvision; {hint}")


def new_model(name, num_classes):
    """`name` with a `num_classes` head, torchvision's random init."""
    return torchvision.models.get_model(name, num_classes=num_classes, **BUILD_KWARGS.get(name, {}))


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built in here put their parameters on the meta device as they are created, so
    their init draws nothing (even models whose builders compute with real tensors, RegNet's)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        with torch.random.fork_rng(devices=[]):  # what init draws before registering (ViT's) is undone
            yield
    finally:
        nn.Module.register_parameter = register


def empty_model(name, num_classes):
    """new_model's shapes only, on the meta device: built in moments, no memory, no random numbers."""
    with parameters_on_meta():
        return new_model(name, num_classes).to("meta")


@functools.cache
def head_keys(name):
    """The state-dict keys of `name`'s classifier head, whatever it is called (fc, classifier.1,
    heads.head, SqueezeNet's last convolution): those whose shape depends on the class count."""
    two, three = empty_model(name, 2).state_dict(), empty_model(name, 3).state_dict()
    return tuple(key for key, value in two.items() if value.shape != three[key].shape)


def replace_head(model, name, num_classes):
    """A new head for `num_classes` in place of `model`'s: its layers' PyTorch init, drawn as
    `nn.Linear(in_features, num_classes)` would draw it."""
    fresh = empty_model(name, num_classes)
    for path in dict.fromkeys(key.rpartition(".")[0] for key in head_keys(name)):
        layer = fresh.get_submodule(path).to_empty(device="cpu")
        layer.reset_parameters()
        model.set_submodule(path, layer)
    return model


@functools.cache
def takes_image_size(name, size):
    """Whether `name` runs a training forward on a batch of size x size images (on the meta
    device: shapes only, in moments)."""
    model = empty_model(name, 2).train()
    try:
        model(torch.empty(2, 3, size, size, device="meta"))
    except (RuntimeError, AssertionError, ValueError):  # a shape that does not fit
        return False
    return True


def image_size_problem(name, size, flag="--image_size"):
    """Why --model `name` cannot train on size x size images (given by `flag`), in one line ('' if
    it can): a model built for one input size (ViT, MaxViT), or one whose feature maps vanish
    below a size (AlexNet, Inception v3)."""
    if takes_image_size(name, size):
        return ""
    larger = REFERENCE_SIZE + 32
    if takes_image_size(name, REFERENCE_SIZE) and not takes_image_size(name, larger):
        return f"--model {name} takes {REFERENCE_SIZE} x {REFERENCE_SIZE} images only; pass {flag} {REFERENCE_SIZE}"
    if size < larger and takes_image_size(name, larger):  # the smallest size it takes, by bisection
        smallest = size + bisect.bisect(range(size, larger + 1), False, key=functools.partial(takes_image_size, name))
        return f"--model {name} needs images of at least {smallest} x {smallest}; pass {flag} {smallest} or more"
    return f"--model {name} cannot take {size} x {size} images; try {flag} {REFERENCE_SIZE}"


def default_weights(name):
    """torchvision's DEFAULT (ImageNet) weights of `name`, from its weights API."""
    weights = getattr(torchvision.models.get_model_weights(name), "DEFAULT", None)
    if weights is None:
        raise UserError(
            f"torchvision has no pretrained weights for --model {name}; pass --no_pretrained to train "
            "it from scratch, or --pretrained_path FILE"
        )
    return weights


def check_default_weights_fit(name):
    """One line if torchvision's DEFAULT weights of `name` are for another input size than the
    model get_model builds (vit_h_14's are for 518 px, its build for 224: the position embedding
    would not load), before gigabytes are downloaded for nothing."""
    weights = default_weights(name)
    built = getattr(empty_model(name, 2), "image_size", None)  # (a ViT's fixed size; None for the rest)
    trained = weights.meta.get("min_size", (0, 0))[0]
    if built is not None and trained != built:
        raise UserError(
            f"torchvision's DEFAULT ImageNet weights of --model {name} are for {trained} x {trained} "
            f"images, but it is built for {built} x {built} here; pass --no_pretrained or --pretrained_path FILE"
        )


def cached_weights_path(name=DEFAULT_MODEL):
    """Where torchvision looks for (and downloads) `name`'s ImageNet weights: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(default_weights(name).url))


def load_weights_file(path):
    """(state dict, class names or None, model name or None, peak LR or None) from a weights
    file: a plain state dict (the ImageNet file) or a checkpoint of this template, which names
    its classes, its --model and the --learning_rate it trained at. weights_only: plain tensors only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"--pretrained_path {path} is a folder, not a weights file") from None
    except Exception as exc:  # truncated, foreign, or a pickle that would run code
        raise UserError(f"cannot load weights from {path}: {torch_load_error(exc)}") from None
    class_names = model_name = learning_rate = None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a checkpoint: ours, or {"model": ...}
        class_names = state.get("class_names")
        config = state.get("config")
        if isinstance(config, dict):  # ours (a {"model": ...} file of someone else's names no model)
            model_name = config.get("model", DEFAULT_MODEL)  # (runs from before --model were ResNet-18s)
            learning_rate = config.get("learning_rate")
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state, class_names, model_name, learning_rate


def imagenet_state_dict(name):
    """`name`'s ImageNet weights through torchvision's weights API (the hub cache first, then a
    download), with a clear error when offline."""
    if os.path.exists(cached_weights_path(name)):
        return load_weights_file(cached_weights_path(name))[0]
    weights = default_weights(name)
    try:  # downloads into the cache
        return weights.get_state_dict(progress=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"ImageNet weights for {name} are not cached and could not be downloaded ({reason}); "
            f"put {os.path.basename(weights.url)} from {weights.url} at {cached_weights_path(name)}, "
            "or pass --pretrained_path FILE, or --no_pretrained to train from scratch"
        ) from None


# Keys a weights file may lack: BatchNorm's step counters (files saved before PyTorch had them,
# such as the ImageNet ResNet-18). The head (head_keys) may be missing too: it is replaced anyway.
OPTIONAL_KEYS = re.compile(r"(^|\.)num_batches_tracked$")
# Prefixes a wrapped model's state dict carries: DistributedDataParallel's and torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped(state):
    """`state` without the DDP/torch.compile prefixes its keys may carry (in place, its metadata
    too: some models read their version from it, MNASNet's)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def renamed_legacy_keys(state):
    """`state` with the keys of older files renamed as the model has them now (in place)."""
    for key in list(state):
        legacy = DENSENET_LEGACY_KEY.match(key)
        if legacy:
            state[legacy[1] + legacy[2]] = state.pop(key)
        elif AUXILIARY_KEYS.match(key):
            del state[key]
    return state


def load_weights(model, state, optional=()):
    """Load `state` into `model`, strict but for BatchNorm's counters and the `optional` keys
    that may be missing; returns why it does not fit, in one line ('' if it loaded). The keys
    are compared after the model's own load hooks, which rename those of older files (ViT's)."""
    expected = model.state_dict()
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:  # (load_state_dict would fail)
        missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not OPTIONAL_KEYS.search(k) and k not in optional]
    parts = [
        f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes))
        if keys
    ]
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
def zero_init_residual(model, name=None):
    """Zero each residual block's last BatchNorm weight, so every block starts as the identity
    (torchvision's `zero_init_residual=True`, here also after loading weights). Says in one
    line what it did, naming the model `name` (default: its class)."""
    gammas = residual_gammas(model)
    for gamma in gammas.values():
        gamma.zero_()
    log = logging.getLogger("amp")
    if gammas:
        log.info(f"--zero_init_residual: zeroed the last BatchNorm weight of {len(gammas)} residual blocks")
    else:
        log.info(
            f"--zero_init_residual: {name or type(model).__name__} has no ResNet residual blocks (BasicBlock, "
            "Bottleneck: the resnet, resnext and wide_resnet models), the only ones it zeroes; nothing to zero"
        )
    return model


def build_model(
    num_classes,
    pretrained=True,
    pretrained_path=None,
    class_names=None,
    zero_residual=False,
    name=DEFAULT_MODEL,
    learning_rate=None,
):
    """torchvision's model `name` with a `num_classes` head; its state dict loads into a plain
    `torchvision.models.get_model(name, num_classes=num_classes)` (with BUILD_KWARGS).

    With `pretrained`, the weights come from `pretrained_path` or the ImageNet file. A run of
    this template keeps its head when it was trained on `class_names` (training a finished run
    further); any other head is replaced by a new one for our classes (fine-tuning). With
    `zero_residual`, the blocks' last BatchNorm weights are zeroed after that (zero_init_residual).
    `learning_rate`, the new run's peak LR, is for the advice on fine-tuning a run (fine_tuning_advice)."""
    model = load_model(name, num_classes, pretrained, pretrained_path, class_names, learning_rate)
    return zero_init_residual(model, name) if zero_residual else model


def load_model(name, num_classes, pretrained, pretrained_path, class_names, learning_rate=None):
    """build_model's model before zero_init_residual."""
    if not pretrained:
        return new_model(name, num_classes)
    source = pretrained_path or cached_weights_path(name)
    state, file_classes, file_model, file_lr = (
        load_weights_file(pretrained_path) if pretrained_path else (imagenet_state_dict(name), None, None, None)
    )
    state = renamed_legacy_keys(unwrapped(state))
    heads = head_keys(name)
    head = state.get(heads[0])
    # Built with the file's head first (1000 ImageNet classes), so the draws of a random init match torchvision's.
    model = new_model(name, head.shape[0] if head is not None and head.dim() > 0 else 1000)
    try:
        problem = load_weights(model, state, optional=heads)
    except (RuntimeError, ValueError) as exc:  # a load hook's complaint (MNASNet's about a file's version)
        problem = str(exc).splitlines()[0]
    if problem and file_model not in (None, name):
        raise UserError(
            f"{source} holds a --model {file_model} run's weights, which do not fit --model {name}; "
            f"pass --model {file_model} to fine-tune it"
        )
    if problem:
        raise UserError(f"the weights in {source} do not fit --model {name}: {problem}")
    if file_classes is not None and list(file_classes) == list(class_names or []) and head is not None:
        logging.getLogger("amp").info(
            f"--pretrained_path: starting from {pretrained_path} with its head "
            f"(the same {len(file_classes)} classes){fine_tuning_advice(file_lr, learning_rate)}"
        )
        return model
    if file_classes is not None:
        logging.getLogger("amp").info(
            f"--pretrained_path: fine-tuning {pretrained_path}; its head for {len(file_classes)} classes "
            f"({', '.join(file_classes)}) is replaced by a new one for this data's {num_classes}"
            f"{fine_tuning_advice(file_lr, learning_rate)}"
        )
    return replace_head(model, name, num_classes)


def fine_tuning_advice(trained_lr, learning_rate):
    """The end of --pretrained_path's line when a run starts from an earlier run's weights at a
    peak LR not well below the one they were trained at ('' otherwise): a new run warms up to
    its full peak again, and the first epochs at it can undo much of what the weights learned
    (validation accuracy fell from 77% to 56% in one epoch, issue 22)."""
    if trained_lr is None or learning_rate is None or learning_rate < trained_lr / 2:
        return ""
    return (
        f"; this run warms its LR up to --learning_rate {learning_rate:g} again (the earlier run peaked at "
        f"{trained_lr:g}), which can undo much of what the weights learned in the first epochs: to fine-tune, "
        f"pass a lower --learning_rate (e.g. {learning_rate / 10:g}) and a short --warmup_epochs (0 or 1)"
    )


# --------------------------------------------------------------------------- precise BatchNorm
# After T training batches a BatchNorm layer's running statistics still hold (1 - momentum)^T of
# their initial values (mean 0, variance 1), and average over the last ~1 / momentum batches,
# taken with weights that have changed since. torchvision's MobileNetV3 uses momentum 0.01 and
# MNASNet 0.0003: on a short run their statistics are mostly the initial values, and the model
# evaluates at chance however well it trained. Above this share, --precise_bn turns itself on.
UNCONVERGED_SHARE = 0.01
# --precise_bn's batches when it turns itself on (the whole training split if it has fewer).
AUTO_PRECISE_BN_BATCHES = 100


def batchnorm_layers(model):
    """The BatchNorm layers (SyncBatchNorm too) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def unconverged_batchnorm(model, batches):
    """(momentum, share) of the slowest BatchNorm layer of `model`: its momentum and the share of
    its initial statistics still in them after `batches` training batches; None when that share
    is at most UNCONVERGED_SHARE in every layer (or there is no BatchNorm)."""
    momenta = [m.momentum for m in batchnorm_layers(model) if m.momentum is not None]  # (None: a true average)
    if not momenta:
        return None
    share = (1 - min(momenta)) ** batches
    return (min(momenta), share) if share > UNCONVERGED_SHARE else None


def precise_bn_batches(model, name, requested, batches_per_epoch, epochs):
    """--precise_bn's batches for this run (0: off) and the line that says so ('' for none).
    `requested` is the flag: a number, 0 for off, or None to decide here: on where the
    BatchNorm statistics cannot have converged in the run's training batches."""
    if requested == 0:
        return 0, ""
    if not batchnorm_layers(model):
        return 0, f"--precise_bn: {name} has no BatchNorm layers; nothing to recompute" if requested else ""
    if requested:  # (more than an epoch has: the epoch's, as dataset.training_inputs takes them)
        used = min(requested, batches_per_epoch)
        capped = f" (all of an epoch's: it has {batches_per_epoch})" if requested > batches_per_epoch else ""
        return requested, (
            f"--precise_bn {requested}: BatchNorm statistics recomputed over {used} training "
            f"batches{capped} before each validation"
        )
    slowest = unconverged_batchnorm(model, epochs * batches_per_epoch)
    if slowest is None:
        return 0, ""
    batches = min(AUTO_PRECISE_BN_BATCHES, batches_per_epoch)
    momentum, share = slowest
    return batches, (
        f"precise BatchNorm is on: {name}'s BatchNorm momentum {momentum:.2g} would leave {share:.0%} of "
        f"its initial statistics in them after this run's {epochs * batches_per_epoch} training batches, "
        f"so they are recomputed over {batches} training batches before each validation "
        "(--precise_bn 0: off)"
    )


@torch.no_grad()
def recompute_batchnorm_statistics(models, inputs, autocast):
    """Precise BatchNorm (as in timm and Detectron2): each model's BatchNorm running statistics
    become their plain average over the batches of `inputs` (model inputs on the device, each
    forwarded under `autocast()`), measured with the model's current weights, instead of a
    moving average over older ones. Only the BatchNorm layers run in training mode; dropout
    and stochastic depth stay off, as in evaluation, so the statistics are those evaluation
    will see and no random number is drawn. Momentum, step counters and every module's mode
    are put back; if no batch completes, so are the statistics."""
    layers = [bn for model in models for bn in batchnorm_layers(model)]
    modes = [(module, module.training) for model in models for module in model.modules()]
    saved = [
        (bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in layers
    ]
    for model in models:
        model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.train()
    batches = 0
    try:
        for images in inputs:
            # A cumulative average (every batch weighs the same): batch k's momentum is 1 / k, what
            # momentum=None computes, but from the host's count, not by reading each layer's
            # num_batches_tracked back from the device (a host sync per layer and batch on a GPU).
            for bn in layers:
                bn.momentum = 1.0 / (batches + 1)
            with autocast():
                for model in models:
                    model(images)
            batches += 1
    finally:
        for bn, (momentum, mean, var, tracked) in zip(layers, saved):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)  # (it counts training batches)
            if not batches:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
        for module, training in modes:
            module.training = training
    return batches
