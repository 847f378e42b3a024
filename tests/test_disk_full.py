"""A refused write (a full disk, a file over the size limit) is one line naming the file and the
space left, and loses nothing: the previous version of the file stays, no temporary file is left.
The writes really fail: RLIMIT_FSIZE caps the size of any file this process writes (SIGXFSZ
ignored, so a write past it fails with EFBIG, as one on a full disk fails with ENOSPC)."""

import contextlib
import logging
import os
import resource
import signal

import pytest
import torch
from conftest import FAST, SMALL_MODEL
from matplotlib.figure import Figure

import report
import utils


@contextlib.contextmanager
def file_size_limit(size):
    """No file written in this block grows past `size` bytes."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def figure(points):
    fig = Figure()
    fig.add_subplot().plot(range(points), [i % 7 for i in range(points)])
    return fig


ROWS = [(f"img{i:05d}.jpg", i % 3, (i + 1) % 3, 0.5) for i in range(5000)]
WRITERS = {  # name -> (write the previous, small version; write a new one past the limit)
    "last.pt": (
        lambda path: utils.atomic_torch_save({"w": torch.zeros(10)}, path),
        lambda path: utils.atomic_torch_save({"w": torch.zeros(100_000)}, path),  # (torch's zip writer)
    ),
    "results.json": (lambda path: utils.atomic_write_json(path, {}), lambda path: utils.atomic_write_json(path, ROWS)),
    "test_predictions.csv": (
        lambda path: report.write_test_predictions(path, ROWS[:2], ["a", "b", "c"]),
        lambda path: report.write_test_predictions(path, ROWS, ["a", "b", "c"]),
    ),
    "predictions.csv": (
        lambda path: report.write_predictions(path, [(r[0], "a", 0.5) for r in ROWS[:2]]),
        lambda path: report.write_predictions(path, [(r[0], "a", 0.5) for r in ROWS]),
    ),
    "curves.png": (
        lambda path: utils.atomic_savefig(Figure(figsize=(1, 1)), path),
        lambda path: utils.atomic_savefig(figure(3000), path),
    ),
}


def assert_one_line_failure(failure, path):
    assert isinstance(failure, utils.WriteFailed) and failure.filename == str(path)
    assert failure.strerror.startswith("File too large (") and " MB free there)" in failure.strerror
    # (the file-size limit, which a disk with room left does not explain)
    assert "this process may write files of at most " in failure.strerror and " MB: ulimit -f; " in failure.strerror
    assert "\n" not in failure.strerror


def no_temporary_files(folder):
    return not [name for name in os.listdir(folder) if name.endswith(".tmp")]


@pytest.mark.parametrize("name", WRITERS)
def test_a_refused_write_keeps_the_previous_file_and_says_which(tmp_path, name):
    path = tmp_path / name
    write_previous, write_new = WRITERS[name]
    write_previous(str(path))
    previous = path.read_bytes()
    with file_size_limit(len(previous) + 1000), pytest.raises(utils.WriteFailed) as failed:
        write_new(str(path))
    assert_one_line_failure(failed.value, path)
    assert path.read_bytes() == previous and no_temporary_files(tmp_path)


def test_a_refused_export_keeps_all_four_previous_files(tmp_path):
    names = ["model.onnx", "model.int8.onnx", "inference.json", "inference.md"]
    utils.atomic_write_files(str(tmp_path), {name: b"old" for name in names})
    with file_size_limit(1000), pytest.raises(utils.WriteFailed) as failed:
        utils.atomic_write_files(str(tmp_path), {name: b"x" * (10 if i < 2 else 5000) for i, name in enumerate(names)})
    assert_one_line_failure(failed.value, tmp_path / "inference.json")
    assert {name: (tmp_path / name).read_bytes() for name in names} == dict.fromkeys(names, b"old")
    assert no_temporary_files(tmp_path)


def test_a_refused_tensorboard_write_is_raised_at_the_next_flush_and_keeps_the_events_before(tmp_path):
    log = report.TensorBoardLog(tmp_path)
    log.scalars(0, {"a": 1.0})
    log.flush()
    (events,) = os.listdir(tmp_path)
    with file_size_limit((tmp_path / events).stat().st_size + 100), pytest.raises(utils.WriteFailed) as failed:
        for step in range(1, 200):
            log.scalars(step, {"a": float(step)})
        log.flush()
    assert_one_line_failure(failed.value, tmp_path / events)
    with pytest.raises(utils.WriteFailed):
        log.close()  # (and again: the run stops on it, never goes on without its events)
    assert report.read_tensorboard_scalars(tmp_path)["a"][0] == (0, 1.0)


def test_a_refused_log_line_is_said_once_in_one_line_and_the_log_goes_on_on_the_console(tmp_path, capsys):
    log = utils.setup_logging()
    utils.log_to_file(log, str(tmp_path / "train.log"))
    log.info("first")
    logged = (tmp_path / "train.log").read_bytes()
    with file_size_limit(len(logged) + 100):
        for i in range(20):
            log.info(f"line {i} " + "x" * 50)
    logging.shutdown()  # (as at exit: nothing more to say)
    out, err = capsys.readouterr()
    assert err == f"cannot write {tmp_path / 'train.log'}: File too large (" + err.split(" (", 1)[1]
    assert err.count("\n") == 1 and " MB free there); the log goes on on the console only" in err
    assert out.splitlines()[-1].startswith("line 19 ")  # (the console has every line)
    assert (tmp_path / "train.log").read_bytes().startswith(logged)


def test_a_refused_checkpoint_write_stops_the_run_in_one_line(run_cli, demo_data, tmp_path):
    # (The previous version staying is shown above, per file; here: what a run says, and leaves.)
    with file_size_limit(200_000):  # config.json and train.log fit; the small model's checkpoints (~6 MB) not
        code, out, err = run_cli("--data_dir", demo_data, "--epochs", "1", *FAST, *SMALL_MODEL)
    run_dir = tmp_path / "checkpoints" / "baseline"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write {run_dir / 'best.pt'}: File too large (" in err  # (the first checkpoint written)
    assert " MB free there); no best.pt was saved before" in err  # (not "the previous one is intact")
    assert not (run_dir / "best.pt").exists() and no_temporary_files(run_dir)


NAMES = ["model.onnx", "model.int8.onnx", "inference.json", "inference.md"]


def failing_at(k, *steps):
    """Patches for os's `steps` (link, replace) that count their calls together and fail the k-th."""
    calls = []

    def failing(real):
        def step(src, dst):
            calls.append(dst)
            if len(calls) == k + 1:
                raise OSError(5, "Input/output error")
            real(src, dst)

        return step

    return {name: failing(getattr(os, name)) for name in steps}


@pytest.mark.parametrize("k", range(7))  # 3 old files linked aside, 4 new ones renamed in: 7 steps
def test_a_multi_file_write_is_all_or_nothing_whichever_rename_fails(tmp_path, monkeypatch, k):
    utils.atomic_write_files(str(tmp_path), {name: b"old" for name in NAMES[:3]})  # (no old inference.md)
    for name, step in failing_at(k, "link", "replace").items():
        monkeypatch.setattr(os, name, step)
    with pytest.raises(OSError):
        utils.atomic_write_files(str(tmp_path), {name: b"new" for name in NAMES})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(NAMES[:3])  # the old set, no inference.md, no temporary file
    assert all((tmp_path / name).read_bytes() == b"old" for name in NAMES[:3])


def test_a_file_system_without_hard_links_keeps_the_old_files_aside_as_copies(tmp_path, monkeypatch):
    utils.atomic_write_files(str(tmp_path), {name: b"old" for name in NAMES[:3]})

    def link(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)
    utils.atomic_write_files(str(tmp_path), {name: b"new" for name in NAMES})
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == dict.fromkeys(NAMES, b"new")
    for name, step in failing_at(3, "replace").items():  # (the last rename: three to put back, from copies)
        monkeypatch.setattr(os, name, step)
    with pytest.raises(OSError):
        utils.atomic_write_files(str(tmp_path), {name: b"newer" for name in NAMES})
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == dict.fromkeys(NAMES, b"new")


def test_a_failed_rollback_says_where_the_previous_file_is(tmp_path, monkeypatch):
    utils.atomic_write_files(str(tmp_path), {name: b"old" for name in NAMES})
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the third rename fails, and so does putting back the first
        calls.append(dst)
        if len(calls) in (3, 5):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as failed:
        utils.atomic_write_files(str(tmp_path), {name: b"new" for name in NAMES})
    monkeypatch.undo()
    (aside,) = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert aside.startswith(".model.onnx.") and aside.endswith(".old.tmp")
    assert str(failed.value).endswith(
        f"Input/output error; putting the previous files back failed too (Input/output error): "
        f"the previous model.onnx is {tmp_path / aside}"
    )
    assert (tmp_path / aside).read_bytes() == b"old" and (tmp_path / "model.int8.onnx").read_bytes() == b"old"


@pytest.mark.parametrize("k", range(4))
def test_a_crash_between_two_renames_leaves_every_file_and_the_next_start_cleans_up(tmp_path, k):
    utils.atomic_write_files(str(tmp_path), {name: b"old" for name in NAMES[:3]})
    child = os.fork()
    if child == 0:  # killed (os._exit: nothing cleaned up) at its k-th rename
        real_replace, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == k + 1:
                os._exit(0)
            real_replace(src, dst)

        os.replace = replace
        try:
            utils.atomic_write_files(str(tmp_path), {name: b"new" for name in NAMES})
        finally:
            os._exit(1)
    assert os.waitpid(child, 0)[1] == 0
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if not name.endswith(".tmp")}
    assert files == {**{name: b"new" for name in NAMES[:k]}, **{name: b"old" for name in NAMES[k:3]}}
    utils.remove_stale_temp_files(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == files


def test_an_old_file_set_aside_whose_file_is_missing_is_put_back(tmp_path):
    # (As an earlier atomic_write_files, which moved the old file aside, could leave it when killed.)
    (tmp_path / ".model.onnx.ab_12xyz.old.tmp").write_bytes(b"old")
    (tmp_path / ".inference.json.cd34_efg.old.tmp").write_bytes(b"old")
    (tmp_path / "inference.json").write_bytes(b"new")
    (tmp_path / ".inference.md.gh56ijkl.tmp").write_bytes(b"new, not moved in")
    utils.remove_stale_temp_files(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == {
        "model.onnx": b"old",
        "inference.json": b"new",
    }


def test_only_a_refused_write_of_the_file_itself_is_a_write_failure(tmp_path):
    path, tmp = str(tmp_path / "results.json"), str(tmp_path / ".results.json.abcd1234.tmp")
    for refused in (OSError(28, "No space left on device"), OSError(122, "Disk quota exceeded", tmp)):
        failure = utils.write_failure(path, refused, tmp)
        assert isinstance(failure, utils.WriteFailed) and failure.filename == path and failure.errno == refused.errno
    try:  # torch's zip writer: an error raised while cleaning up after the refused write
        try:
            raise OSError(27, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904 (as torch does)
    except RuntimeError as exc:
        assert utils.write_failure(path, exc).errno == 27
    bugs = [OSError("not a write"), OSError(2, "No such file or directory", tmp), OSError(28, "full", "/elsewhere")]
    try:  # a bug raised while handling an unrelated failed open
        try:
            open(tmp_path / "missing" / "x")
        except OSError:
            {}["key"]
    except KeyError as exc:
        bugs.append(exc)
    assert [utils.write_failure(path, bug, tmp) for bug in bugs] == [None] * len(bugs)

    def write(f):
        try:
            open(tmp_path / "missing" / "x")
        except OSError:
            {}["key"]

    with pytest.raises(KeyError):  # (and so a write's bug comes out as what it is)
        utils._atomic_write(path, write)
