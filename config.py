"""Settings: the command-line flags with their defaults, checked and resolved into one config.

Parsing the flags and the checks of their values need no torch (parse_flags): main.py runs them
before torch loads, which takes seconds, so a typo or --help answers at once. The checks that
need torch (the device, the model) import it where they run."""

import argparse
import difflib
import math
import os
import re
import sys

from utils import UserError

# The choices of some flags, named here so the parser needs no torch. The code behind them:
# dataset.AUTO_AUGMENT, scheduler.SCHEDULES, model.DEFAULT_MODEL (tests/test_cli.py checks that they agree).
AUTO_AUGMENT_POLICIES = ("randaugment", "trivialaugment", "autoaugment")
SCHEDULES = ("cosine", "step", "constant")
DEFAULT_MODEL = "resnet18"

# What --demo changes, unless the flag is given explicitly: a run sized for a laptop CPU.
# (With --amp the run is named demo_amp, so the FP32 and AMP demos can be compared.)
DEMO_SETTINGS = dict(
    data_dir=os.path.join("data", "demo"),
    checkpoint_name="demo",
    image_size=64,
    batch_size=32,
    epochs=8,
    learning_rate=1e-3,
    warmup_epochs=1,
    pretrained=False,
)

# Where --benchmark writes benchmark.json (CHECKPOINT_DIR/NAME/), unless --checkpoint_name says otherwise.
BENCHMARK_NAME = "benchmark"
# --benchmark on the CPU, unless --batch_size / --image_size say otherwise.
CPU_BENCHMARK_SETTINGS = dict(batch_size=32, image_size=128)

# How this session runs, not what the run is: a resumed (or evaluated) run takes these from this
# session's flags and defaults, never from the saved run (so --compile or --cache can be dropped).
SESSION_SETTINGS = {
    "device",
    "num_workers",
    "log_interval",
    "progress",
    "deterministic",
    "cache",
    "compile",
    "benchmark_steps",
    "dist_timeout",
    "save_every_minutes",
}
# A resumed run keeps its saved settings; a flag may change these and SESSION_SETTINGS, no others.
RESUMABLE_OVERRIDES = SESSION_SETTINGS | {
    "data_dir",
    "checkpoint_dir",
    "save_every_steps",
    "channels_last",
    "tensorboard",
}
# --evaluate and --predict also take the run's saved settings; these may differ from them (none
# changes the model's answers).
EVALUATE_OVERRIDES = RESUMABLE_OVERRIDES | {
    "batch_size",
    "predict_dir",
    "predictions_file",
    "pretrained",
    "pretrained_path",
    "skip_bad_images",
    "fp32_math",
    "calibration_images",
}
# Flags of training alone: --benchmark times steps on synthetic data and reads none of them.
TRAINING_ONLY_FLAGS = {
    "epochs",
    "learning_rate",
    "weight_decay",
    "warmup_epochs",
    "min_lr",
    "clip_grad_norm",
    "accum_steps",
    "val_fraction",
    "skip_bad_images",
    "pretrained",
    "pretrained_path",
    "save_every_steps",
    "save_every_minutes",
    "amp",
    "sync_bn",
    "tensorboard",
    "lr_schedule",
    "lr_milestones",
    "lr_gamma",
    "label_smoothing",
    "zero_init_residual",
    "random_crop",
    "vflip",
    "auto_augment",
    "random_erase",
    "mixup_alpha",
    "cutmix_alpha",
    "ema_decay",
    "precise_bn",
}
# What a run saved before a flag existed did, where that is not the flag's default now.
SETTINGS_OF_OLDER_RUNS = {"precise_bn": 0}
# Settings stored under another name than their flag: (flag when False, flag when True).
NEGATED_FLAGS = {"pretrained": "--no_pretrained", "progress": "--no_progress"}
# Flags that select what main.py does, rather than how a run trains.
MODE_FLAGS = ("compare", "predict", "evaluate", "resume", "benchmark", "export")
# Modes that work on a finished run with its saved settings (they train nothing).
SAVED_RUN_MODES = ("evaluate", "predict", "export")
# The only flags --compare reads (it works on finished runs' results.json).
COMPARE_FLAGS = {"compare", "compare_name", "checkpoint_dir"}

AMP_DTYPES = ("float16", "bfloat16")
FP32_MATHS = ("ieee", "tf32")
OPTIMIZERS = ("adam", "adamw", "sgd", "radam")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# Other spellings of flags, the names users of timm's train.py and torchvision's classification
# reference type for the same setting (every --under_score flag also answers to its --dashed
# form; see spellings). Only where the meaning is ours: timm's and torchvision's --resume take a
# checkpoint path, ours is a switch, so they are no alias (UNLIKE_FLAGS says what to type instead).
# Under torchrun -b/--batch-size is our global batch, where theirs is per GPU (see --batch_size).
ALIASES = {
    "--data_dir": ("--data-path",),  # torchvision
    "--num_workers": ("-j", "--workers"),  # both
    "--image_size": ("--img-size",),  # timm
    "--batch_size": ("-b",),  # both
    "--optimizer": ("--opt",),  # both
    "--learning_rate": ("--lr",),  # both
    "--weight_decay": ("--wd",),  # torchvision
    "--warmup_epochs": ("--lr-warmup-epochs",),  # torchvision (timm's --warmup-epochs is the dashed form)
    "--min_lr": ("--lr-min",),  # torchvision
    "--lr_schedule": ("--sched", "--lr-scheduler"),  # timm, torchvision (with our schedules' names)
    "--lr_milestones": ("--decay-milestones",),  # timm's multistep
    "--lr_gamma": ("--decay-rate",),  # timm
    "--label_smoothing": ("--smoothing",),  # timm
    "--mixup_alpha": ("--mixup",),  # timm
    "--cutmix_alpha": ("--cutmix",),  # timm
    "--ema_decay": ("--model-ema-decay",),  # timm (per step, as ours; torchvision rescales its own)
    "--clip_grad_norm": ("--clip-grad",),  # timm (its default --clip-mode norm)
    "--accum_steps": ("--grad-accum-steps",),  # timm
    "--auto_augment": ("--aa",),  # timm (with our policies' names)
    "--random_erase": ("--reprob",),  # timm
    "--deterministic": ("--use-deterministic-algorithms",),  # torchvision
    "--pretrained_path": ("--initial-checkpoint",),  # timm
    "--checkpoint_dir": ("--output",),  # timm: the root folder, each run in a folder of its own
    "--checkpoint_name": ("--experiment",),  # timm: the run's folder name
    "--log_interval": ("--print-freq",),  # torchvision
}
# Flags of timm and torchvision that mean something else here, and what to type instead.
UNLIKE_FLAGS = {
    "--output-dir": "torchvision's --output-dir is one run's folder: here --checkpoint_dir DIR holds the runs "
    "and --checkpoint_name NAME names this one's folder",
    "--test-only": "to test a finished run's best.pt, pass --evaluate with its --checkpoint_name",
    "--model-ema": "the moving average of the weights is on when --ema_decay D is given, e.g. --ema_decay 0.9998",
    "--pretrained": "ImageNet weights are on by default; --no_pretrained turns them off",
    "--weights": "ImageNet weights are on by default; --pretrained_path FILE starts from a weights file",
    "--lr-step-size": "--lr_schedule step drops the LR at the epochs --lr_milestones lists, e.g. 30 60 90",
}


def spellings(flag):
    """The option strings of `flag` (its canonical --under_score name, which comes first and
    names the setting): itself, its --dashed form, and its ALIASES."""
    dashed = flag.replace("_", "-")
    return (flag, *([dashed] if dashed != flag else []), *ALIASES.get(flag, ()))


class _Group:
    """An argument group whose flags also answer to their other spellings."""

    def __init__(self, group):
        self.group = group

    def add_argument(self, flag, **kwargs):
        return self.group.add_argument(*spellings(flag), **kwargs)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every flag's default, except on on/off switches where it only confuses; a flag's
    spellings once each, its value after the last: --learning_rate, --learning-rate, --lr LEARNING_RATE."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or "default" in action.help:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {value}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is a user error like any other: one line, exit code 2. (A flag is named by
        its canonical spelling, not all of them: "argument --auto_augment: invalid choice ...")"""
        message = re.sub(r"^argument (-[^/:\s]+)(?:/-[^/:\s]+)+:", r"argument \1:", message)
        switch = re.match(r"^argument (-\S+): ignored explicit argument (.*)$", message)
        if switch:  # (--resume=ckpt.pth: as --resume ckpt.pth says it)
            raise UserError(self.switch_with_value(switch.group(1), switch.group(2)))
        raise UserError(f"{message} (see --help)")

    def switch_with_value(self, flag, value):
        """The line for a value given to a switch, which takes none."""
        action = next(a for a in self._actions if flag in a.option_strings)
        return f"{flag} takes no value ({action.help}), got {value}"

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if "--" in args:  # (argparse would read what follows as values, and name each flag as unknown)
            raise UserError("main.py takes no '--': drop it, and give the flags after it as flags")
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            raise UserError(self.unrecognized(args, extras))
        return namespace

    def unrecognized(self, argv, extras):
        """What is wrong with the arguments the parser could not place, in one line: each
        unknown flag with the flag meant (or what to type instead, UNLIKE_FLAGS), or a value
        after a switch, which takes none."""
        actions = {option: action for action in self._actions for option in action.option_strings}
        flags = [arg.split("=", 1)[0] for arg in extras if arg.startswith("-") and not _is_number(arg)]
        if flags:
            return "; ".join(f"unrecognized argument {flag} ({_meant(flag, actions)})" for flag in flags)
        value = extras[0]
        switches = [
            argv[i - 1]
            for i in range(1, len(argv))
            if argv[i] == value and argv[i - 1] in actions and actions[argv[i - 1]].nargs == 0
        ]
        if switches:
            return self.switch_with_value(switches[0], repr(value))
        return f"unrecognized argument {value!r} (see --help)"


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _meant(flag, actions):
    """The flags closest to `flag` by their spelling, as a hint: did you mean --batch_size?"""
    if flag.replace("_", "-") in UNLIKE_FLAGS:
        return UNLIKE_FLAGS[flag.replace("_", "-")]
    typed = flag.lower()
    # An abbreviation means a flag it begins (up to three of them); else the nearest spelling, if near.
    abbreviated = [option for option in actions if option.lower() == typed] or [
        option for option in actions if option.lower().startswith(typed)
    ]
    best = {}  # each flag by its spelling nearest to `flag` (the first of equals: the canonical one)
    for option in abbreviated or actions:
        score = difflib.SequenceMatcher(None, typed, option.lower()).ratio()
        action = actions[option]
        if action not in best or score > best[action][0]:
            best[action] = (score, option)
    ranked = sorted(best.values(), key=lambda scored: -scored[0])
    if not abbreviated:
        ranked = [(score, option) for score, option in ranked[:1] if score >= 0.75]
    if not ranked:
        return "see --help"
    options = [option for _, option in ranked[:3]]
    return f"did you mean {' or '.join(options) if len(options) < 3 else ', '.join(options[:2]) + ' or ' + options[2]}?"


def build_parser():
    p = _Parser(
        prog="main.py",
        allow_abbrev=False,  # an abbreviation's meaning would change when a flag is added
        description="Train a torchvision model (ResNet-18 by default) on an image-folder dataset in FP32 or with "
        "automatic mixed precision.",
        formatter_class=_HelpFormatter,
    )
    g = _Group(p.add_argument_group("data"))
    g.add_argument(
        "--data_dir",
        default="data",
        help="dataset root: seg_train/ and seg_test/ (Kaggle layout) or train/ and test/; a val/ folder "
        "beside them is the validation split (as torchvision's reference and timm lay out ImageNet)",
    )
    g.add_argument(
        "--demo",
        action="store_true",
        help="generate a small six-class dataset in data/demo and train a short CPU-sized run on it: "
        "64 px, batch 32, 8 epochs, lr 1e-3, 1 warmup epoch, random init, run name demo (demo_amp "
        "with --amp); flags you give win",
    )
    g.add_argument("--image_size", type=int, default=256, help="images are resized to S x S")
    g.add_argument(
        "--val_fraction",
        type=float,
        default=0.2,
        help="stratified share of the training split used for validation (without a val/ folder: see --data_dir)",
    )
    g.add_argument(
        "--test_fraction",
        type=float,
        default=None,
        metavar="F",
        help="for a data folder without a test split (class folders directly in it, or a training split "
        "alone): hold out this stratified share of the images as the test split, seeded by --seed "
        "(default: off)",
    )
    g.add_argument(
        "--random_crop",
        type=int,
        default=None,
        metavar="C",
        help="train on a random C x C crop of each resized image (C <= --image_size); validation, test "
        "and --predict take its center C x C crop (default: off)",
    )
    g.add_argument("--vflip", action="store_true", help="also flip training images vertically at random (p=0.5)")
    g.add_argument(
        "--auto_augment",
        choices=AUTO_AUGMENT_POLICIES,
        default=None,
        help="an augmentation policy on the training images: RandAugment, TrivialAugmentWide or "
        "AutoAugment's ImageNet policy (default: off)",
    )
    g.add_argument(
        "--random_erase",
        type=float,
        default=0.0,
        metavar="P",
        help="erase a random rectangle of each training image (to black) with probability P, after the "
        "other augmentations",
    )
    g.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="decode every image once before training and leave out the unreadable ones (listed in train.log)",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="data-loading processes per training process (0: load in the main process). Default: on a "
        "GPU this process's CPUs, on the CPU those PyTorch's threads leave (0 where they take them all), "
        "at most 8",
    )

    g = _Group(p.add_argument_group("model"))
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help="the torchvision classification model to train, by its name in torchvision.models.list_models() "
        "(resnet50, efficientnet_b2, regnet_y_1_6gf, mobilenet_v3_large, convnext_tiny, vit_b_16, ...); "
        "its classifier head is replaced for the dataset's classes",
    )
    g.add_argument(
        "--no_pretrained", dest="pretrained", action="store_false", help="random init instead of ImageNet weights"
    )
    g.add_argument(
        "--pretrained_path",
        default=None,
        help="start from this weights file instead of the torch hub's ImageNet weights: an ImageNet "
        "file of --model, or a best.pt/last.pt of an earlier run to fine-tune it (the head is replaced "
        "when its classes differ)",
    )

    g.add_argument(
        "--zero_init_residual",
        action="store_true",
        help="zero the last BatchNorm weight (gamma) of each ResNet residual block (resnet, resnext and "
        "wide_resnet models), so each block starts as the identity (after loading pretrained weights too)",
    )

    g = _Group(p.add_argument_group("optimization"))
    g.add_argument("--epochs", type=int, default=120, help="passes over the training split")
    g.add_argument(
        "--batch_size",
        type=int,
        default=256,
        help="images per optimizer step (per micro-batch with --accum_steps), over all processes under torchrun",
    )
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adam",
        help="adam, adamw (decoupled weight decay) and sgd run PyTorch's fused kernels, radam its foreach one",
    )
    g.add_argument("--learning_rate", type=float, default=1e-4, help="the peak LR, reached at the end of warmup")
    g.add_argument(
        "--weight_decay",
        type=float,
        default=1e-4,
        help="weight decay: an L2 penalty in the gradient (adam, sgd, radam), decoupled with adamw",
    )
    g.add_argument(
        "--no_bias_decay",
        action="store_true",
        help="no weight decay on biases and normalization weights (every parameter of one dimension or less)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="with --optimizer sgd: its momentum")
    g.add_argument("--nesterov", action="store_true", help="with --optimizer sgd: Nesterov momentum")
    g.add_argument(
        "--warmup_epochs", type=int, default=None, help="linear warmup length, below --epochs (default: epochs // 10)"
    )
    g.add_argument(
        "--min_lr",
        type=float,
        default=0.0,
        help="with --lr_schedule cosine: the LR of the last step, where the cosine ends",
    )
    g.add_argument(
        "--lr_schedule",
        choices=SCHEDULES,
        default="cosine",
        help="after the warmup: cosine down to --min_lr, step decay at --lr_milestones, or constant",
    )
    g.add_argument(
        "--lr_milestones",
        type=int,
        nargs="+",
        default=None,
        metavar="EPOCH",
        help="with --lr_schedule step: the epochs (increasing, after the warmup, below --epochs) after "
        "which the LR is multiplied by --lr_gamma, e.g. 30 60 90",
    )
    g.add_argument(
        "--lr_gamma", type=float, default=0.1, help="with --lr_schedule step: the LR's factor at each milestone"
    )
    g.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        metavar="EPS",
        help="label smoothing of the training loss (cross-entropy's own), 0 <= EPS < 1; validation and "
        "test losses stay plain cross-entropy, comparable across runs",
    )
    g.add_argument(
        "--mixup_alpha",
        type=float,
        default=0.0,
        metavar="A",
        help="mixup on the training batches: each image blended with another, by a share drawn from "
        "Beta(A, A), its target the two classes' shares (default: 0, off)",
    )
    g.add_argument(
        "--cutmix_alpha",
        type=float,
        default=0.0,
        metavar="B",
        help="cutmix on the training batches: a box of another image pasted in, its area drawn from "
        "Beta(B, B), its target the two classes' shares of the image (default: 0, off; with "
        "--mixup_alpha, each batch gets one of the two at random)",
    )
    g.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        metavar="D",
        help="also keep an exponential moving average of the weights and BatchNorm statistics, updated "
        "after every optimizer step (ema = D * ema + (1 - D) * weights, 0 < D < 1), validated every "
        "epoch; best.pt holds whichever validated better (default: off)",
    )
    g.add_argument(
        "--precise_bn",
        type=int,
        default=None,
        metavar="N",
        help="precise BatchNorm: recompute the BatchNorm running statistics over N training batches "
        "before each validation (default: on, over up to 100 batches, where the model's BatchNorm "
        "momentum cannot have converged in the run's training batches, as MobileNetV3's 0.01 on a "
        "short run; else off; 0: off)",
    )
    g.add_argument(
        "--clip_grad_norm",
        type=float,
        default=None,
        help="clip the gradient norm to this value (after unscaling; default: off)",
    )
    g.add_argument("--accum_steps", type=int, default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument(
        "--seed",
        type=int,
        default=42,
        help="fixes the init, the validation split, the batch order, the flips and augmentations, "
        "mixup/cutmix and dropout",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms only, so a resumed run ends with the same weights as an uninterrupted one",
    )

    g = _Group(p.add_argument_group("precision and device"))
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument(
        "--amp",
        action="store_true",
        help="automatic mixed precision: autocast (+ GradScaler for float16); float16 on CUDA, bfloat16 on the CPU",
    )
    g.add_argument(
        "--amp_dtype",
        choices=AMP_DTYPES,
        default=None,
        help="with --amp: the autocast dtype (default: float16 on CUDA, bfloat16 on the CPU; float16 on the "
        "CPU runs CUDA's recipe, GradScaler included, slowly); with --benchmark: float16 adds its rows "
        "on the CPU",
    )
    g.add_argument(
        "--fp32_math",
        choices=FP32_MATHS,
        default="ieee",
        help="how CUDA GPUs compute in FP32 (the FP32 run, and what autocast leaves in FP32): ieee, true "
        "float32; or tf32, TensorFloat-32 matrix products and convolutions (compute capability 8.0 "
        "and up: faster, 10-bit mantissa), shown as 'FP32 (tf32)'. The CPU computes IEEE FP32 either way",
    )

    g = _Group(p.add_argument_group("speed"))
    g.add_argument(
        "--channels_last",
        dest="channels_last",
        action="store_true",
        default=True,
        help="NHWC memory format: faster convolutions for tensor cores and oneDNN (see --benchmark); on by default",
    )
    g.add_argument(
        "--no_channels_last", dest="channels_last", action="store_false", help="keep NCHW (turns --channels_last off)"
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow start, see docs/benchmarks.md)"
    )
    g.add_argument("--cache", action="store_true", help="decode every image once and keep the uint8 pixels in RAM")
    g.add_argument(
        "--benchmark",
        action="store_true",
        help="time training steps in FP32 and AMP, NCHW and channels_last, on synthetic data; no dataset "
        "needed (on the CPU at batch 32, 128 px unless --batch_size/--image_size are given); writes "
        "CHECKPOINT_DIR/benchmark/benchmark.json (--checkpoint_name for another folder)",
    )
    g.add_argument("--data", action="store_true", help="with --benchmark: also time the input pipeline on the dataset")
    g.add_argument(
        "--benchmark_steps", type=int, default=10, help="timed steps per benchmark row (after 3 warm-up steps)"
    )

    g = _Group(p.add_argument_group("distributed (when started by torchrun)"))
    g.add_argument(
        "--sync_bn",
        action="store_true",
        help="SyncBatchNorm: BatchNorm statistics over the global batch, not each GPU's share (torchrun on CUDA GPUs)",
    )
    g.add_argument(
        "--dist_timeout",
        type=float,
        default=600,
        help="seconds a process waits for the others in a collective before the run fails",
    )

    g = _Group(p.add_argument_group("run"))
    g.add_argument("--checkpoint_name", default="baseline", help="run name: outputs go to CHECKPOINT_DIR/NAME/")
    g.add_argument("--checkpoint_dir", default="checkpoints", help="root folder of all runs")
    g.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    g.add_argument("--evaluate", action="store_true", help="test an existing run's best.pt and print its test accuracy")
    g.add_argument(
        "--save_every_steps",
        type=int,
        default=0,
        help="also write last.pt every N optimizer steps within an epoch (0: only at epoch ends)",
    )
    g.add_argument(
        "--save_every_minutes",
        type=float,
        default=None,
        metavar="M",
        help="also write last.pt within an epoch once M minutes have passed since the last one, checked "
        "every --log_interval steps by rank 0's clock, so a torchrun restart loses at most about M "
        "minutes (default: 10 when torchrun may restart the job, --max-restarts above 0; else off; "
        "0: off)",
    )
    g.add_argument(
        "--predict",
        action="store_true",
        help="label the unlabeled images (DATA_DIR/seg_pred) with the run's best.pt into NAME/predictions.csv",
    )
    g.add_argument(
        "--predict_dir", default=None, help="with --predict: the folder of images to label (default: DATA_DIR/seg_pred)"
    )
    g.add_argument(
        "--predictions_file",
        default=None,
        metavar="PATH",
        help="with --predict: write the CSV here (default: CHECKPOINT_DIR/NAME/predictions.csv)",
    )
    g.add_argument(
        "--export",
        action="store_true",
        help="ship the run's best.pt: NAME/model.onnx (uint8 RGB images in, normalization inside, dynamic "
        "batch, class names and preprocessing in its metadata) checked against PyTorch on the test "
        "split, NAME/model.int8.onnx (static INT8), and what each precision costs and buys "
        "(NAME/inference.json, inference.md)",
    )
    g.add_argument(
        "--calibration_images",
        type=int,
        default=256,
        metavar="N",
        help="with --export: the training images that calibrate the INT8 model's activation ranges",
    )
    g.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="NAME",
        help="print and save a comparison of finished runs: tables (.md), numbers (.json) and charts "
        "(.png) in CHECKPOINT_DIR, named compare_A_vs_B (see --compare_name); everything is relative "
        "to the first run, with 95%% intervals and a verdict",
    )
    g.add_argument(
        "--compare_name",
        default=None,
        metavar="NAME",
        help="with --compare: write CHECKPOINT_DIR/NAME.md, NAME.json and NAME.png (default: compare_ and "
        "the run names joined by _vs_)",
    )
    g.add_argument(
        "--log_interval",
        type=int,
        default=20,
        help="optimizer steps between progress-bar updates (and TensorBoard's per-step points)",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to CHECKPOINT_DIR/NAME/tensorboard/: per-step loss, LR, loss scale, gradient norm, "
        "images/s; per-epoch metrics; the test accuracy and settings (see tensorboard --logdir)",
    )
    g.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
    return p


def explicit_flags(parser, argv):
    """The dests of the flags the user actually typed (so defaults can be told from choices)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = action.const
            probe.add_argument(*action.option_strings, **kwargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def resolve_device(name):
    """The device this process trains on; under torchrun each process takes the GPU of its LOCAL_RANK."""
    import torch

    from distributed import launched_by_torchrun, local_rank

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
        if launched_by_torchrun():
            if device.index is not None:
                raise UserError(
                    f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                    "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)"
                )
            if local_rank() >= torch.cuda.device_count():
                raise UserError(
                    f"torchrun started more processes on this node than it has GPUs "
                    f"({torch.cuda.device_count()}); lower --nproc_per_node"
                )
            device = torch.device("cuda", local_rank())
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    else:
        device = torch.device("cpu")  # cpu:0 is the same CPU
    return str(device)


def bf16_supported():
    """Native bfloat16 on the current GPU (emulated bfloat16 is slower than float32)."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def validate(cfg):
    """Reject settings that cannot work, before anything is written."""
    check_values(cfg)
    check_on_this_machine(cfg)


def check_values(cfg):
    """The checks of the settings' own values, which need no torch (see parse_flags)."""
    for name in (
        "batch_size",
        "epochs",
        "image_size",
        "accum_steps",
        "log_interval",
        "benchmark_steps",
        "calibration_images",
    ):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    for name in (
        "learning_rate",
        "weight_decay",
        "min_lr",
        "val_fraction",
        "clip_grad_norm",
        "dist_timeout",
        "momentum",
        "lr_gamma",
        "label_smoothing",
        "test_fraction",
    ):
        value = getattr(cfg, name, None)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning_rate must be positive, got {cfg.learning_rate}")
    for name in ("weight_decay", "min_lr"):
        if (getattr(cfg, name) or 0) < 0:  # (min_lr is None for the step and constant schedules)
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {cfg.seed}")
    if (cfg.min_lr or 0) > cfg.learning_rate:
        raise UserError(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}")
    check_optimizer(cfg)
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:  # (None: a validation folder)
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    if getattr(cfg, "test_fraction", None) is not None and not 0 < cfg.test_fraction < 1:
        raise UserError(f"--test_fraction must be between 0 and 1 (exclusive), got {cfg.test_fraction}")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise UserError(
            f"--warmup_epochs must be at least 0 and below --epochs ({cfg.epochs}) so the LR can decay, "
            f"got {cfg.warmup_epochs}"
        )
    check_schedule(cfg)
    check_augmentation(cfg)
    check_regularization(cfg)
    if cfg.save_every_steps < 0:
        raise UserError(f"--save_every_steps must not be negative, got {cfg.save_every_steps}")
    minutes = getattr(cfg, "save_every_minutes", None)
    if minutes is not None and not (math.isfinite(minutes) and minutes >= 0):
        raise UserError(f"--save_every_minutes must be a number of minutes, 0 or more (0: off), got {minutes}")
    if (getattr(cfg, "precise_bn", None) or 0) < 0:
        raise UserError(f"--precise_bn must not be negative (0: off), got {cfg.precise_bn}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UserError(f"--num_workers must not be negative, got {cfg.num_workers}")
    if cfg.clip_grad_norm is not None and not cfg.clip_grad_norm > 0:
        raise UserError(f"--clip_grad_norm must be positive, got {cfg.clip_grad_norm}")
    compared = getattr(cfg, "compare", None) or []
    named = [("--checkpoint_name", cfg.checkpoint_name), *(("--compare", n) for n in compared)]
    named += [("--compare_name", cfg.compare_name)] if getattr(cfg, "compare_name", None) is not None else []
    for flag, name in named:
        if not NAME_PATTERN.match(name) or name in (".", ".."):
            raise UserError(f"{flag} {name!r} is not a plain run name: use letters, digits, '.', '_' and '-'")
    if not getattr(cfg, "dist_timeout", 1) > 0:
        raise UserError(f"--dist_timeout must be positive, got {cfg.dist_timeout}")


def check_on_this_machine(cfg):
    """The checks that need torch: the model takes the images, the device has the AMP dtype,
    and torchrun's processes can run what was asked."""
    import torch

    from distributed import launched_world_size

    check_model(cfg)
    check_precision(cfg)
    processes = launched_world_size()
    if getattr(cfg, "benchmark", False) and processes > 1:
        raise UserError("--benchmark times one GPU: run it with python main.py, not torchrun")
    if getattr(cfg, "sync_bn", False) and processes > 1 and torch.device(cfg.device).type != "cuda":
        raise UserError("--sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernels)")


def check_model(cfg):
    """--model must name a classification model of torchvision that takes the images it is given
    (--random_crop's, else --image_size's; a run that is resumed, evaluated or predicted with
    keeps the size it was trained at)."""
    from model import check_default_weights_fit, check_model_name, image_size_problem

    check_model_name(cfg.model)
    if not any(getattr(cfg, mode, None) for mode in ("resume", "compare", *SAVED_RUN_MODES)):
        flag = "--random_crop" if getattr(cfg, "random_crop", None) else "--image_size"
        problem = image_size_problem(cfg.model, input_size(cfg), flag)
        if problem:
            raise UserError(problem)
        if cfg.pretrained and not cfg.pretrained_path:
            check_default_weights_fit(cfg.model)


def check_optimizer(cfg):
    """The optimizer's and the loss's own numbers."""
    if cfg.momentum is not None and not 0 <= cfg.momentum < 1:
        raise UserError(f"--momentum must be at least 0 and below 1, got {cfg.momentum}")
    if cfg.nesterov and not cfg.momentum:
        raise UserError("--nesterov needs a --momentum above 0")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be at least 0 and below 1, got {cfg.label_smoothing}")


def check_regularization(cfg):
    """Mixup's and cutmix's Beta parameters (0: off) and the EMA's decay."""
    for name in ("mixup_alpha", "cutmix_alpha", "ema_decay"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    for name in ("mixup_alpha", "cutmix_alpha"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0 (0: off), got {getattr(cfg, name)}")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise UserError(f"--ema_decay must be between 0 and 1 (exclusive), e.g. 0.999, got {cfg.ema_decay}")


def check_schedule(cfg):
    """Step decay's milestones (epochs) must increase and fall after the warmup, within the run."""
    if cfg.lr_gamma is not None and not 0 < cfg.lr_gamma < 1:
        raise UserError(f"--lr_gamma must be between 0 and 1 (exclusive), got {cfg.lr_gamma}")
    if cfg.lr_schedule == "step" and not cfg.lr_milestones:
        raise UserError("--lr_schedule step needs --lr_milestones: the epochs at which the LR drops")
    milestones = cfg.lr_milestones or []
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise UserError(f"--lr_milestones must increase, got {' '.join(map(str, milestones))}")
    # A drop after the last epoch would never apply. (A resumed run may have one, from before
    # this check: it changes nothing, so the run goes on.)
    first, last = max(cfg.warmup_epochs, 1), cfg.epochs - (0 if getattr(cfg, "resume", False) else 1)
    fitting = (
        "none fits this run: train more --epochs"
        if first > last
        else f"use epoch {first}"
        if first == last
        else f"use epochs from {first} to {last}"
    )
    for m in milestones:
        if m > last:
            raise UserError(
                f"--lr_milestones {m} would never apply: the LR drops after epoch {m}, and the run ends "
                f"after epoch {cfg.epochs} (--epochs {cfg.epochs}); {fitting}"
            )
        if m < first:
            after = f"the warmup (--warmup_epochs {cfg.warmup_epochs})" if cfg.warmup_epochs else "epoch 0"
            raise UserError(f"--lr_milestones {m} must come after {after}: {fitting}")


def check_augmentation(cfg):
    """The crop must fit in the resized image; erasing's probability is one."""
    if cfg.random_crop is not None and not 1 <= cfg.random_crop <= cfg.image_size:
        raise UserError(f"--random_crop must be between 1 and --image_size ({cfg.image_size}), got {cfg.random_crop}")
    if not 0 <= cfg.random_erase <= 1:  # (nan and inf fail this too)
        raise UserError(f"--random_erase is a probability: between 0 and 1, got {cfg.random_erase}")


def input_size(cfg):
    """The side of the images the model sees: the --random_crop size, else --image_size."""
    return cfg.random_crop or cfg.image_size


def drop_unused(cfg):
    """Settings the run does not use are None, so config.json tells what it used: an Adam run
    has no --momentum, only a cosine has a --min_lr, only step decay milestones and a gamma."""
    if cfg.optimizer != "sgd":
        cfg.momentum = None
    if cfg.lr_schedule != "cosine":
        cfg.min_lr = None
    if cfg.lr_schedule != "step":
        cfg.lr_milestones = cfg.lr_gamma = None
    return cfg


def check_precision(cfg):
    """The AMP dtype must exist on the device this session runs on."""
    import torch

    device = torch.device(cfg.device)
    if cfg.amp and cfg.amp_dtype == "bfloat16" and device.type == "cuda" and not bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; use --amp_dtype float16")


def check_batch_split(cfg):
    """Under torchrun the global batch is split over the processes: evenly, and (at small image
    sizes) into shares of at least two images, since BatchNorm cannot train on one value per
    channel (ResNet-18's last feature map is 1x1 at 32 px or less)."""
    from distributed import launched_world_size

    processes = launched_world_size()
    if cfg.batch_size % processes:
        raise UserError(
            f"--batch_size {cfg.batch_size} is the global batch and must split evenly over the "
            f"{processes} processes torchrun started; change one of them"
        )
    if cfg.batch_size // processes == 1 and input_size(cfg) <= 32:
        where = "" if processes == 1 else f" over {processes} processes"
        size = f"--random_crop {cfg.random_crop}" if cfg.random_crop else f"--image_size {cfg.image_size}"
        raise UserError(
            f"--batch_size {cfg.batch_size}{where} gives BatchNorm one image at a time, which it cannot "
            f"train on at {size}; use at least 2 images per process"
        )


def check_flag_combinations(cfg, explicit):
    """Refuse flags the user typed that would be silently ignored or contradict each other.
    (Checked on the typed flags only: a resumed run's saved settings are not the user's typing.)"""
    modes = [f"--{mode}" for mode in MODE_FLAGS if getattr(cfg, mode)]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined; pass one of them")
    if cfg.overwrite and (cfg.resume or modes):
        what = "--resume continues the run" if cfg.resume else f"{modes[0]} trains nothing"
        raise UserError(f"--overwrite replaces a run with a new one, but {what}; drop one of them")
    if cfg.compare:
        ignored = sorted(explicit - COMPARE_FLAGS)
        if ignored:
            raise UserError(
                f"--compare only reads finished runs (under --checkpoint_dir); --{ignored[0]} does nothing with it"
            )
        twice = next((name for i, name in enumerate(cfg.compare) if name in cfg.compare[:i]), None)
        if twice is not None:  # a run counted twice would make a seed group of one run, sd 0
            raise UserError(f"--compare names {twice} twice; name each run once")
    if cfg.benchmark:
        ignored = sorted(explicit & TRAINING_ONLY_FLAGS)
        if ignored:
            extra = " (it times FP32 and AMP anyway)" if ignored[0] == "amp" else ""
            raise UserError(
                f"--benchmark times training steps on synthetic data; "
                f"{NEGATED_FLAGS.get(ignored[0], '--' + ignored[0])} does nothing with it{extra}"
            )
    for flag, needs in (
        ("amp_dtype", ("amp", "benchmark")),
        ("data", ("benchmark",)),
        ("predict_dir", ("predict",)),
        ("predictions_file", ("predict",)),
        ("benchmark_steps", ("benchmark",)),
        ("compare_name", ("compare",)),
        ("calibration_images", ("export",)),
    ):
        if flag in explicit and not any(getattr(cfg, mode) for mode in needs):
            raise UserError(f"--{flag} is only used with {' or '.join(f'--{mode}' for mode in needs)}")
    if cfg.tensorboard and any(getattr(cfg, mode) for mode in SAVED_RUN_MODES):
        raise UserError("--tensorboard logs training; --evaluate, --predict and --export train nothing")
    if "pretrained_path" in explicit and not cfg.pretrained:
        raise UserError(
            "--pretrained_path gives weights to start from, --no_pretrained says to start from random "
            "weights; drop one of them"
        )
    for flag, setting, value in (
        ("momentum", "optimizer", "sgd"),
        ("nesterov", "optimizer", "sgd"),
        ("min_lr", "lr_schedule", "cosine"),
        ("lr_milestones", "lr_schedule", "step"),
        ("lr_gamma", "lr_schedule", "step"),
    ):
        if flag in explicit and getattr(cfg, setting) != value:
            raise UserError(f"--{flag} is only used with --{setting} {value}, not --{setting} {getattr(cfg, setting)}")
    if "no_bias_decay" in explicit and cfg.weight_decay == 0:
        raise UserError(
            "--no_bias_decay exempts biases from weight decay, but --weight_decay 0 has none; drop one of them"
        )


def resolve(cfg):
    """Fill in the settings that depend on this machine (device, AMP dtype), then check what
    needs torch (see parse_flags for the rest)."""
    from distributed import launched_world_size, restarts_allowed

    if cfg.save_every_minutes is None:  # a job torchrun may restart loses at most ~10 minutes
        cfg.save_every_minutes = 10.0 if restarts_allowed() else 0.0
    if cfg.sync_bn and launched_world_size() == 1:
        raise UserError("--sync_bn only applies to several processes started by torchrun (on CUDA GPUs)")
    cfg.device = resolve_device(cfg.device)
    if cfg.num_workers is None:
        import torch

        from machine import default_workers

        cfg.num_workers = default_workers(torch.device(cfg.device).type, torch.get_num_threads())
    if not cfg.amp and not cfg.benchmark:
        cfg.amp_dtype = None  # FP32: config.json says so
    elif cfg.amp_dtype is None:
        cfg.amp_dtype = "float16" if cfg.device.startswith("cuda") else "bfloat16"
    check_on_this_machine(cfg)
    if not (cfg.resume or cfg.compare or any(getattr(cfg, mode) for mode in SAVED_RUN_MODES)):
        check_batch_split(cfg)  # (those take the run's saved batch size, or none: checked later)
    return cfg


def parse_flags(argv=None):
    """(config, the set of flags given explicitly), with every check that needs no torch: the
    flags exist and go together, and their values make sense. main.py runs it before torch
    loads, so a typo answers at once; parse_config then does the rest."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    cfg = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    check_flag_combinations(cfg, explicit)
    if cfg.demo:
        demo = {**DEMO_SETTINGS, "checkpoint_name": "demo_amp" if cfg.amp else "demo"}
        if "pretrained_path" in explicit:
            del demo["pretrained"]  # --demo --pretrained_path FILE: the file, as typed
        for name, value in demo.items():
            if name not in explicit:
                setattr(cfg, name, value)
        if "warmup_epochs" not in explicit and cfg.epochs <= cfg.warmup_epochs:
            cfg.warmup_epochs = 0  # --demo --epochs 1: no room for the demo's warmup epoch
    if cfg.benchmark and "checkpoint_name" not in explicit:
        cfg.checkpoint_name = BENCHMARK_NAME  # its own folder, not the default run's (nor --demo's)
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = cfg.epochs // 10
    drop_unused(cfg)
    check_values(cfg)
    return cfg, explicit


def parse_config(argv=None):
    """(config, the set of flags given explicitly): parse_flags, then the device, the AMP dtype
    and the checks that need torch."""
    cfg, explicit = parse_flags(argv)
    cfg = resolve(cfg)
    if cfg.benchmark and cfg.device == "cpu" and not cfg.demo:
        # Batch 256 at 256 px is ~20 s a step on a laptop CPU: --benchmark should take a minute.
        for name, value in CPU_BENCHMARK_SETTINGS.items():
            if name not in explicit:
                setattr(cfg, name, value)
    return cfg, explicit


def merge_saved(saved, cfg, explicit, overrides):
    """The settings of an existing run (resumed, evaluated or predicted with): its saved
    settings, plus the flags in `overrides` that may change between sessions. Any other flag
    that disagrees with the saved run is an error."""
    # A flag added since the run was saved: the run trained with its default (Adam before --optimizer),
    # or as it did then (no precise BatchNorm).
    before = {**vars(build_parser().parse_args([])), **SETTINGS_OF_OLDER_RUNS}
    defaults = {name: value for name, value in before.items() if name not in saved}
    merged = drop_unused(argparse.Namespace(**{**vars(cfg), **defaults, **saved}))
    for name in sorted(explicit - {*MODE_FLAGS, "overwrite", "demo", "checkpoint_name"}):
        value = getattr(cfg, name)
        if name in overrides:
            setattr(merged, name, value)
        elif getattr(merged, name) != value:
            mode = next(f"--{m}" for m in MODE_FLAGS if getattr(cfg, m))
            raise UserError(
                f"{mode}: run {cfg.checkpoint_name!r} was trained {as_flag(name, getattr(merged, name))}, "
                f"not {as_flag(name, value)}; drop the flag"
                + (" to continue it, or start a new run under another --checkpoint_name" if cfg.resume else "")
            )
    for name in (*MODE_FLAGS, "overwrite", *SESSION_SETTINGS):
        setattr(merged, name, getattr(cfg, name))  # (the device: where this session runs)
    # The run goes on where its checkpoint was read, even if its folder was moved or renamed.
    merged.checkpoint_dir, merged.checkpoint_name = cfg.checkpoint_dir, cfg.checkpoint_name
    if not merged.amp:
        merged.amp_dtype = None  # runs saved before config.json told the truth about FP32
    return merged


def merge_resumed(saved, cfg, explicit):
    """The config of a resumed run (see merge_saved), checked again as a whole."""
    merged = merge_saved(saved, cfg, explicit, RESUMABLE_OVERRIDES)
    validate(merged)
    check_batch_split(merged)
    return merged


def merge_evaluated(saved, cfg, explicit):
    """The config of --evaluate, --predict or --export on a saved run (see merge_saved)."""
    merged = merge_saved(saved, cfg, explicit, EVALUATE_OVERRIDES)
    trained_on_gpu = str(saved.get("device", "")).startswith("cuda")
    if (
        merged.amp
        and merged.device == "cpu"
        and merged.amp_dtype == "float16"
        and trained_on_gpu
        and "amp_dtype" not in explicit
    ):
        merged.amp_dtype = "bfloat16"  # float16 autocast is slow on most CPUs; bfloat16 has its range
    check_precision(merged)
    if merged.evaluate:  # (--predict runs in one process)
        check_batch_split(merged)
    return merged


def as_flag(name, value):
    """A setting as the flag that gives it: 'with --amp', 'without --no_pretrained', 'with --image_size 32'."""
    if isinstance(value, bool):
        flag, on = (NEGATED_FLAGS[name], not value) if name in NEGATED_FLAGS else (f"--{name}", value)
        return f"{'with' if on else 'without'} {flag}"
    if value is None:
        return f"without --{name}"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return f"with --{name} {value}"
