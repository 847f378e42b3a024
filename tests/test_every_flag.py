"""No flag without a test: every command-line flag is walked by a real run of the CLI.

How this file is built
----------------------
`CASES` is the single registry. A `Case` is one in-process run of `main.main(argv)` on tiny data
(32 px, batch 16, random init, no workers, CPU) plus a `check` that asserts what a user of the
flags would notice: a count in the log, a value in config.json / results.json / a checkpoint,
a file written, a progress bar off. `Case.flags` names the flags whose effect `check` asserts
(every one must appear in the case's argv); several flags share a run to keep the file fast.

- `test_every_parser_flag_has_a_case` reads the flags from `config.build_parser()` and fails,
  naming them, for any flag that no case in `CASES` covers.
- `test_flag_case` runs each case (parametrized from `CASES`).
- `PAIRS` is the explicit table of what every pair of mode flags does: refused with one line,
  or a case that runs. `REFUSALS` lists the other combinations and values refused with one line.
- docs/flags.md's tables and `--help` must list exactly the parser's flags.

Adding a flag: add it to the parser, regenerate docs/flags.md (`python tools/flags_md.py`), and add its effect to a
`Case` here: either a new `Case(id, flags=("--new_flag",), argv=[...], check=...)` or the flag
and an assertion in an existing case whose run it fits (a run costs ~1-2 s). A flag that cannot
run on this machine gets a case that checks its one-line refusal (see `--sync_bn`).

argv strings may hold placeholders, filled in when the case runs:
  {colours}   a learnable 3-class dataset, 20 train + 8 test images a class (tests/conftest.py)
  {bad_data}  the same with one unreadable .jpg in seg_train
  {weights}   a ResNet-18 state dict file (torchvision's random init, written by the test)
  {pictures}  5 unlabeled images, one in a subfolder
  {base}      the checkpoint dir of the shared finished run `base` (1 epoch on {colours})
  {demo_dir}, {demo_runs}  data and checkpoint dir of the shared 1-epoch `--demo` run (and its
              `--export`, the shared `demo_export`)
  {tmp}       the test's own temporary folder (checkpoints go to {tmp}/checkpoints)
Checks get `(run, shared)`: the finished `Run` and `shared.base` / `shared.demo`, the shared runs.
"""

import contextlib
import csv
import io
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import FAST, FEW_TIMING_RUNS, ROOT, SMALL_MODEL, assert_user_error, make_colour_dataset

import config
import dataset
import inference
import main as main_module
import trainer
from hardware import describe
from report import read_tensorboard_scalars

# A 1-epoch training run on the colours, in the test's own folder (add --checkpoint_name and the flags).
TRAIN = ["--data_dir", "{colours}", "--checkpoint_dir", "{tmp}/checkpoints", "--epochs", "1", *FAST]
# Refusals use a data folder that does not exist: a refusal comes before anything is read.
NO_DATA = ["--data_dir", "{tmp}/no_data", "--checkpoint_dir", "{tmp}/checkpoints", *FAST]
# TRAIN with progress bars (shown on a terminal; captured here, so tqdm turns them off itself).
WITH_BARS = [flag for flag in TRAIN if flag != "--no_progress"]
# FAST, but with ImageNet-style weights (from --pretrained_path).
FAST_PRETRAINED = [flag for flag in FAST if flag != "--no_pretrained"]
# --demo, kept small: its data and runs under the shared demo run's folders.
DEMO_FOLDERS = ["--data_dir", "{demo_dir}", "--checkpoint_dir", "{demo_runs}"]
DEMO_SIZES = ["--image_size", "32", "--batch_size", "16", "--num_workers", "0", "--no_progress"]
DEMO_SMALL = [*DEMO_FOLDERS, "--epochs", "1", *DEMO_SIZES]
DEMO_CLASSES = ["checkerboard", "circles", "diagonal", "horizontal_stripes", "squares", "vertical_stripes"]


# ----------------------------------------------------------------------------- running the CLI
class Spy:
    """What a run did inside, recorded by light wrappers around the real code."""

    def __init__(self):
        self.bars = []  # the `disable` argument of every progress bar
        self.postfix_updates = 0  # progress-bar postfix updates (every --log_interval steps)
        self.checkpoint_writes = []  # (file, epochs done, batches of the current epoch, deterministic algorithms on)
        self.clips = []  # (max_norm, gradient norm before clipping, after clipping)
        self.compiled = []  # the modules given to torch.compile
        self.initial_conv1 = []  # conv1 weights of each ResNet build_model made
        self.loader_workers = []  # num_workers of every DataLoader


@contextlib.contextmanager
def spies(spy):
    real_compile = torch.compile
    real_clip = torch.nn.utils.clip_grad_norm_
    real_save = trainer.Trainer.save_checkpoint
    real_build_model = main_module.build_model

    class Bar(trainer.tqdm):
        def __init__(self, *args, **kwargs):
            spy.bars.append(kwargs.get("disable"))
            super().__init__(*args, **kwargs)

        def set_postfix(self, *args, **kwargs):
            spy.postfix_updates += 1
            return super().set_postfix(*args, **kwargs)

    class Loader(dataset.DataLoader):
        def __init__(self, *args, **kwargs):
            spy.loader_workers.append(kwargs.get("num_workers", 0))
            super().__init__(*args, **kwargs)

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        spy.clips.append((max_norm, float(before), float(after)))
        return before

    def save_checkpoint(self, name):
        spy.checkpoint_writes.append(
            (name, self.state.epoch, self.state.batch_in_epoch, torch.are_deterministic_algorithms_enabled())
        )
        return real_save(self, name)

    def build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        if isinstance(getattr(model, "conv1", None), torch.nn.Conv2d):  # a ResNet (--model)
            spy.initial_conv1.append(model.conv1.weight.detach().clone())
        return model

    def compile(model, *args, **kwargs):
        # The wiring of --compile, without inductor's minute of compiling on a CPU.
        spy.compiled.append(model)
        return real_compile(model, *args, **{**kwargs, "backend": "eager"})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "tqdm", Bar)
        mp.setattr(dataset, "DataLoader", Loader)
        mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        mp.setattr(trainer.Trainer, "save_checkpoint", save_checkpoint)
        mp.setattr(main_module, "build_model", build_model)
        mp.setattr(torch, "compile", compile)
        yield


@contextlib.contextmanager
def global_torch_state_kept():
    """--deterministic and training switch process-wide torch settings: put them back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        torch._dynamo.reset()


@dataclass
class Run:
    """A finished `main.main(argv)`: exit code, captured output, what the spies saw."""

    argv: list
    code: int
    out: str
    err: str
    spy: Spy
    results_at_exit: dict = None  # results.json as the run left it (later runs may rewrite it)

    def flag(self, name, default=None):
        """The value of `name` in argv (its last one, as argparse takes it)."""
        if name not in self.argv:
            return default
        return self.argv[len(self.argv) - 1 - self.argv[::-1].index(name) + 1]

    @property
    def dir(self):
        default = "benchmark" if "--benchmark" in self.argv else "demo" if "--demo" in self.argv else "baseline"
        return Path(self.flag("--checkpoint_dir", "checkpoints")) / self.flag("--checkpoint_name", default)

    def assert_ok(self):
        assert self.code == 0, f"exit {self.code}\nstdout:\n{self.out[-3000:]}\nstderr:\n{self.err[-3000:]}"

    def results(self):
        return json.loads((self.dir / "results.json").read_text())

    def config(self):
        return json.loads((self.dir / "config.json").read_text())

    def checkpoint(self, name="last.pt"):
        return torch.load(self.dir / name, weights_only=True)

    def log(self):
        return (self.dir / "train.log").read_text()


def execute(argv, cwd):
    """main.main(argv) in this process, in `cwd` (so no default path like data/ or checkpoints/
    can reach the repository), stdout/stderr captured, the spies on."""
    spy, out, err = Spy(), io.StringIO(), io.StringIO()
    with (
        spies(spy),
        global_torch_state_kept(),
        contextlib.chdir(cwd),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = main_module.main(argv)
    run = Run(argv, code, out.getvalue(), err.getvalue(), spy)
    if (run.dir / "results.json").exists():
        run.results_at_exit = run.results()
    return run


class Placeholders(dict):
    """Fills {name} in argv from fixtures, built only when a case asks for them."""

    def __init__(self, request, tmp, **given):
        super().__init__(tmp=str(tmp), **given)
        self.request = request

    def __missing__(self, name):
        fixture = {"colours": "demo_data", "bad_data": "bad_data", "weights": "weights_file", "pictures": "pictures"}
        if name in fixture:
            value = str(self.request.getfixturevalue(fixture[name]))
        elif name == "base":
            value = self.request.getfixturevalue("base_run").flag("--checkpoint_dir")
        elif name in ("demo_dir", "demo_runs"):
            demo = self.request.getfixturevalue("demo_run")
            value = demo.flag("--data_dir" if name == "demo_dir" else "--checkpoint_dir")
        else:
            raise KeyError(name)
        self[name] = value
        return value

    def fill(self, argv):
        return [arg.format_map(self) for arg in argv]

    def execute(self, argv):
        """Run argv, its placeholders filled, in the temporary folder."""
        return execute(self.fill(argv), cwd=self["tmp"])


class Shared:
    """The shared finished runs, started on first use."""

    def __init__(self, request):
        self.request = request

    @property
    def base(self):
        return self.request.getfixturevalue("base_run")

    @property
    def demo(self):
        return self.request.getfixturevalue("demo_run")


@dataclass
class Case:
    id: str
    flags: tuple  # the flags whose effect `check` asserts
    argv: list = None  # None: the case checks a shared run (`reuse`)
    check: Callable = None  # check(run, shared)
    reuse: str = None  # "base_run", "demo_run" or "demo_export"
    setup: Callable = None  # setup(placeholders), before the run


# ----------------------------------------------------------------------------- shared data and runs
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = make_colour_dataset(tmp_path_factory.mktemp("bad_data"))
    Path(root, "seg_train", "seg_train", "red", "broken.jpg").write_bytes(b"this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    source = Path(make_colour_dataset(tmp_path_factory.mktemp("picture_source"), train_per_class=2, test_per_class=0))
    (root / "album").mkdir()
    for i, jpg in enumerate(sorted(source.glob("seg_train/seg_train/*/*.jpg"))[:5]):
        shutil.copy(jpg, root / ("album" if i == 0 else ".") / f"photo{i}.jpg")
    return root


BASE_ARGV = [
    "--data_dir",
    "{colours}",
    "--checkpoint_dir",
    "{base}",
    "--checkpoint_name",
    "base",
    "--epochs",
    "1",
    *FAST,
]


@pytest.fixture(scope="module")
def base_run(request, tmp_path_factory):
    """One finished 1-epoch run, shared by --evaluate, --predict, --resume and --compare."""
    tmp = tmp_path_factory.mktemp("base")
    run = Placeholders(request, tmp, base=str(tmp / "checkpoints")).execute(BASE_ARGV)
    yield run
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)


DEMO_ARGV = ["--demo", *DEMO_SMALL]


DEMO_EXPORT_ARGV = ["--demo", "--export", "--calibration_images", "8", *DEMO_FOLDERS, *DEMO_SIZES]


@pytest.fixture(scope="module")
def demo_export(request, demo_run):
    """The shared demo run, exported to ONNX once (it takes seconds), for --export and --demo --export;
    with the timing loops shortened (a test is no benchmark)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FEW_TIMING_RUNS.items():
            patch.setattr(inference, name, value)
        return Placeholders(request, Path(demo_run.flag("--checkpoint_dir")).parent).execute(DEMO_EXPORT_ARGV)


@pytest.fixture(scope="module")
def demo_run(request, tmp_path_factory):
    """One finished 1-epoch --demo run (generated 6-class data), shared by the --demo pairs."""
    tmp = tmp_path_factory.mktemp("demo")
    run = Placeholders(request, tmp, demo_dir=str(tmp / "data"), demo_runs=str(tmp / "checkpoints")).execute(DEMO_ARGV)
    yield run
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the checks
def check_base_run(run, shared):
    run.assert_ok()
    assert "training base: 48 train / 12 val / 24 test images, 3 classes" in run.out  # --data_dir: the colours
    assert "3 steps x 1 epoch\n" in run.out  # --batch_size 16: 48 images in 3 steps
    for name in ("best.pt", "last.pt", "results.json", "config.json", "train.log"):
        assert (run.dir / name).exists(), name  # --checkpoint_dir / --checkpoint_name
    assert run.results_at_exit["run"] == "base" and run.results_at_exit["finished"]
    cfg = run.config()
    assert cfg["image_size"] == 32 and run.checkpoint("best.pt")["config"]["image_size"] == 32
    assert cfg["batch_size"] == 16
    assert cfg["pretrained"] is False and cfg["device"] == "cpu"
    assert "cuda" not in run.results_at_exit["device"].lower()
    assert run.spy.bars and all(disable is True for disable in run.spy.bars)  # --no_progress: every bar off
    # Only at epoch ends (no --save_every_steps): last.pt after a finished epoch.
    assert [w[:3] for w in run.spy.checkpoint_writes if w[0] == "last.pt"] == [("last.pt", 1, 0)]


def check_schedule(run, shared):
    run.assert_ok()
    results = run.results_at_exit
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]  # --epochs 2
    # --accum_steps 2: 3 micro-batches an epoch -> 2 optimizer steps, 4 in all.
    assert "2 steps x 2 epochs" in run.out
    last = run.checkpoint("last.pt")
    assert last["scheduler"]["last_epoch"] == 4
    # --learning_rate 0.004, --warmup_epochs 1 (2 steps), --min_lr 0.001: the LR curve.
    lrs = [e["lr"] for e in results["epochs"]]
    assert lrs[0] == pytest.approx(0.002)  # first warmup step: half the peak
    assert lrs[1] == pytest.approx(0.0025)  # step 2 of 4: halfway down the cosine from 0.004 to 0.001
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)  # it ends at --min_lr
    assert last["optimizer"]["param_groups"][0]["weight_decay"] == 0.05  # --weight_decay
    # --clip_grad_norm 0.5: every optimizer step clips, and the clipped norm is at most 0.5.
    assert len(run.spy.clips) == 4
    assert all(max_norm == 0.5 and after <= 0.5 * 1.001 for max_norm, _, after in run.spy.clips)
    assert any(before > 0.5 for _, before, _ in run.spy.clips)  # it had something to clip
    # --num_workers 1: the loaders load in a worker process.
    assert run.config()["num_workers"] == 1 and set(run.spy.loader_workers) == {1}
    # --no_channels_last: the weights stay NCHW.
    assert run.config()["channels_last"] is False
    assert last["model"]["conv1.weight"].is_contiguous()


def check_seed(run, shared):
    run.assert_ok()
    assert run.config()["seed"] == 7
    ours, base = run.results_at_exit["epochs"][0], shared.base.results_at_exit["epochs"][0]
    # Another seed: another init, batch order and validation split, so other numbers.
    assert ours["train_loss"] != base["train_loss"]
    assert ours["val_loss"] != base["val_loss"]


def check_split_cache_log_interval(run, shared):
    run.assert_ok()
    assert "training split: 30 train / 30 val / 24 test images" in run.out  # --val_fraction 0.5
    assert "--cache: 30 train, 30 val and 24 test images decoded" in run.out
    # --log_interval 1: the progress bar's numbers update after each of the 2 steps (batch 16 of
    # 30 images), not only at the epoch's end as in the base run.
    assert run.spy.postfix_updates == 2
    assert shared.base.spy.postfix_updates == 1
    assert run.spy.bars and all(disable is None for disable in run.spy.bars)  # no --no_progress: bars on a terminal
    # --channels_last: the saved weights are in NHWC memory format.
    assert run.config()["channels_last"] is True
    conv1 = run.checkpoint("best.pt")["model"]["conv1.weight"]
    assert conv1.is_contiguous(memory_format=torch.channels_last) and not conv1.is_contiguous()


def check_amp(run, shared):
    run.assert_ok()
    results = run.results_at_exit
    assert results["precision"] == "AMP bf16" and results["amp"] is True and results["amp_dtype"] == "bfloat16"
    assert "(AMP bf16)" in run.out
    assert run.config()["amp_dtype"] == "bfloat16"
    # --tensorboard: the run's folder holds its series, and the epoch's numbers are results.json's.
    scalars = read_tensorboard_scalars(run.dir / "tensorboard")
    assert [v for _, v in scalars["epoch/val_acc"]] == pytest.approx([e["val_acc"] for e in results["epochs"]])
    assert scalars["test/acc"][0][1] == pytest.approx(results["test_acc"])


def check_skip_bad_images_and_pretrained_path(run, shared):
    run.assert_ok()
    # --skip_bad_images: the broken file is left out and named in train.log.
    assert "left out 1 unreadable image" in run.out
    assert "broken.jpg" in run.log()
    assert "training weights: 48 train / 12 val / 24 test images" in run.out
    # --pretrained_path: the model starts from the file's weights.
    weights = torch.load(run.flag("--pretrained_path"), weights_only=True)
    assert len(run.spy.initial_conv1) == 1
    torch.testing.assert_close(run.spy.initial_conv1[0], weights["conv1.weight"], rtol=0, atol=0)
    cfg = run.config()
    assert cfg["pretrained"] is True and cfg["pretrained_path"] == run.flag("--pretrained_path")


def write_stale_run(placeholders, name):
    """An old run's files, for --overwrite to replace."""
    folder = Path(placeholders["tmp"]) / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"stale": True}))
    (folder / "predictions.csv").write_text("file,label,confidence\nold.jpg,old,1.0\n")
    (folder / "model.onnx").write_bytes(b"an old run's export")  # (not the new run's model)


def check_deterministic_save_every_steps_overwrite(run, shared):
    run.assert_ok()
    # --overwrite: the old run's files are gone, the new run's are there.
    assert "stale" not in run.results_at_exit and run.results_at_exit["finished"]
    assert not (run.dir / "predictions.csv").exists() and not (run.dir / "model.onnx").exists()
    # --deterministic: training ran with deterministic algorithms only; the same seed gave the
    # base run's numbers.
    cfg = run.config()
    assert cfg["deterministic"] is True
    assert run.spy.checkpoint_writes and all(w[3] for w in run.spy.checkpoint_writes)
    ours, base = run.results_at_exit["epochs"][0], shared.base.results_at_exit["epochs"][0]
    assert (ours["train_loss"], ours["val_loss"]) == pytest.approx((base["train_loss"], base["val_loss"]), rel=1e-5)
    # --save_every_steps 2: last.pt is also written inside the epoch, after its 2nd step.
    assert ("last.pt", 0, 2) in [w[:3] for w in run.spy.checkpoint_writes]
    # --dist_timeout: recorded (it only acts under torchrun).
    assert cfg["dist_timeout"] == 30


def check_save_every_minutes(run, shared):
    run.assert_ok()
    # --save_every_minutes (a tiny M, checked every --log_interval 1 steps): last.pt after each
    # step inside the epoch, as the clock says it is due; the default outside torchrun is off.
    inside = [w[2] for w in run.spy.checkpoint_writes if w[:2] == ("last.pt", 0)]
    assert inside[:2] == [1, 2], run.spy.checkpoint_writes
    assert run.config()["save_every_minutes"] == 1e-9 and shared.base.config()["save_every_minutes"] == 0


def check_compile(run, shared):
    run.assert_ok()
    assert len(run.spy.compiled) == 1  # the training model went through torch.compile
    assert run.config()["compile"] is True
    assert run.results_at_exit["finished"] and len(run.results_at_exit["epochs"]) == 1


def check_benchmark(run, shared):
    run.assert_ok()
    rows = json.loads((run.dir / "benchmark.json").read_text())["rows"]
    assert [(r["mode"], r["channels_last"]) for r in rows] == [
        ("fp32", False),
        ("fp32", True),
        ("amp_bfloat16", False),
        ("amp_bfloat16", True),
    ]
    assert "batch 2, 32x32 px" in run.out and "the median of 1 steps" in run.out  # --benchmark_steps 1
    assert describe("cpu").capability in run.out  # the header names what the CPU computes natively
    assert ("bfloat16 native" if describe("cpu", "bfloat16").native else "bfloat16 emulated") in run.out
    assert (run.dir / "benchmark_data.json").exists() and "feed the fastest training mode" in run.out  # --data


def check_evaluate(run, shared):
    run.assert_ok()
    test_acc = shared.base.results_at_exit["test_acc"]
    assert f"test accuracy {test_acc:.2f}%" in run.out and "base" in run.out
    # It rewrites the run's per-image test predictions: every test image once, right as often as test_acc says.
    rows = read_predictions(run.dir / "test_predictions.csv")
    assert f"wrote {run.dir / 'test_predictions.csv'}" in run.out
    assert len(rows) == 24 and len({r["file"] for r in rows}) == 24 and rows[0]["file"] == "blue/0.jpg"
    assert 100 * sum(r["true_label"] == r["predicted_label"] for r in rows) / 24 == pytest.approx(test_acc)


def read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


PICTURES = ["album/photo0.jpg", "photo1.jpg", "photo2.jpg", "photo3.jpg", "photo4.jpg"]


def check_predict(run, shared):
    run.assert_ok()
    rows = read_predictions(run.dir / "predictions.csv")
    assert [r["file"] for r in rows] == PICTURES  # --predict_dir: the pictures, at any depth
    assert {r["label"] for r in rows} <= {"blue", "green", "red"}
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)


def remove_base_predictions(placeholders):
    (Path(placeholders["base"]) / "base" / "predictions.csv").unlink(missing_ok=True)


def check_predictions_file(run, shared):
    run.assert_ok()
    path = Path(run.flag("--predictions_file"))
    assert [r["file"] for r in read_predictions(path)] == PICTURES
    assert str(path) in run.out
    assert not (run.dir / "predictions.csv").exists()  # written to PATH instead


def check_export(run, shared):
    run.assert_ok()
    for name in ("model.onnx", "model.int8.onnx", "inference.json", "inference.md"):
        assert (run.dir / name).exists(), name  # --export: in the run folder, beside best.pt
    report = json.loads((run.dir / "inference.json").read_text())
    assert report["calibration_images"] == 8 and "on 8 training images" in run.out  # --calibration_images
    assert {(row["precision"], row["runtime"]) for row in report["rows"]} >= {
        ("fp32", "pytorch"),
        ("fp32", "onnxruntime"),
        ("int8", "onnxruntime"),
    }
    assert report["test_images"] == 180 and report["run"] == "demo"  # --demo: the demo run and its test split
    assert next(r for r in report["rows"] if r["runtime"] == "onnxruntime")["agreement"] >= 99.9


def check_compare(run, shared):
    run.assert_ok()
    table = Path(run.flag("--checkpoint_dir")) / "compare_base.md"  # named from the runs
    assert "| base |" in table.read_text() and "| base |" in run.out
    assert (Path(run.flag("--checkpoint_dir")) / "compare_base.png").exists()
    assert json.loads(table.with_suffix(".json").read_text())["runs"][0]["vs_first"] is None


def check_compare_name(run, shared):
    run.assert_ok()
    folder = Path(run.flag("--checkpoint_dir"))
    assert {p.name for p in folder.glob("mine.*")} == {"mine.md", "mine.json", "mine.png"}
    assert [r["name"] for r in json.loads((folder / "mine.json").read_text())["runs"]] == ["base"]


def check_resume(run, shared):
    run.assert_ok()
    # A finished run (issue 22, item 5): it says so and what to do instead, and trains nothing.
    test_acc = shared.base.results_at_exit["test_acc"]
    assert f"base is finished: it trained its 1 epoch and was tested (test accuracy {test_acc:.2f}%)" in run.out
    assert "--evaluate" in run.out and "--pretrained_path" in run.out and "training base" not in run.out
    assert run.spy.checkpoint_writes == [] and run.results_at_exit == shared.base.results_at_exit


def check_demo(run, shared):
    run.assert_ok()
    data = run.flag("--data_dir")
    assert f"wrote a generated demo dataset to {data}" in run.out
    assert sorted(os.listdir(Path(data, "seg_train", "seg_train"))) == DEMO_CLASSES
    assert os.listdir(run.flag("--checkpoint_dir")) == ["demo"]  # the demo's run name
    assert run.results_at_exit["class_names"] == DEMO_CLASSES and run.results_at_exit["finished"]
    cfg = run.config()
    assert cfg["pretrained"] is False and cfg["learning_rate"] == 1e-3  # the demo's settings ...
    assert cfg["image_size"] == 32 and cfg["epochs"] == 1  # ... where no flag says otherwise


def check_sgd_no_bias_decay(run, shared):
    run.assert_ok()
    optimizer = run.checkpoint("last.pt")["optimizer"]
    groups = optimizer["param_groups"]
    # --optimizer sgd --momentum 0.8 --nesterov: fused SGD with Nesterov momentum, its buffers saved.
    assert [(g["momentum"], g["nesterov"], g["fused"]) for g in groups] == [(0.8, True, True)] * 2
    assert optimizer["state"] and all(set(s) == {"momentum_buffer"} for s in optimizer["state"].values())
    # --no_bias_decay: ResNet-18's 21 convolution and linear weights decay; its 41 biases and
    # BatchNorm weights and biases do not.
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(1e-4, 21), (0.0, 41)]
    cfg = run.config()
    assert (cfg["optimizer"], cfg["momentum"], cfg["nesterov"], cfg["no_bias_decay"]) == ("sgd", 0.8, True, True)


def check_step_schedule_zero_init_residual(run, shared):
    run.assert_ok()
    # --lr_schedule step --lr_milestones 2 --lr_gamma 0.5, after --warmup_epochs 1 (3 steps an
    # epoch): the first warmup step, the peak, then half the peak from epoch 2's end on.
    assert [e["lr"] for e in run.results_at_exit["epochs"]] == pytest.approx([0.002 / 3, 0.002, 0.001])
    cfg = run.config()
    assert (cfg["lr_schedule"], cfg["lr_milestones"], cfg["lr_gamma"], cfg["min_lr"]) == ("step", [2], 0.5, None)
    # --zero_init_residual: each block's last BatchNorm weight started at 0, so after 9 small
    # steps it is still near 0, where the other BatchNorm weights are still near 1.
    assert "--zero_init_residual: zeroed the last BatchNorm weight of 8 residual blocks" in run.out
    model = run.checkpoint("last.pt")["model"]
    assert cfg["zero_init_residual"] is True
    last_bn = [key for key in model if re.fullmatch(r"layer\d\.\d\.bn2\.weight", key)]
    assert len(last_bn) == 8 and all(model[key].abs().max() < 0.05 for key in last_bn)
    assert all(model[key].abs().min() > 0.9 for key in model if key.endswith("bn1.weight"))


def check_label_smoothing(run, shared):
    run.assert_ok()
    assert run.config()["label_smoothing"] == 0.1
    # --fp32_math tf32 is recorded; the CPU computes IEEE FP32 either way, so the row says FP32.
    assert run.config()["fp32_math"] == "tf32" and run.results_at_exit["precision"] == "FP32"
    # The base run's data, seed and steps: smoothed targets are never one-hot, so the training
    # loss of a model that learns them stays higher.
    ours, base = run.results_at_exit["epochs"][0], shared.base.results_at_exit["epochs"][0]
    assert ours["train_loss"] > base["train_loss"] + 0.05


def check_precise_bn(run, shared):
    run.assert_ok()
    # --precise_bn 1: the BatchNorm statistics recomputed over one training batch before validating.
    assert "--precise_bn 1: BatchNorm statistics recomputed over 1 training batches before each validation" in run.out
    assert run.config()["precise_bn"] == 1
    # The base run's ResNet-18 had 3 training batches, too few for momentum 0.1 (0.9^3 = 73% of the
    # initial statistics left): it recomputed them over all 3 by itself.
    assert shared.base.config()["precise_bn"] == 3 and "precise BatchNorm is on" in shared.base.out
    # The same training (the statistics are not used by it), another validation.
    ours, base = run.results_at_exit["epochs"][0], shared.base.results_at_exit["epochs"][0]
    assert ours["train_loss"] == base["train_loss"] and ours["val_loss"] != base["val_loss"]


def copy_class_folders(placeholders):
    """The colours' training class folders alone, as {tmp}/classes/<class>/: no train/test split."""
    shutil.copytree(Path(placeholders["colours"], "seg_train", "seg_train"), Path(placeholders["tmp"], "classes"))


def check_test_fraction(run, shared):
    run.assert_ok()
    # --test_fraction 0.5 of 60 images in class folders: 10 a class to test, 2 of the other 10 to validation.
    assert "training held_out: 24 train / 6 val / 30 test images, 3 classes" in run.out
    assert run.config()["test_fraction"] == 0.5
    assert [sum(row) for row in run.results_at_exit["confusion_matrix"]] == [10, 10, 10]


def check_model(run, shared):
    run.assert_ok()
    # --model: config.json and the checkpoints name it; best.pt loads into torchvision's own model,
    # whose head (classifier.3) was replaced for the 3 classes.
    assert run.config()["model"] == "mobilenet_v3_small" and "model: mobilenet_v3_small, 1.52M parameters" in run.out
    best = run.checkpoint("best.pt")
    assert best["config"]["model"] == "mobilenet_v3_small" and best["model"]["classifier.3.weight"].shape == (3, 1024)
    torchvision.models.get_model("mobilenet_v3_small", num_classes=3).load_state_dict(best["model"])


def check_mixup_cutmix(run, shared):
    run.assert_ok()
    cfg = run.config()
    assert (cfg["mixup_alpha"], cfg["cutmix_alpha"]) == (0.4, 1.0)
    # The base run's data, seed, init and batches, mixed: other training and validation numbers.
    ours, base = run.results_at_exit["epochs"][0], shared.base.results_at_exit["epochs"][0]
    assert ours["train_loss"] != base["train_loss"] and ours["val_loss"] != base["val_loss"]
    assert "val_acc_ema" not in ours and "test_acc_ema" not in run.results_at_exit  # no --ema_decay


def check_ema_decay(run, shared):
    run.assert_ok()
    assert run.config()["ema_decay"] == 0.5
    # The EMA trains nothing: the base run's numbers, plus the EMA's validation and test.
    results, base = run.results_at_exit, shared.base.results_at_exit
    ours = results["epochs"][0]
    assert (ours["train_loss"], ours["val_loss"]) == pytest.approx(
        (base["epochs"][0]["train_loss"], base["epochs"][0]["val_loss"]), rel=1e-5
    )
    assert 0 <= ours["val_acc_ema"] <= 100 and ours["val_loss_ema"] != ours["val_loss"]
    assert f"EMA acc {ours['val_acc_ema']:.2f}" in run.out and 0 <= results["test_acc_ema"] <= 100
    last, best = run.checkpoint("last.pt"), run.checkpoint("best.pt")
    assert int(last["ema"]["n_averaged"]) == 3 and last["weights"] == "raw"  # an update per step; last.pt: raw
    assert best["weights"] == results["best_weights"] in ("raw", "ema")


def check_refused(*flags):
    def check(run, shared):
        assert_refused(run, *flags)

    return check


def assert_refused(run, *flags):
    """Refused as a user error: exit 2, one line on stderr naming each flag, nothing written."""
    assert_user_error((run.code, run.out, run.err))
    assert "unrecognized argument" not in run.err, run.err
    unnamed = [flag for flag in flags if not re.search(re.escape(flag) + r"(?![A-Za-z0-9_])", run.err)]
    assert not unnamed, f"the error does not name {' and '.join(unnamed)}: {run.err}"
    written = Path(run.flag("--checkpoint_dir"))
    assert not written.exists() or not any(written.iterdir()), f"a refused run wrote {list(written.iterdir())}"


# Augmentation (issue 12, item 5).
def check_augmentation(run, shared):
    run.assert_ok()
    cfg = run.config()
    assert (cfg["auto_augment"], cfg["random_crop"], cfg["vflip"], cfg["random_erase"]) == (
        "randaugment",
        24,
        True,
        0.25,
    )
    assert run.results_at_exit["precision"] == "AMP bf16"
    # The base run's data, seed and steps, on other (augmented, cropped) images: other numbers.
    assert run.results_at_exit["epochs"][0]["train_loss"] != shared.base.results_at_exit["epochs"][0]["train_loss"]
    # --evaluate takes the saved crop (the center 24 x 24) and finds the run's own test accuracy.
    evaluated = execute(
        [
            "--evaluate",
            "--checkpoint_dir",
            run.flag("--checkpoint_dir"),
            "--checkpoint_name",
            "augment",
            "--data_dir",
            run.flag("--data_dir"),
            "--device",
            "cpu",
            "--num_workers",
            "0",
        ],
        cwd=Path(run.flag("--checkpoint_dir")).parent,
    )
    evaluated.assert_ok()
    assert f"test accuracy {run.results_at_exit['test_acc']:.2f}%" in evaluated.out


# ----------------------------------------------------------------------------- the registry
CASES = [
    Case(
        "base_run",
        reuse="base_run",
        check=check_base_run,
        flags=(
            "--data_dir",
            "--checkpoint_dir",
            "--checkpoint_name",
            "--image_size",
            "--batch_size",
            "--no_pretrained",
            "--device",
            "--no_progress",
        ),
    ),
    Case(
        "schedule_accumulation_clipping",
        check=check_schedule,
        flags=(
            "--epochs",
            "--learning_rate",
            "--warmup_epochs",
            "--min_lr",
            "--weight_decay",
            "--accum_steps",
            "--clip_grad_norm",
            "--num_workers",
            "--no_channels_last",
        ),
        argv=[
            *TRAIN,
            "--checkpoint_name",
            "schedule",
            "--epochs",
            "2",
            "--warmup_epochs",
            "1",
            "--learning_rate",
            "0.004",
            "--min_lr",
            "0.001",
            "--weight_decay",
            "0.05",
            "--accum_steps",
            "2",
            "--clip_grad_norm",
            "0.5",
            "--num_workers",
            "1",
            "--no_channels_last",
        ],
    ),
    Case("seed", flags=("--seed",), check=check_seed, argv=[*TRAIN, "--checkpoint_name", "seed7", "--seed", "7"]),
    Case(
        "val_fraction_cache_log_interval_channels_last",
        check=check_split_cache_log_interval,
        flags=("--val_fraction", "--cache", "--log_interval", "--channels_last"),
        argv=[
            *WITH_BARS,
            "--checkpoint_name",
            "split",
            "--val_fraction",
            "0.5",
            "--cache",
            "--log_interval",
            "1",
            "--channels_last",
        ],
    ),
    Case(
        "amp_tensorboard",
        flags=("--amp", "--amp_dtype", "--tensorboard"),
        check=check_amp,
        argv=[*TRAIN, "--checkpoint_name", "amp", "--amp", "--amp_dtype", "bfloat16", "--tensorboard", *SMALL_MODEL],
    ),
    Case(
        "skip_bad_images_pretrained_path",
        flags=("--skip_bad_images", "--pretrained_path"),
        check=check_skip_bad_images_and_pretrained_path,
        argv=[
            "--data_dir",
            "{bad_data}",
            "--checkpoint_dir",
            "{tmp}/checkpoints",
            "--checkpoint_name",
            "weights",
            "--epochs",
            "1",
            *FAST_PRETRAINED,
            "--skip_bad_images",
            "--pretrained_path",
            "{weights}",
        ],
    ),
    Case(
        "deterministic_save_every_steps_overwrite_dist_timeout",
        check=check_deterministic_save_every_steps_overwrite,
        flags=("--deterministic", "--save_every_steps", "--overwrite", "--dist_timeout"),
        setup=lambda p: write_stale_run(p, "again"),
        argv=[
            *TRAIN,
            "--checkpoint_name",
            "again",
            "--deterministic",
            "--save_every_steps",
            "2",
            "--overwrite",
            "--dist_timeout",
            "30",
        ],
    ),
    Case(
        "optimizer_sgd_no_bias_decay",
        check=check_sgd_no_bias_decay,
        flags=("--optimizer", "--momentum", "--nesterov", "--no_bias_decay"),
        argv=[
            *TRAIN,
            "--checkpoint_name",
            "sgd",
            "--optimizer",
            "sgd",
            "--momentum",
            "0.8",
            "--nesterov",
            "--no_bias_decay",
        ],
    ),
    Case(
        "step_schedule_zero_init_residual",
        check=check_step_schedule_zero_init_residual,
        flags=("--lr_schedule", "--lr_milestones", "--lr_gamma", "--zero_init_residual"),
        argv=[
            *TRAIN,
            "--checkpoint_name",
            "step",
            "--epochs",
            "3",
            "--warmup_epochs",
            "1",
            "--lr_schedule",
            "step",
            "--lr_milestones",
            "2",
            "--lr_gamma",
            "0.5",
            "--zero_init_residual",
        ],
    ),
    Case(
        "test_fraction",
        flags=("--test_fraction",),
        check=check_test_fraction,
        setup=copy_class_folders,
        argv=[
            "--data_dir",
            "{tmp}/classes",
            "--checkpoint_dir",
            "{tmp}/checkpoints",
            "--epochs",
            "1",
            *FAST,
            "--checkpoint_name",
            "held_out",
            "--test_fraction",
            "0.5",
        ],
    ),
    Case(
        "precise_bn",
        flags=("--precise_bn",),
        check=check_precise_bn,
        argv=[*TRAIN, "--checkpoint_name", "precise", "--precise_bn", "1"],
    ),
    Case(
        "label_smoothing_fp32_math",
        flags=("--label_smoothing", "--fp32_math"),
        check=check_label_smoothing,
        argv=[*TRAIN, "--checkpoint_name", "smooth", "--label_smoothing", "0.1", "--fp32_math", "tf32"],
    ),
    Case(
        "compile",
        flags=("--compile",),
        check=check_compile,
        argv=[*TRAIN, "--checkpoint_name", "compiled", "--compile"],
    ),
    Case(
        "benchmark",
        flags=("--benchmark", "--data", "--benchmark_steps"),
        check=check_benchmark,
        argv=[
            "--benchmark",
            "--data",
            "--benchmark_steps",
            "1",
            "--device",
            "cpu",
            "--batch_size",
            "2",
            "--image_size",
            "32",
            "--data_dir",
            "{colours}",
            "--num_workers",
            "0",
            "--checkpoint_dir",
            "{tmp}/checkpoints",
            "--checkpoint_name",
            "bench",
            *SMALL_MODEL,
        ],
    ),
    Case(
        "evaluate",
        flags=("--evaluate",),
        check=check_evaluate,
        argv=[
            "--evaluate",
            "--checkpoint_dir",
            "{base}",
            "--checkpoint_name",
            "base",
            "--data_dir",
            "{colours}",
            "--device",
            "cpu",
            "--num_workers",
            "0",
        ],
    ),
    Case(
        "predict",
        flags=("--predict", "--predict_dir"),
        check=check_predict,
        argv=[
            "--predict",
            "--predict_dir",
            "{pictures}",
            "--checkpoint_dir",
            "{base}",
            "--checkpoint_name",
            "base",
            "--device",
            "cpu",
            "--num_workers",
            "0",
        ],
    ),
    Case(
        "predictions_file",
        flags=("--predictions_file",),
        check=check_predictions_file,
        setup=remove_base_predictions,
        argv=[
            "--predict",
            "--predict_dir",
            "{pictures}",
            "--predictions_file",
            "{tmp}/labels.csv",
            "--checkpoint_dir",
            "{base}",
            "--checkpoint_name",
            "base",
            "--device",
            "cpu",
            "--num_workers",
            "0",
        ],
    ),
    Case(
        "compare", flags=("--compare",), check=check_compare, argv=["--compare", "base", "--checkpoint_dir", "{base}"]
    ),
    Case(
        "compare_name",
        flags=("--compare_name",),
        check=check_compare_name,
        argv=["--compare", "base", "--compare_name", "mine", "--checkpoint_dir", "{base}"],
    ),
    Case(
        "resume",
        flags=("--resume",),
        check=check_resume,
        argv=[
            "--resume",
            "--checkpoint_dir",
            "{base}",
            "--checkpoint_name",
            "base",
            "--data_dir",
            "{colours}",
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--no_progress",
        ],
    ),
    Case("demo", flags=("--demo",), check=check_demo, reuse="demo_run"),
    # No torchrun here: --sync_bn must be refused, not silently ignored.
    Case(
        "sync_bn_refused_without_torchrun",
        flags=("--sync_bn",),
        check=check_refused("--sync_bn"),
        argv=[*NO_DATA, "--sync_bn"],
    ),
    # Augmentation (issue 12, item 5): all four in one AMP run, then --evaluate at the crop size.
    Case(
        "augmentation",
        flags=("--auto_augment", "--random_crop", "--vflip", "--random_erase"),
        check=check_augmentation,
        argv=[
            *TRAIN,
            "--checkpoint_name",
            "augment",
            "--auto_augment",
            "randaugment",
            "--random_crop",
            "24",
            "--vflip",
            "--random_erase",
            "0.25",
            "--amp",
            *SMALL_MODEL,
        ],
    ),
    # ---- issue 12: --model (the zoo; more in tests/test_zoo.py)
    Case(
        "model",
        flags=("--model",),
        check=check_model,
        argv=[*TRAIN, "--checkpoint_name", "zoo", "--model", "mobilenet_v3_small"],
    ),
    # Mixup, cutmix and the EMA of the weights (issue 12; tests/test_mix_ema.py has the rest).
    Case(
        "mixup_cutmix",
        flags=("--mixup_alpha", "--cutmix_alpha"),
        check=check_mixup_cutmix,
        argv=[*TRAIN, "--checkpoint_name", "mix", "--mixup_alpha", "0.4", "--cutmix_alpha", "1.0"],
    ),
    Case("export", flags=("--export", "--calibration_images"), check=check_export, reuse="demo_export"),
    Case(
        "ema_decay",
        flags=("--ema_decay",),
        check=check_ema_decay,
        argv=[*TRAIN, "--checkpoint_name", "ema", "--ema_decay", "0.5"],
    ),
    # Issue 19: the time-based mid-epoch last.pt (its torchrun default: tests/test_elastic.py).
    Case(
        "save_every_minutes",
        flags=("--save_every_minutes",),
        check=check_save_every_minutes,
        argv=[*TRAIN, "--checkpoint_name", "timed", "--save_every_minutes", "1e-9", "--log_interval", "1"],
    ),
]


def argv_of(case):
    return (
        {"base_run": BASE_ARGV, "demo_run": DEMO_ARGV, "demo_export": DEMO_EXPORT_ARGV}[case.reuse]
        if case.reuse
        else case.argv
    )


def parser_flags():
    """Each flag by its canonical spelling (its other spellings are config.ALIASES', tested in test_cli.py)."""
    return {action.option_strings[0] for action in config.build_parser()._actions} - {"-h"}


def test_every_parser_flag_has_a_case():
    covered = {flag for case in CASES for flag in case.flags}
    missing = sorted(parser_flags() - covered)
    assert not missing, (
        f"flags without a case in CASES: {', '.join(missing)}. Add each to a Case that runs it and "
        "checks its effect (see the top of tests/test_every_flag.py)"
    )


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_flag_case(case, request, tmp_path):
    unused = [flag for flag in case.flags if flag not in argv_of(case)]
    assert not unused, f"case {case.id} claims {unused} but does not pass them"
    try:
        if case.reuse:
            run = request.getfixturevalue(case.reuse)
        else:
            placeholders = Placeholders(request, tmp_path)
            if case.setup:
                case.setup(placeholders)
            run = placeholders.execute(case.argv)
        case.check(run, Shared(request))
    finally:
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)


# ----------------------------------------------------------------------------- pairs of mode flags
MODES = ("--resume", "--evaluate", "--predict", "--compare", "--benchmark", "--demo", "--overwrite", "--export")
REFUSED = "refused with one line"


def check_demo_resume(run, shared):
    run.assert_ok()
    assert "demo is finished" in run.out and "training demo" not in run.out  # nothing to resume
    assert run.results_at_exit == shared.demo.results_at_exit


def check_demo_evaluate(run, shared):
    run.assert_ok()
    assert f"test accuracy {shared.demo.results_at_exit['test_acc']:.2f}%" in run.out and "demo" in run.out


def check_demo_predict(run, shared):
    run.assert_ok()
    rows = read_predictions(run.dir / "predictions.csv")  # DATA_DIR/seg_pred of the demo data: 12 images
    assert len(rows) == 12 and {r["label"] for r in rows} <= set(DEMO_CLASSES)


def check_demo_benchmark(run, shared):
    run.assert_ok()
    assert "batch 2, 32x32 px" in run.out
    # Into its own folder (issue 22, item 4), not the demo run's.
    assert run.dir == Path(run.flag("--checkpoint_dir")) / "benchmark"
    assert len(json.loads((run.dir / "benchmark.json").read_text())["rows"]) == 4
    assert not (Path(run.flag("--checkpoint_dir")) / "demo" / "benchmark.json").exists()


def check_demo_overwrite(run, shared):
    run.assert_ok()
    assert "wrote a generated demo dataset" not in run.out  # the data was there already
    results = run.results_at_exit
    assert "stale" not in results and results["finished"] and results["class_names"] == DEMO_CLASSES
    assert not (run.dir / "predictions.csv").exists() and not (run.dir / "model.onnx").exists()


# Every pair of MODES, in one table: REFUSED, or the Case that runs it.
PAIRS = {
    ("--resume", "--evaluate"): REFUSED,
    ("--resume", "--predict"): REFUSED,
    ("--resume", "--compare"): REFUSED,
    ("--resume", "--benchmark"): REFUSED,
    ("--resume", "--overwrite"): REFUSED,
    ("--evaluate", "--predict"): REFUSED,
    ("--evaluate", "--compare"): REFUSED,
    ("--evaluate", "--benchmark"): REFUSED,
    ("--evaluate", "--overwrite"): REFUSED,  # --overwrite only applies to training a new run
    ("--predict", "--compare"): REFUSED,
    ("--predict", "--benchmark"): REFUSED,
    ("--predict", "--overwrite"): REFUSED,
    ("--compare", "--benchmark"): REFUSED,
    ("--compare", "--overwrite"): REFUSED,
    ("--benchmark", "--overwrite"): REFUSED,
    ("--demo", "--compare"): REFUSED,  # --compare takes only run names and --checkpoint_dir
    ("--export", "--resume"): REFUSED,
    ("--export", "--evaluate"): REFUSED,
    ("--export", "--predict"): REFUSED,
    ("--export", "--compare"): REFUSED,
    ("--export", "--benchmark"): REFUSED,
    ("--export", "--overwrite"): REFUSED,
    ("--demo", "--export"): Case("demo_export", (), DEMO_EXPORT_ARGV, check_export, reuse="demo_export"),
    ("--demo", "--resume"): Case("demo_resume", (), ["--demo", "--resume", *DEMO_SMALL], check_demo_resume),
    ("--demo", "--evaluate"): Case("demo_evaluate", (), ["--demo", "--evaluate", *DEMO_SMALL], check_demo_evaluate),
    ("--demo", "--predict"): Case("demo_predict", (), ["--demo", "--predict", *DEMO_SMALL], check_demo_predict),
    ("--demo", "--benchmark"): Case(
        "demo_benchmark",
        (),
        [
            "--demo",
            "--benchmark",
            *DEMO_FOLDERS,
            *DEMO_SIZES,
            "--batch_size",
            "2",
            "--benchmark_steps",
            "1",
            *SMALL_MODEL,
        ],
        check_demo_benchmark,
    ),  # (no --epochs: --benchmark trains no epochs)
    ("--demo", "--overwrite"): Case(
        "demo_overwrite",
        (),
        ["--demo", "--overwrite", *DEMO_SMALL, "--checkpoint_dir", "{tmp}/checkpoints", *SMALL_MODEL],
        check_demo_overwrite,
        setup=lambda p: write_stale_run(p, "demo"),
    ),
}


def mode_argv(flag):
    return ["--compare", "a", "b"] if flag == "--compare" else [flag]


def refused_pair_argv(a, b):
    """The two mode flags and as little else as possible (--compare takes only run names and
    --checkpoint_dir); if a pair is not refused, it fails fast on the missing data or run."""
    argv = [*mode_argv(a), *mode_argv(b), "--checkpoint_dir", "{tmp}/checkpoints"]
    if "--compare" not in (a, b):
        argv += ["--data_dir", "{tmp}/no_data", "--device", "cpu"]
        if "--benchmark" in (a, b):
            argv += ["--batch_size", "2", "--image_size", "32", "--benchmark_steps", "1"]
    return argv


def test_the_pair_table_covers_every_pair_of_mode_flags():
    assert {frozenset(pair) for pair in PAIRS} == {frozenset(pair) for pair in itertools.combinations(MODES, 2)}
    assert len(PAIRS) == 28


@pytest.mark.parametrize("pair", list(PAIRS), ids=[" ".join(pair) for pair in PAIRS])
def test_mode_pair(pair, request, tmp_path):
    expected = PAIRS[pair]
    placeholders = Placeholders(request, tmp_path)
    try:
        if expected == REFUSED:
            assert_refused(placeholders.execute(refused_pair_argv(*pair)), *pair)
            return
        if expected.reuse:  # a shared run that is this pair's run
            expected.check(request.getfixturevalue(expected.reuse), Shared(request))
            return
        if expected.setup:
            expected.setup(placeholders)
        expected.check(placeholders.execute(expected.argv), Shared(request))
    finally:
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)


def test_demo_with_amp_is_named_demo_amp_unless_given():
    assert config.parse_config(["--demo", "--device", "cpu"])[0].checkpoint_name == "demo"
    assert config.parse_config(["--demo", "--amp", "--device", "cpu"])[0].checkpoint_name == "demo_amp"
    assert (
        config.parse_config(["--demo", "--amp", "--device", "cpu", "--checkpoint_name", "x"])[0].checkpoint_name == "x"
    )


# ----------------------------------------------------------------------------- other refusals
# (what, argv, the flags the one line must name). Each is refused before anything is read or
# written, so the data folder does not even exist.
REFUSALS = [
    ("amp_dtype without --amp", [*NO_DATA, "--amp_dtype", "bfloat16"], ("--amp_dtype", "--amp")),
    ("--data without --benchmark", [*NO_DATA, "--data"], ("--data", "--benchmark")),
    (
        "--pretrained_path with --no_pretrained",
        [*NO_DATA, "--pretrained_path", "{weights}"],
        ("--pretrained_path", "--no_pretrained"),
    ),
    (
        "--compare with training flags",
        ["--compare", "a", "b", "--epochs", "3", "--checkpoint_dir", "{tmp}/checkpoints"],
        ("--compare", "--epochs"),
    ),
    ("--predict_dir without --predict", [*NO_DATA, "--predict_dir", "{pictures}"], ("--predict_dir", "--predict")),
    (
        "--predictions_file without --predict",
        [*NO_DATA, "--predictions_file", "{tmp}/p.csv"],
        ("--predictions_file", "--predict"),
    ),
    ("--learning_rate inf", [*NO_DATA, "--learning_rate", "inf"], ("--learning_rate",)),
    ("--learning_rate nan", [*NO_DATA, "--learning_rate", "nan"], ("--learning_rate",)),
    ("--weight_decay nan", [*NO_DATA, "--weight_decay", "nan"], ("--weight_decay",)),
    ("--clip_grad_norm inf", [*NO_DATA, "--clip_grad_norm", "inf"], ("--clip_grad_norm",)),
    ("--val_fraction nan", [*NO_DATA, "--val_fraction", "nan"], ("--val_fraction",)),
    (
        "--warmup_epochs equal to --epochs",
        [*NO_DATA, "--epochs", "2", "--warmup_epochs", "2"],
        ("--warmup_epochs", "--epochs"),
    ),
    ("--random_crop above --image_size", [*NO_DATA, "--random_crop", "40"], ("--random_crop", "--image_size")),
    ("--random_erase above 1", [*NO_DATA, "--random_erase", "1.5"], ("--random_erase",)),
    ("--auto_augment unknown", [*NO_DATA, "--auto_augment", "augmix"], ("--auto_augment",)),
    ("--model unknown", [*NO_DATA, "--model", "resnet181"], ("--model",)),
    ("--model vit_b_16 at 32 px", [*NO_DATA, "--model", "vit_b_16"], ("--model", "--image_size")),
    (
        "--model vit_b_16 on a 64 px crop",
        [*NO_DATA, "--model", "vit_b_16", "--image_size", "256", "--random_crop", "64"],
        ("takes 224 x 224 images only", "pass --random_crop 224"),
    ),
    ("--model ResNet50", [*NO_DATA, "--model", "ResNet50"], ("lowercase", "--model resnet50")),
    (
        "--model vit_h_14 with its 518 px ImageNet weights",  # (refused before any download)
        [
            "--data_dir",
            "{tmp}/no_data",
            "--checkpoint_dir",
            "{tmp}/checkpoints",
            "--device",
            "cpu",
            "--model",
            "vit_h_14",
            "--image_size",
            "224",
        ],
        ("DEFAULT ImageNet weights of --model vit_h_14 are for 518 x 518", "--no_pretrained"),
    ),
    (
        "--lr_milestones at --epochs",
        [*NO_DATA, "--epochs", "2", "--warmup_epochs", "0", "--lr_schedule", "step", "--lr_milestones", "2"],
        ("--lr_milestones 2 would never apply", "use epoch 1"),
    ),
    pytest.param(
        "--device cuda without a GPU",
        [*NO_DATA, "--device", "cuda"],
        ("--device",),
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU"),
        id="--device cuda without a GPU",
    ),
    ("--mixup_alpha negative", [*NO_DATA, "--mixup_alpha", "-1"], ("--mixup_alpha",)),
    ("--cutmix_alpha nan", [*NO_DATA, "--cutmix_alpha", "nan"], ("--cutmix_alpha",)),
    ("--ema_decay 1", [*NO_DATA, "--ema_decay", "1"], ("--ema_decay",)),
    ("--ema_decay with --benchmark", [*NO_DATA, "--benchmark", "--ema_decay", "0.9"], ("--ema_decay", "--benchmark")),
    ("--compare_name without --compare", [*NO_DATA, "--compare_name", "x"], ("--compare_name", "--compare")),
    (
        "--compare_name not a plain name",
        ["--compare", "a", "--compare_name", "../x", "--checkpoint_dir", "{tmp}/c"],
        ("--compare_name",),
    ),
    (
        "--compare of a run twice",
        ["--compare", "a", "b", "a", "--checkpoint_dir", "{tmp}/c"],
        ("--compare names a twice",),
    ),
    (
        "--compare_name empty",
        ["--compare", "a", "--compare_name", "", "--checkpoint_dir", "{tmp}/c"],
        ("--compare_name ''",),
    ),
    ("--fp32_math unknown", [*NO_DATA, "--fp32_math", "bf16"], ("--fp32_math",)),
    (
        "--calibration_images without --export",
        [*NO_DATA, "--calibration_images", "8"],
        ("--calibration_images", "--export"),
    ),
    ("--calibration_images 0", [*NO_DATA, "--export", "--calibration_images", "0"], ("--calibration_images",)),
    ("--tensorboard with --export", [*NO_DATA, "--export", "--tensorboard"], ("--tensorboard", "--export")),
    ("--test_fraction 1", [*NO_DATA, "--test_fraction", "1"], ("--test_fraction must be between 0 and 1",)),
    ("--precise_bn negative", [*NO_DATA, "--precise_bn", "-1"], ("--precise_bn must not be negative",)),
    (
        "--precise_bn with --benchmark",
        [
            "--data_dir",
            "{tmp}/no_data",
            "--checkpoint_dir",
            "{tmp}/checkpoints",
            "--device",
            "cpu",
            "--benchmark",
            "--precise_bn",
            "5",
        ],
        ("--precise_bn", "--benchmark"),
    ),
]


@pytest.mark.parametrize("what,argv,flags", REFUSALS, ids=[r[0] if isinstance(r, tuple) else r.id for r in REFUSALS])
def test_refused_with_one_line(what, argv, flags, request, tmp_path):
    assert_refused(Placeholders(request, tmp_path).execute(argv), *flags)


# ----------------------------------------------------------------------------- README and --help
def documented_flags():
    """The flags docs/flags.md's tables list, each by its canonical spelling (a row's first)."""
    flags = set()
    for line in Path(ROOT, "docs", "flags.md").read_text().splitlines():
        if line.startswith("| `--"):
            flags.add(re.match(r"\| `(--[A-Za-z0-9_]+)`", line).group(1))
    return flags


def help_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main_module.main(["--help"])
    assert exit_.value.code == 0
    # Option lines are indented by two spaces and start with the flag's canonical spelling, its
    # others after it: "  --data_dir, --data-dir, --data-path DATA_DIR  help" or "  -h, --help  help".
    flags = set()
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flags.add(re.match(r"-{1,2}[A-Za-z0-9_]+", line[2:]).group())
    return flags - {"-h"}


def assert_same_flags(listed, where):
    in_parser = parser_flags()
    missing, unknown = sorted(in_parser - listed), sorted(listed - in_parser)
    assert not missing and not unknown, (
        f"{where} lacks {', '.join(missing) or 'nothing'}; "
        f"{where} lists flags the parser does not have: {', '.join(unknown) or 'none'}"
    )


def test_the_flags_page_lists_exactly_the_parser_flags():
    assert_same_flags(documented_flags(), "docs/flags.md")


def test_help_lists_exactly_the_parser_flags(capsys):
    assert_same_flags(help_flags(capsys), "python main.py --help")
