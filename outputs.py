"""What a run writes as it trains, besides its checkpoints: results.json, curves.png and
confusion.png, TensorBoard's scalars, and the lines it prints for each epoch and the test. Rank 0
writes; a disk that refuses stops every rank with one line."""

import hashlib
import os
import re
import time
from types import SimpleNamespace

from distributed import from_main_process, is_main_process, world_size
from hardware import device_name, tf32_on
from hardware import record as hardware_record
from machine import busy_note
from report import (
    TensorBoardLog,
    busy_epochs_note,
    comparison_table,
    memory_note,
    per_class_accuracy,
    per_class_report,
    plot_confusion,
    plot_curves,
    write_test_predictions,
)
from step import HOST_SYNC_OPTIMIZERS, precision_name
from utils import RunStopped, atomic_write_json


class RunOutputs:
    """The run folder's results.json and plots, and (with --tensorboard, on rank 0) its
    TensorBoard series, whose x axis is the optimizer step."""

    def __init__(self, cfg, run_dir, device, class_names, log):
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.class_names = class_names
        self.log = log
        self.tensorboard = None  # a TensorBoardLog while the run trains with --tensorboard (rank 0)
        self.last_logged = None  # (time, images) at the last --log_interval step, for images/s

    def announce(self, sizes, steps_per_epoch, float16_scaler):
        """The run's first line: images per split, classes, device, precision, steps and epochs."""
        cfg = self.cfg
        self.log.info(
            f"training {cfg.checkpoint_name}: {sizes[0]} train / {sizes[1]} val / {sizes[2]} test images, "
            f"{len(self.class_names)} classes, on {device_name(self.device)} ({precision_name(cfg)}), "
            f"{plural(steps_per_epoch, 'step')} x {plural(cfg.epochs, 'epoch')}"
        )
        if float16_scaler and self.device.type == "cpu":
            self.log.info(
                "warning: float16 + GradScaler on the CPU runs CUDA's AMP recipe to check it, and is slow on "
                "most CPUs; --amp alone gives the fast bfloat16 there"
            )
        optimizer = getattr(cfg, "optimizer", "adam")
        if float16_scaler and self.device.type == "cuda" and optimizer in HOST_SYNC_OPTIMIZERS:
            self.log.info(
                f"note: with --optimizer {optimizer} GradScaler reads its inf/NaN flag back to the host "
                "at every step: the host waits for the GPU each step (adam, adamw and sgd skip on the device)"
            )

    def write(self, path, write, note=""):
        """`write()`, which writes `path`, on rank 0 alone; if the disk refuses, every rank stops
        with one line (ending in `note`, or in what `note()` says just before the write, on rank 0;
        files already written stay as they are)."""

        def guarded():
            said = note() if callable(note) else note
            try:
                write()
            except OSError as exc:  # (a WriteFailed names the file and the free space)
                raise RunStopped(f"cannot write {exc.filename or path}: {exc.strerror or exc}{said}") from None

        from_main_process(guarded)

    def write_results(self, state, skipped_steps, **final):
        """Write results.json: the run so far (RunState `state`), and `final`'s test numbers."""
        results = {
            "run": self.cfg.checkpoint_name,
            "finished": bool(final),
            "test_acc": None,
            "best_val_acc": state.best_val_acc if state.history else None,
            "total_train_seconds": state.total_train_seconds,
            "device": device_name(self.device),
            "world_size": world_size(),
            "amp": self.cfg.amp,
            "amp_dtype": self.cfg.amp_dtype if self.cfg.amp else None,
            "precision": precision_name(self.cfg),
            **hardware_record(self.device, self.cfg.amp_dtype if self.cfg.amp else None),
            "skipped_steps": skipped_steps,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "epochs": state.history,
        }
        results.update(final)
        path = os.path.join(self.run_dir, "results.json")
        self.write(path, lambda: atomic_write_json(path, results))
        return results

    def test_predictions(self, rows):
        """test_predictions.csv: each test image's prediction by the weights test_acc measured."""
        path = os.path.join(self.run_dir, "test_predictions.csv")
        self.write(path, lambda: write_test_predictions(path, rows, self.class_names))

    def epoch_done(self, state, skipped_steps, step):
        """After an epoch's checkpoints: its numbers to TensorBoard, results.json, curves.png,
        and its line."""
        record = state.history[-1]
        self.log_epoch(step, record)  # after last.pt: a resume from an older checkpoint would write them again
        self.flush()
        self.write_results(state, skipped_steps)
        curves = os.path.join(self.run_dir, "curves.png")
        title = f"{self.cfg.checkpoint_name}: {precision_name(self.cfg)} on {device_name(self.device)}"
        self.write(curves, lambda: plot_curves(state.history, curves, title))
        self.log.info(format_epoch(record, self.cfg.epochs))

    def test_done(self, state, skipped_steps, best, test, ema, step):
        """The final results.json with the test's numbers (`test`, and the EMA's in `ema`, of
        best.pt `best`), the test's lines, confusion.png, and TensorBoard's last points."""
        confusion = test["confusion"]  # rows are true classes
        results = self.write_results(
            state,
            skipped_steps,
            test_acc=test["acc"],
            test_loss=test["loss"],
            best_epoch=best["epoch"],
            **ema,
            per_class_acc=per_class_accuracy(confusion, self.class_names),
            confusion_matrix=confusion.tolist(),
        )
        which = ", EMA weights" if best.get("weights") == "ema" else ""
        self.log.info(f"test accuracy of the best-validation model (epoch {best['epoch']}{which}): {test['acc']:.2f}%")
        if ema:
            self.log.info(f"test accuracy of epoch {best['epoch']}'s EMA weights: {ema['test_acc_ema']:.2f}%")
        self.log.info(per_class_report(confusion, self.class_names))
        path = os.path.join(self.run_dir, "confusion.png")
        title = f"{self.cfg.checkpoint_name}: test accuracy {test['acc']:.2f}% ({precision_name(self.cfg)})"
        self.write(path, lambda: plot_confusion(confusion, self.class_names, path, title))
        if skipped_steps:
            self.log.info(f"GradScaler skipped {skipped_steps} optimizer steps with inf/NaN gradients")
        run = {**results, "config": vars(self.cfg)}
        notes = [note for note in (memory_note([run]), busy_epochs_note([run])) if note]
        self.log.info("\n".join([comparison_table([run]), *notes]))
        metrics = {"test/acc": test["acc"], "test/loss": test["loss"], "best_val_acc": state.best_val_acc}
        metrics = {**metrics, **({"test/acc_ema": ema["test_acc_ema"]} if ema else {})}
        self.write(os.path.join(self.run_dir, "tensorboard"), lambda: self.log_test(step, metrics))
        return results

    # ------------------------------------------------------------------ TensorBoard
    def open_tensorboard(self, step):
        """With --tensorboard, rank 0 writes RUN/tensorboard/. A resumed run goes on in the same
        series: events a killed session wrote after the checkpoint's step are purged."""
        if not getattr(self.cfg, "tensorboard", False) or not is_main_process():
            return
        self.tensorboard = TensorBoardLog(
            os.path.join(self.run_dir, "tensorboard"), purge_step=step + 1 if step else None
        )

    def start_rate(self, images_so_far):
        """images/s of the first logged step of an epoch counts from here; `images_so_far()` is
        the epoch's count (read only with TensorBoard on: reading it waits for the GPU)."""
        if self.tensorboard is not None:
            self.last_logged = (time.perf_counter(), images_so_far())

    def log_step(self, step, images_so_far, loss, lr, health, outcome):
        """An optimizer step's loss, the LR it trained with, the loss scale after it (StepHealth
        `health`), its gradient norm (StepOutcome `outcome`) and images/s since the last logged
        step. Only with TensorBoard on: reading them waits for the GPU."""
        if self.tensorboard is None:
            return
        now = time.perf_counter()
        then, images_then = self.last_logged or (now, images_so_far)
        self.last_logged = (now, images_so_far)
        # (The meter's count covers every process; it restarts each epoch, and then gives no rate.)
        rate = (images_so_far - images_then) / (now - then) if images_so_far > images_then else None
        self.tensorboard.scalars(
            step,
            {
                "step/loss": float(loss.detach()),
                "step/lr": lr,
                "step/loss_scale": health.loss_scale(),
                "step/grad_norm": float(outcome.grad_norm),
                "step/images_per_sec": rate,
            },
        )

    def log_epoch(self, step, record):
        """The epoch's numbers, at the optimizer step it ended on (one x axis for every series)."""
        if self.tensorboard is None:
            return
        self.tensorboard.scalars(
            step,
            {
                f"epoch/{key}": record[key]
                for key in (
                    "train_loss",
                    "train_acc",
                    "val_loss",
                    "val_acc",
                    "val_loss_ema",
                    "val_acc_ema",
                    "seconds",
                    "peak_mem_mb",
                    "steady_peak_mem_mb",
                )
                if key in record
            },
        )

    def log_test(self, step, metrics):
        """The test's numbers and the run's settings (the HPARAMS tab); the series ends here."""
        if self.tensorboard is None:
            return
        self.tensorboard.hparams(step, vars(self.cfg), metrics)
        self.tensorboard.close()
        self.tensorboard = None

    def flush(self):
        """Every event so far on disk (before a checkpoint, so a resume never loses one). On every
        rank: a refused write stops them all."""
        self.write(os.path.join(self.run_dir, "tensorboard"), lambda: self.tensorboard and self.tensorboard.flush())


def format_epoch(r, epochs):
    memory = "" if r["peak_mem_mb"] is None else f", peak {r['peak_mem_mb'] / 1024:.1f} GiB"
    if r.get("steady_peak_mem_mb") is not None:
        memory += f" (steady {r['steady_peak_mem_mb'] / 1024:.1f} GiB)"
    ema = f", EMA acc {r['val_acc_ema']:.2f}" if "val_acc_ema" in r else ""
    busy = f" (busy: {busy_note(r, short=True)}{threads_used(r)})" if busy_note(r) else ""
    return (
        f"epoch {r['epoch']:>3}/{epochs}: train loss {r['train_loss']:.4f} acc {r['train_acc']:.2f} | "
        f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.2f}{ema} | lr {r['lr']:.2e} | "
        f"{r['seconds']:.1f} s, {r['images_per_sec']:.0f} img/s{busy}{memory}"
    )


def threads_used(r):
    """E.g. "; trained with 1 thread" or "...1.4 threads on average": the CPU threads a busy epoch
    trained with (results.json's "threads": absent on a GPU)."""
    threads = r.get("threads")
    if threads is None:
        return ""
    return f"; trained with {threads:g} {'thread' if threads == 1 else 'threads'}{'' if threads == int(threads) else ' on average'}"


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- --evaluate's record
# The settings --evaluate may change (config.EVALUATE_OVERRIDES) that change what the test gives:
# which images (data_dir, skip_bad_images) or how they are computed. With any changed, the run's
# own results.json and test_predictions.csv (the pair --compare reads) are not this test's.
# The keys of results.json's epochs that measure the session and the machine (time, speed, how
# busy it was), not the training: a resumed run equals an uninterrupted one in every other key.
MEASUREMENT_KEYS = frozenset(
    {
        "seconds",
        "checkpoint_seconds",
        "images_per_sec",
        "first_in_session",
        "load_before",
        "load_after",
        "cpus",
        "other_cpus",
        "threads",
    }
)


TEST_RECORD_SETTINGS = (
    "data_dir",
    "skip_bad_images",
    "device",
    "batch_size",
    "amp_dtype",
    "fp32_math",
    "channels_last",
)


def test_setting_changes(saved, cfg):
    """{setting: (the run's, this session's)} for the TEST_RECORD_SETTINGS that differ. The FP32
    math is compared as computed (hardware.tf32_on): --fp32_math tf32 on the CPU is IEEE, as
    ieee is, so it changes nothing; where it differs its values are the math each computed in."""
    changes = {}
    for name in TEST_RECORD_SETTINGS:
        run, now = saved.get(name), getattr(cfg, name, None)
        if name == "fp32_math" and run is not None:
            run, now = _computed_fp32_math(run, saved.get("device")), _computed_fp32_math(now, cfg.device)
        same = (
            _same_place(run, now) if name == "data_dir" else _same_device(run, now) if name == "device" else run == now
        )
        if not same:
            changes[name] = (run, now)
    return changes


def _computed_fp32_math(fp32_math, device):
    """ "tf32" or "ieee": what --fp32_math `fp32_math` computes in on `device` (the flag's value
    itself where the device cannot be read)."""
    try:
        return "tf32" if tf32_on(SimpleNamespace(fp32_math=fp32_math, device=device)) else "ieee"
    except (TypeError, RuntimeError):
        return fp32_math


def _same_place(a, b):
    return a is not None and b is not None and os.path.realpath(str(a)) == os.path.realpath(str(b))


def _same_device(a, b):
    """'cuda' and 'cuda:0' are one GPU."""
    import torch

    try:
        a, b = torch.device(a), torch.device(b)
    except (TypeError, RuntimeError):
        return False
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def evaluation_tag(changes):
    """The name of an --evaluate record made with other settings than the run's: its changed
    settings and their values, e.g. "device-cpu_batch_size-64" (a data folder by its last part
    and a short hash of its real path, "data_dir-holdout-1a2b3c", so two folders of one name keep
    a record each); "rerun" when none changed but the test gave another accuracy than the run's own."""
    if not changes:
        return "rerun"
    parts = []
    for name, (_, value) in changes.items():
        if name == "data_dir":
            place = os.path.realpath(str(value))
            value = f"{os.path.basename(place)}-{hashlib.sha256(place.encode()).hexdigest()[:6]}"
        else:
            value = str(value)
        parts.append(f"{name}-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in value))
    return "_".join(parts)


def evaluation_paths(run_dir, tag):
    """(predictions CSV, results JSON) of an --evaluate record: the run's own pair when `tag` is
    None, else test_predictions_TAG.csv and evaluate_TAG.json beside them."""
    if tag is None:
        return os.path.join(run_dir, "test_predictions.csv"), None
    return os.path.join(run_dir, f"test_predictions_{tag}.csv"), os.path.join(run_dir, f"evaluate_{tag}.json")


def evaluation_records(run_dir):
    """The files --evaluate wrote with other settings (evaluate_TAG.json, test_predictions_TAG.csv):
    a fresh run removes them with the model they tested."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return [
        n
        for n in names
        if (n.startswith("evaluate_") and n.endswith(".json")) or re.fullmatch(r"test_predictions_.+\.csv", n)
    ]
