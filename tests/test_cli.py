"""User errors from the command line: one line on stderr, exit code 2, nothing damaged."""

import os

import pytest
from conftest import FAST, SMALL_MODEL, assert_user_error


def test_missing_data(run_cli, tmp_path):
    assert_user_error(run_cli("--data_dir", tmp_path / "nowhere", *FAST), "seg_train/seg_train/<class>", "--demo")
    assert not os.path.exists(tmp_path / "checkpoints" / "baseline" / "results.json")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_checkpoint_name_must_be_plain(run_cli, demo_data, name):
    assert_user_error(run_cli("--data_dir", demo_data, "--checkpoint_name", name, *FAST), "--checkpoint_name")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--batch_size", "0"], "--batch_size"),
        (["--epochs", "-1"], "--epochs"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--val_fraction", "1.5"], "--val_fraction"),
        (["--warmup_epochs", "9", "--epochs", "3"], "--warmup_epochs"),
        (["--amp_dtype", "int8"], "--amp_dtype"),
        (["--epochs", "many"], "--epochs"),
    ],
)
def test_bad_flag_values(run_cli, demo_data, flags, needle):
    assert_user_error(run_cli("--data_dir", demo_data, *FAST, *flags), needle)


def test_existing_run_is_never_silently_replaced(run_cli, demo_data, tmp_path):
    flags = ["--data_dir", demo_data, "--checkpoint_name", "keep", "--epochs", "1", *FAST, *SMALL_MODEL]
    assert run_cli(*flags)[0] == 0
    best = tmp_path / "checkpoints" / "keep" / "best.pt"
    before = best.read_bytes()
    assert_user_error(run_cli(*flags), "--overwrite", "--resume")
    assert best.read_bytes() == before
    assert run_cli(*flags, "--overwrite")[0] == 0


def test_evaluate_or_resume_without_a_run(run_cli, demo_data, tmp_path):
    assert_user_error(
        run_cli("--data_dir", demo_data, "--checkpoint_name", "ghost", "--evaluate", *FAST),
        "best.pt",
        f"train the run first (python main.py --checkpoint_name ghost --checkpoint_dir {tmp_path / 'checkpoints'})",
    )
    # --demo --evaluate before --demo: the command that trains it
    assert_user_error(
        run_cli("--demo", "--evaluate", "--data_dir", tmp_path / "demo_data", "--device", "cpu"),
        f"train the run first (python main.py --demo --checkpoint_dir {tmp_path / 'checkpoints'})",
    )
    assert_user_error(run_cli("--data_dir", demo_data, "--checkpoint_name", "ghost", "--resume", *FAST), "last.pt")


def test_help_lists_every_flag_with_its_default(capsys):
    import main

    with pytest.raises(SystemExit) as exit_:
        main.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--amp",
        "--amp_dtype",
        "--batch_size",
        "--epochs",
        "--learning_rate",
        "--checkpoint_name",
        "--resume",
        "--evaluate",
        "--demo",
        "--clip_grad_norm",
        "--accum_steps",
        "--device",
    ):
        assert flag in text
    assert "(default: 256)" in text and "(default: 120)" in text and "(default: 0.0001)" in text


# --------------------------------------------------------------------------- flags before torch (issue 22, item 3)
# Runs main.py as `python main.py ARGS` would, with any import of torch refused: what answers
# without it answered before torch would have loaded (seconds).
WITHOUT_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError("torch was imported")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def main_without_torch(*args):
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE")}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--epochs_typo", "3"], "unrecognized argument --epochs_typo (did you mean --epochs?)"),
        (["--epochs", "many"], "--epochs"),
        (["--lr_schedule", "cosin"], "--lr_schedule"),
        (["--batch_size", "0"], "--batch_size must be a positive integer"),
        (["--warmup_epochs", "9", "--epochs", "3"], "--warmup_epochs"),
        (["--resume", "--evaluate"], "cannot be combined"),
    ],
)
def test_a_flag_mistake_answers_before_torch_loads(args, needle):
    result = main_without_torch(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


def test_help_answers_before_torch_loads():
    result = main_without_torch("--help")
    assert result.returncode == 0, result.stderr
    assert "--learning_rate" in result.stdout and "(default: 256)" in result.stdout


def test_flag_choices_named_in_config_are_the_codes():
    import config
    import dataset
    import model
    import scheduler

    assert config.AUTO_AUGMENT_POLICIES == tuple(dataset.AUTO_AUGMENT)
    assert config.SCHEDULES == scheduler.SCHEDULES
    assert config.DEFAULT_MODEL == model.DEFAULT_MODEL
