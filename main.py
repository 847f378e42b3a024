"""Entry point: parse the flags, build data, model, optimizer and schedule, hand them to the Trainer;
or --evaluate, --predict, --export, --compare or --benchmark an existing run or this machine."""

import hashlib
import os
import shutil
import signal
import sys
import time

from machine import CpuThreads, LoadWatch, fixed_threads_reason, threads_line


def _interrupted_while_starting(signum, frame):
    print("interrupted before anything was saved", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # at once: an exception raised inside an import would leave it half done


def _check_flags_before_torch(argv):
    """Parse and check the flags (config.parse_flags needs no torch) before torch loads, which
    takes seconds: a mistyped flag or --help answers at once. main() parses them again."""
    import config
    from utils import UserError

    try:
        config.parse_flags(argv)
    except UserError as exc:
        print(f"{exc.prefix}{exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


# Before torch loads (seconds): how busy other programs keep the machine meanwhile is the first
# look of how many CPU threads this run uses (machine.CpuThreads; see startup_watch).
_startup = LoadWatch()


def startup_watch():
    """The LoadWatch begun as main.py loaded, for the first run in this process; None after (a
    later run in the same process, the tests', starts its own)."""
    global _startup
    watch, _startup = _startup, None
    return watch


if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line, not an import traceback
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    if "LOCAL_RANK" not in os.environ:  # (under torchrun every process checks, and names its rank, in main())
        _check_flags_before_torch(sys.argv[1:])

import torch

import benchmark
import config
from checkpoint import GracefulStop, load_checkpoint, no_such_run, run_command
from dataset import (
    DeviceTransform,
    build_loaders,
    build_predict_loader,
    build_test_loader,
    find_split_dir,
    loader_files,
    stop_loader_workers,
    truncated_warning,
    use_validation_folder,
)
from demo import make_demo_dataset
from distributed import (
    PeerError,
    check_shared_folder,
    from_main_process,
    init_distributed,
    is_main_process,
    leave_distributed,
    on_all_ranks,
    print_error,
    rank,
    torchrun_attempt,
    torchrun_job_id,
    world_size,
    wrap_ddp,
)
from hardware import apply_fp32_math, device_name, emulation_warning
from hardware import record as hardware_record
from metrics import ImagePredictions
from model import build_model, precise_bn_batches
from outputs import evaluation_paths, evaluation_records, evaluation_tag, test_setting_changes
from report import (
    compare_runs,
    comparison_report,
    inference_section,
    load_finished_run,
    load_inference,
    per_class_report,
    plot_comparison,
    read_results,
    stale_export,
    summary_writer_class,
    write_predictions,
    write_test_predictions,
)
from scheduler import WarmupLR
from step import autocast_for, build_optimizer, precision_name
from trainer import Trainer
from trainer import evaluate as evaluate_model
from utils import (
    RunStopped,
    UserError,
    WriteFailed,
    atomic_write_json,
    atomic_write_text,
    hold_run_folder,
    load_json,
    log_to_file,
    log_to_file_only,
    progress_bar,
    release_run_folders,
    remove_stale_temp_files,
    seed_everything,
    setup_logging,
    silence_stdout,
)

# Files a run writes; --overwrite removes these and nothing else.
RUN_FILES = (
    "best.pt",
    "last.pt",
    "results.json",
    "config.json",
    "train.log",
    "curves.png",
    "confusion.png",
    "predictions.csv",
    "test_predictions.csv",
)
# Written by --export (export.EXPORT_FILES); a fresh run removes them too, as they were not its model.
EXPORT_FILES = ("model.onnx", "model.int8.onnx", "inference.json", "inference.md")
# A folder with any of these holds a run that trained (config.json alone: one that never started).
TRAINED_FILES = ("best.pt", "last.pt", "results.json")


def refuse_to_clobber(cfg):
    """A new run must not silently replace a run of the same name (checked before any write)."""
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    existing = [f for f in TRAINED_FILES if os.path.exists(os.path.join(run_dir, f))]
    if existing and not cfg.overwrite:
        raise UserError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --checkpoint_name"
        )


def hold_existing_run_folder(run_dir):
    """hold_run_folder, for a folder that exists already (a new one is held as it is made, by
    start_run_dir). For from_main_process: rank 0 alone decides whether it exists (on several
    nodes a stale network file system cache could give the ranks different answers)."""
    if os.path.isdir(run_dir):
        hold_run_folder(run_dir)


def start_run_dir(run_dir, fresh, clobber_check=None):
    """Create the run folder once the run is ready to start; a fresh run clears an old one's files.
    `clobber_check`: a new run's cfg, checked again by refuse_to_clobber now that the folder is
    held (a run of the same name may have finished into it since the first check)."""
    hold_run_folder(run_dir)  # (held already when the folder existed as the run started)
    if fresh and clobber_check is not None:
        refuse_to_clobber(clobber_check)
    try:
        remove_stale_temp_files(run_dir)  # left by a write that was killed
        for name in (*RUN_FILES, *EXPORT_FILES, *evaluation_records(run_dir)) if fresh else ():
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        if fresh:  # a new run's TensorBoard series starts empty
            shutil.rmtree(os.path.join(run_dir, "tensorboard"), ignore_errors=True)
    except OSError as exc:
        raise UserError(f"cannot prepare {run_dir}: {exc.strerror}") from None


def train(cfg, threads, checkpoint=None, restarted=False):
    """Train cfg's run: a new one, or from `checkpoint` (its last.pt). `restarted`: torchrun
    restarted the job after a failure (the log says so)."""
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    logger = setup_logging(is_main_process())
    warning = emulation_warning(cfg.device, cfg.amp_dtype if cfg.amp else None)
    if warning:  # first, before the data loads: the user may rather stop and drop --amp
        logger.info(warning)
    apply_fp32_math(cfg)
    if cfg.tensorboard:  # missing tensorboard: one line on every rank now, not a crash when rank 0 opens it
        on_all_ranks(summary_writer_class)
    train_loader, val_loader, test_loader, class_names = on_all_ranks(
        build_loaders, cfg, cfg.device, rank(), world_size()
    )
    seed_everything(cfg.seed, cfg.deterministic)  # here, so the init depends on the seed alone
    # Under DDP only rank 0 needs (or downloads) the ImageNet weights: DDP copies its
    # parameters and buffers to the other ranks when it wraps the model.
    pretrained = cfg.pretrained and checkpoint is None and is_main_process()
    # (A resumed run's weights come from its checkpoint: nothing to zero.)
    zero_residual = cfg.zero_init_residual and checkpoint is None
    model = on_all_ranks(
        build_model,
        len(class_names),
        pretrained,
        cfg.pretrained_path,
        class_names,
        zero_residual,
        cfg.model,
        cfg.learning_rate,
    )
    model.to(cfg.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    # --precise_bn, decided once (config.json keeps the number, so a resumed run keeps it)
    cfg.precise_bn, precise_bn_note = precise_bn_batches(
        model, cfg.model, cfg.precise_bn, len(train_loader), cfg.epochs
    )
    train_model = model
    if torch.distributed.is_initialized():
        train_model = wrap_ddp(model, cfg.device, getattr(cfg, "sync_bn", False))
        model = train_model.module  # saved and evaluated: no `module.` prefix
        logger.info(
            f"DistributedDataParallel: {world_size()} processes ({torch.distributed.get_backend()}), "
            f"{cfg.batch_size // world_size()} images each per micro-batch"
        )
    optimizer = build_optimizer(model, cfg)
    # cuDNN tries its algorithms once per input shape and keeps the fastest (not deterministic).
    torch.backends.cudnn.benchmark = not cfg.deterministic
    # Under DDP the compiler wraps the DDP module, so it can split the graph at DDP's gradient buckets.
    train_model = torch.compile(train_model) if cfg.compile else train_model
    scheduler = build_scheduler(optimizer, cfg, -(-len(train_loader) // cfg.accum_steps))
    loaders = (train_loader, val_loader, test_loader)
    stop = GracefulStop()
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        loaders,
        cfg,
        run_dir,
        class_names,
        logger,
        train_model=train_model,
        stop=stop,
        threads=threads,
    )
    if checkpoint is not None:
        trainer.restore(checkpoint)
    # (A torchrun restart of this job's own run, which failed before its first checkpoint, is no clobbering.)
    from_main_process(start_run_dir, run_dir, checkpoint is None, None if restarted else cfg)
    log_to_file(logger, os.path.join(run_dir, "train.log"))
    restart = f"torchrun restart {torchrun_attempt()}: " if restarted else ""
    if checkpoint is not None:
        logger.info(
            f"{restart}resuming {cfg.checkpoint_name}{' from last.pt' if restart else ''}: "
            f"{trainer.position()} (step {scheduler.last_epoch})"
        )
    elif restart:
        logger.info(f"{restart}{cfg.checkpoint_name} failed before its first checkpoint: starting it again")
    if is_main_process():
        write_run_config(run_dir, cfg, trainer.position() if checkpoint is not None else "start")
    logger.info(f"model: {cfg.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    if torch.device(cfg.device).type == "cpu":
        logger.info(threads_line(threads))
    if precise_bn_note:  # after the log file opens, so train.log says it too
        logger.info(precise_bn_note)
    stop.install()
    try:
        trainer.fit()
    except UserError as exc:  # a stop (signal, divergence, failed write): printed on stderr, kept in the log
        log_to_file_only(logger, f"{exc.prefix}{exc}")
        raise
    finally:
        stop.uninstall()
    if is_main_process():
        for line in closing_lines(cfg, run_dir):
            logger.info(line)
    return 0


def closing_lines(cfg, run_dir):
    """A finished run's last lines: a warning when an export from before this session no longer
    holds best.pt (see report.stale_export), then where the run's files are."""
    lines = []
    report = load_inference(cfg.checkpoint_dir, cfg.checkpoint_name)
    stale = report and stale_export(cfg.checkpoint_dir, cfg.checkpoint_name, report)
    if stale:
        lines.append(f"warning: {stale}")
    files = [name for name in (*RUN_FILES, *EXPORT_FILES) if os.path.exists(os.path.join(run_dir, name))]
    lines.append(f"{cfg.checkpoint_name}'s files are in {run_dir}: {', '.join(files)}")
    return lines


def write_run_config(run_dir, cfg, position):
    """config.json: this session's settings (what the rest of the run trains with) and its
    device, and under "sessions" each session's own: when it started, from where ("start" or
    the resume position), on what, and the settings a resume may change. A resumed run keeps
    the sessions before it (a config.json from before "sessions" existed gives the first)."""
    path = os.path.join(run_dir, "config.json")
    device = {"device_name": device_name(cfg.device), **hardware_record(cfg.device, cfg.amp_dtype if cfg.amp else None)}
    session = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "from": position,
        "world_size": world_size(),
        **device,
        **{name: getattr(cfg, name) for name in sorted(config.RESUMABLE_OVERRIDES)},
    }
    if torchrun_job_id() is not None:  # (how a restart of the job knows the folder is its own)
        session["torchrun_job_id"] = torchrun_job_id()
    sessions = []
    if position != "start" and os.path.exists(path):
        try:
            saved = load_json(path)
        except (OSError, ValueError):
            saved = None  # unreadable: the earlier sessions are lost, this one is still recorded
        if isinstance(saved, dict):
            sessions = saved.get("sessions") or [{"from": "start", **{n: saved[n] for n in session if n in saved}}]
    atomic_write_json(path, {**vars(cfg), **device, "sessions": [*sessions, session]})


def restart_of_own_run(run_dir, name):
    """After torchrun restarted the job (see run): (last.pt, True) when the run folder is this
    job's own run, which config.json's latest session records, and it saved a last.pt;
    (None, True) when this job's run failed before its first checkpoint; (None, False) when the
    folder is not this job's (a new run, which refuse_to_clobber checks as usual)."""
    try:
        latest = load_json(os.path.join(run_dir, "config.json"))["sessions"][-1]
        job_id = latest["torchrun_job_id"]
    except (OSError, ValueError, LookupError, TypeError):  # none, or not a config.json we wrote
        return None, False
    if job_id != torchrun_job_id():
        return None, False
    last = os.path.join(run_dir, "last.pt")
    if not os.path.exists(last):
        return None, True
    checkpoint = load_checkpoint(last)
    own = checkpoint["config"].get("checkpoint_name") == name
    return (checkpoint, True) if own else (None, False)


def finished_run_note(run_dir, checkpoint, name):
    """What to tell a --resume of run `name` that trained all its epochs and was tested ('' for a
    run with epochs or its test left, which --resume finishes). --resume cannot change --epochs,
    so training further is a new run that starts from this one's weights."""
    epochs = checkpoint["config"].get("epochs")
    if not isinstance(epochs, int) or checkpoint["epoch"] < epochs or checkpoint["batch_in_epoch"]:
        return ""
    results = read_results(run_dir)
    if not results.get("finished") or results.get("test_acc") is None:
        return ""  # stopped during its final test: --resume runs the test
    epochs = f"{epochs} epoch{'' if epochs == 1 else 's'}"
    return (
        f"{name} is finished: it trained its {epochs} and was tested "
        f"(test accuracy {results['test_acc']:.2f}%), so there is nothing to resume. Re-test it with "
        f"--evaluate, or train it further as a new run that starts from its weights: --checkpoint_name NEW "
        f"--pretrained_path {os.path.join(run_dir, 'best.pt')} --epochs N (with a lower --learning_rate)"
    )


def build_scheduler(optimizer, cfg, steps_per_epoch):
    """cfg's LR schedule in optimizer steps: its epochs (warmup, milestones) times `steps_per_epoch`."""
    return WarmupLR(
        optimizer,
        schedule=cfg.lr_schedule,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch,
        min_lr=cfg.min_lr or 0.0,
        milestones=[epoch * steps_per_epoch for epoch in cfg.lr_milestones or ()],
        gamma=cfg.lr_gamma or 0.1,
    )


def load_best(cfg, explicit):
    """A run's best.pt, and the settings it was trained with (image size, precision, data
    folder, ...) for --evaluate and --predict: a flag may change only those that do not change
    the model's answers (device, batch size, workers, folders)."""
    best = from_main_process(load_trained, os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name, "best.pt"), cfg)
    return best, config.merge_evaluated(best["config"], cfg, explicit)


def load_trained(path, cfg):
    """load_checkpoint(path), where a missing file says what to run from the state the run is in:
    --resume for a run stopped in its first epoch (last.pt, no best.pt yet), else how to train it
    (a new user's likeliest reason: `--demo --evaluate` before `--demo`) and which runs there are."""
    if not os.path.exists(path):
        name, run_dir = cfg.checkpoint_name, os.path.dirname(path)
        if os.path.exists(os.path.join(run_dir, "last.pt")):
            if run_finished(run_dir):  # (best.pt was deleted: --resume would find nothing to do)
                again = f"{name} finished, but its best weights are gone; train it again with " + run_command(
                    name, cfg.checkpoint_dir, "--overwrite"
                )
            else:
                again = f"{name} stopped in its first epoch (it holds last.pt only); continue it with " + run_command(
                    name, cfg.checkpoint_dir, "--resume"
                )
            raise UserError(f"no checkpoint at {path}: {again}")
        train_it = run_command(name, cfg.checkpoint_dir, demo=cfg.demo)
        raise UserError(
            f"no checkpoint at {path}: train the run first ({train_it}), or name a trained run with "
            f"--checkpoint_name ({no_such_run(cfg.checkpoint_dir)})"
        )
    return load_checkpoint(path)


def run_finished(run_dir):
    """Whether the run's results.json says it trained all its epochs and was tested."""
    return bool(read_results(run_dir).get("finished"))


def load_resumed(run_dir, cfg):
    """--resume's last.pt, where a missing one says which runs there are, or how to start this one."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        start = (
            f"; start it with {run_command(cfg.checkpoint_name, cfg.checkpoint_dir)}"
            if not os.path.exists(os.path.join(run_dir, "best.pt"))
            else ""
        )
        raise UserError(
            f"no run {cfg.checkpoint_name} to resume: no checkpoint at {path} ({no_such_run(cfg.checkpoint_dir)}){start}"
        )
    return load_checkpoint(path)


def best_model(best, cfg):
    """The architecture the run trained (cfg.model: its saved --model), with best.pt's weights."""
    model = build_model(len(best["class_names"]), pretrained=False, name=cfg.model)
    model.load_state_dict(best["model"])
    return model.to(cfg.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def evaluate(best, cfg):
    """Re-test a run's best.pt with the image size and precision it was trained with. With the
    run's own test settings (and its test accuracy again) its per-image predictions replace the
    run's test_predictions.csv; with other data, device, batch size or precision settings they go
    to test_predictions_TAG.csv with evaluate_TAG.json beside them, and the run's results.json and
    test_predictions.csv, the pair --compare reads, stay as they were."""
    apply_fp32_math(cfg)
    model = best_model(best, cfg)
    test_loader, class_names = on_all_ranks(build_test_loader, cfg, cfg.device, rank(), world_size())
    if list(class_names) != list(best["class_names"]):
        raise UserError(f"the test classes {class_names} differ from the run's {best['class_names']}")
    predictions = ImagePredictions(loader_files(test_loader))
    test = evaluate_model(
        model,
        test_loader,
        DeviceTransform(cfg.device, cfg.channels_last),
        autocast_for(cfg),
        len(class_names),
        predictions,
        "testing" if cfg.progress and is_main_process() else "",
    )
    rows = predictions.rows()  # (a collective: every rank)
    if is_main_process():
        print(
            f"{cfg.checkpoint_name} (epoch {best['epoch']}{which_weights(best)}, {precision_name(cfg)}): "
            f"test accuracy {test['acc']:.2f}% on {test['count']} images, test loss {test['loss']:.4f}"
        )
        print(per_class_report(test["confusion"], class_names))
        write_evaluation(best, cfg, test, rows, class_names)
    return 0


def write_evaluation(best, cfg, test, rows, class_names):
    """--evaluate's files (see evaluate), and a line that says where they went and why."""
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    changes = test_setting_changes(best["config"], cfg)
    own_acc = read_results(run_dir).get("test_acc")  # (None: no test of its own to keep)
    again = own_acc is None or abs(own_acc - test["acc"]) <= 1e-6
    tag = None if not changes and again else evaluation_tag(changes)
    csv_path, json_path = evaluation_paths(run_dir, tag)
    try:
        write_test_predictions(csv_path, rows, class_names)
        if json_path:
            atomic_write_json(
                json_path,
                {
                    "run": cfg.checkpoint_name,
                    "epoch": best["epoch"],
                    "weights": best.get("weights", "raw"),
                    "precision": precision_name(cfg),
                    "device": device_name(cfg.device),
                    "test_acc": test["acc"],
                    "test_loss": test["loss"],
                    "test_images": test["count"],
                    "settings": {name: {"run": run, "evaluated": now} for name, (run, now) in changes.items()},
                    "run_test_acc": own_acc,
                    "test_predictions": os.path.basename(csv_path),
                },
            )
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename or json_path or csv_path}: {exc.strerror or exc}") from None
    if json_path is None:
        print(f"wrote {csv_path}")
        return
    why = (
        "tested with " + ", ".join(f"--{name} {now} (the run's: {run})" for name, (run, now) in changes.items())
        if changes
        else f"its own settings gave {test['acc']:.2f}%, not the run's {own_acc:.2f}%"
    )
    print(f"wrote {csv_path} and {json_path}: {why}; the run's own results.json and test_predictions.csv are unchanged")


def which_weights(best):
    """', EMA weights' when best.pt holds the EMA of --ema_decay (it validated better), else ''."""
    return ", EMA weights" if best.get("weights") == "ema" else ""


@torch.inference_mode()
def predict(best, cfg):
    """Label the unlabeled images with a run's best.pt into predictions.csv (or --predictions_file)."""
    root = cfg.predict_dir or find_split_dir(cfg.data_dir, "pred")
    if root is None:
        raise UserError(
            f"no unlabeled images found: expected {cfg.data_dir}/seg_pred/seg_pred/*.jpg "
            f"(or {cfg.data_dir}/seg_pred/*.jpg), or pass --predict_dir DIR"
        )
    apply_fp32_math(cfg)
    loader, unreadable, warning = build_predict_loader(root, cfg, cfg.device)  # (as training checks its images)
    model = best_model(best, cfg)
    transform, autocast, class_names = (
        DeviceTransform(cfg.device, cfg.channels_last),
        autocast_for(cfg),
        best["class_names"],
    )
    model.eval()
    rows, near_ties = [], []
    for images, files, errors in progress_bar(loader, "labeling" if cfg.progress else ""):
        readable = [i for i, error in enumerate(errors) if not error]
        unreadable += [error for error in errors if error]
        if not readable:
            continue
        with autocast():
            logits = model(transform(images[readable]))
        for i, (k, p, k2, p2) in zip(readable, top_two(logits.float().softmax(dim=1))):
            rows.append((files[i], class_names[k], p))
            near_ties += [(files[i], class_names[k], p, class_names[k2], p2)] if p - p2 < NEAR_TIE else []
    path = cfg.predictions_file or os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name, "predictions.csv")
    if not rows:  # an empty CSV would replace earlier predictions with nothing
        raise UserError(
            f"none of the {len(unreadable)} image file(s) in {root} could be read "
            f"(first: {unreadable[0]}); "
            + (f"{path} is unchanged" if os.path.exists(path) else "no predictions were written")
        )
    for error in unreadable:
        print(f"skipped: {error}", file=sys.stderr)
    if warning:  # about the files that were labeled: one that could not be read was skipped, not grayed
        warning = truncated_warning([os.path.join(root, file) for file, _, _ in rows])
    if warning:
        print(warning, file=sys.stderr)
    if near_ties:
        print(near_tie_note(near_ties), file=sys.stderr)
    try:
        write_predictions(path, rows)
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename or path}: {exc.strerror or exc}") from None
    skipped = f" ({len(unreadable)} unreadable file(s) skipped)" if unreadable else ""
    print(
        f"wrote {len(rows)} predictions of {cfg.checkpoint_name} (epoch {best['epoch']}{which_weights(best)}, "
        f"{precision_name(cfg)}) for {root} to {path}{skipped}"
    )
    return 0


# Top two classes closer than this in probability: a near-tie, which --predict and
# deploy/predict_onnx.py (its NEAR_TIE: keep them equal) may label differently, as their resizes
# (torchvision's, PIL's) and runtimes differ by ~1e-4 in the probabilities.
NEAR_TIE = 0.005


def top_two(probabilities):
    """Per row of [N, classes] probabilities: (top-1 index, its probability, runner-up index, its
    probability). An exact tie goes to the class listed first, as deploy/predict_onnx.py breaks it."""
    values, order = torch.sort(probabilities, dim=1, descending=True, stable=True)
    return [(a, p, b, q) for (a, b), (p, q) in zip(order[:, :2].tolist(), values[:, :2].tolist())]


def near_tie_note(ties):
    """The line naming the near-ties among --predict's images ((file, label, p, runner-up, q) each)."""
    file, label, p, other, q = ties[0]
    return (
        f"note: {len(ties)} image(s) are near-ties (top two classes within {NEAR_TIE} in probability), e.g. {file}: "
        f"{label} {p:.4f}, {other} {q:.4f}; --predict and deploy/predict_onnx.py may label them differently"
    )


def export(best, cfg):
    """Ship a run's best.pt: ONNX (FP32 and INT8), checked against PyTorch, each precision timed (export.py)."""
    try:
        from export import export_run  # onnx, onnxruntime and onnxscript: needed by --export alone
    except ImportError as exc:
        raise UserError(
            f"--export needs the onnx, onnxruntime and onnxscript packages ({exc.name or exc} is "
            "missing): pip install -r requirements.txt"
        ) from None
    return export_run(best_model(best, cfg), best, cfg)


def compare(cfg):
    """The comparison of finished runs, printed and saved as CHECKPOINT_DIR/NAME.md (the tables),
    NAME.json (the numbers) and NAME.png (the charts), NAME from --compare_name or the runs."""
    runs = [load_finished_run(cfg.checkpoint_dir, name) for name in cfg.compare]  # all checked before writing
    comparison = compare_runs(runs)
    text = comparison_report(runs, comparison) + inference_section(cfg.checkpoint_dir, cfg.compare)
    name = cfg.compare_name or comparison_name(cfg.compare)
    paths = [os.path.join(cfg.checkpoint_dir, f"{name}.{ext}") for ext in ("md", "json", "png")]
    replaced = any(os.path.exists(path) for path in paths)
    if replaced and not is_comparison(paths[1]):  # (e.g. --compare_name README: checkpoints/README.md)
        taken = next(path for path in paths if os.path.exists(path))
        raise UserError(f"{taken} exists and is not a comparison written by --compare; pass another --compare_name")
    atomic_write_text(paths[0], text)
    atomic_write_json(paths[1], comparison)
    plot_comparison(runs, paths[2], comparison)
    print(
        text
        + f"\nwrote {paths[0]}, {paths[1]} and {paths[2]}"
        + (" (replacing the earlier comparison of that name)" if replaced else "")
    )
    return 0


def is_comparison(path):
    """Whether `path` holds the numbers of an earlier --compare (its NAME.json), which a
    comparison of the same name may replace."""
    try:
        numbers = load_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(numbers, dict) and {"runs", "groups"} <= numbers.keys()


MAX_COMPARISON_NAME = 100  # characters; a longer list of runs is named by the first and a digest


def comparison_name(names):
    """The default name of a comparison: compare_a_vs_b_vs_c, or for many runs
    compare_a_and_8_more_<digest of the names> (the same runs, the same name)."""
    name = "compare_" + "_vs_".join(names)
    if len(name) <= MAX_COMPARISON_NAME:
        return name
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
    return f"compare_{names[0][:40]}_and_{len(names) - 1}_more_{digest}"


def run(argv=None):
    cfg, explicit = config.parse_config(argv)
    # PyTorch's CPU threads: the cores other programs leave, looked at once now (from the start-up's
    # load) and, while training, every few seconds; as they were again at the end (machine.py).
    fixed = fixed_threads_reason(torch.device(cfg.device).type, cfg.deterministic, getattr(cfg, "compile", False))
    threads = CpuThreads(torch.get_num_threads, torch.set_num_threads, fixed, watch=startup_watch())
    threads.fit_now()
    try:
        return run_job(cfg, explicit, threads)
    finally:
        threads.restore()


def run_job(cfg, explicit, threads):
    """The job cfg asks for: --compare, --predict, --export, --benchmark, --evaluate or training."""
    # Under torchrun: join the group. Rank 0 alone then touches the shared files (demo data,
    # run folder, checkpoints) and hands the result, or its error, to the other ranks.
    if cfg.compare or cfg.predict or cfg.export:
        # One-process jobs (compare reads results.json files only, no dataset): under torchrun
        # the first process does them and the others have nothing to do.
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        if cfg.compare:
            return compare(cfg)
        if cfg.demo:
            make_demo_dataset(cfg.data_dir)  # (there already unless it was deleted)
        return (export if cfg.export else predict)(*load_best(cfg, explicit))
    init_distributed(cfg.device, cfg.dist_timeout)
    trained = load_best(cfg, explicit) if cfg.evaluate else None  # (before the demo's data: is there a run?)
    if cfg.demo and from_main_process(make_demo_dataset, cfg.data_dir) and is_main_process():
        print(f"wrote a generated demo dataset to {cfg.data_dir}")
    if cfg.benchmark:
        apply_fp32_math(cfg)
        return benchmark.run(cfg)
    if cfg.evaluate:
        return evaluate(*trained)
    check_shared_folder(cfg.checkpoint_dir)  # (several processes: every node must see the checkpoints)
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.checkpoint_name)
    # torchrun restarted the job after a failure (--max-restarts): it goes on from its own last.pt,
    # or starts again when it failed before writing one.
    checkpoint, restarted = None, False
    from_main_process(hold_existing_run_folder, run_dir)  # one writer: before its files are read
    if cfg.resume:
        checkpoint = from_main_process(load_resumed, run_dir, cfg)
        restarted = torchrun_attempt() > 0  # (a job launched with --resume, e.g. on a SLURM requeue)
    elif torchrun_attempt() > 0:  # (every rank's the same: see torchrun_attempt)
        checkpoint, restarted = from_main_process(restart_of_own_run, run_dir, cfg.checkpoint_name)
    if checkpoint is not None:
        # Before the flags are checked against the run: a finished run has nothing to continue
        # whatever they say (--epochs 20 included), so say what to do instead.
        finished = from_main_process(finished_run_note, run_dir, checkpoint, cfg.checkpoint_name)
        if finished:
            if is_main_process():
                print(finished)
            return 0
        cfg.resume = True  # (a restart resumes as --resume would)
        cfg = config.merge_resumed(checkpoint["config"], cfg, explicit)
        return train(cfg, threads, checkpoint, restarted)
    if not restarted:  # (this job's own folder, from before its failure, is not clobbered)
        from_main_process(refuse_to_clobber, cfg)
    use_validation_folder(cfg, explicit)
    return train(cfg, threads, restarted=restarted)


def main(argv=None):
    succeeded = False
    try:
        code = run(argv)
        succeeded = code == 0
        return code
    except PeerError as exc:  # printed already, by the rank that hit it
        return exc.exit_code
    except UserError as exc:
        print_error(exc)
        return exc.exit_code
    except WriteFailed as exc:  # a write with no guard of its own (config.json, --compare's files)
        print_error(RunStopped(f"cannot write {exc.filename}: {exc.strerror}"))
        return 1
    except KeyboardInterrupt:  # before training's own handler is installed (loading data, say)
        print("interrupted before anything was saved", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python main.py ... | head`: the reader left, so stop quietly
        silence_stdout()
        return 1
    finally:
        if not succeeded:  # a successful run's loaders shut their workers down themselves
            stop_loader_workers()
        release_run_folders()
        leave_distributed()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here main() handles Ctrl-C itself
    sys.exit(main())
