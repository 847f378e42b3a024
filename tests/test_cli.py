"""User errors from the command line: one line on stderr, exit code 2, nothing damaged."""
import os

import pytest

from conftest import FAST, assert_user_error


def test_missing_data(run_cli, tmp_path):
    assert_user_error(run_cli("--data_dir", tmp_path / "nowhere", *FAST), "seg_train/seg_train/<class>", "--demo")
    assert not os.path.exists(tmp_path / "checkpoints" / "baseline" / "results.json")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_checkpoint_name_must_be_plain(run_cli, demo_data, name):
    assert_user_error(run_cli("--data_dir", demo_data, "--checkpoint_name", name, *FAST), "--checkpoint_name")


@pytest.mark.parametrize("flags,needle", [
    (["--batch_size", "0"], "--batch_size"),
    (["--epochs", "-1"], "--epochs"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--val_fraction", "1.5"], "--val_fraction"),
    (["--warmup_epochs", "9", "--epochs", "3"], "--warmup_epochs"),
    (["--amp_dtype", "int8"], "--amp_dtype"),
    (["--epochs", "many"], "--epochs"),
])
def test_bad_flag_values(run_cli, demo_data, flags, needle):
    assert_user_error(run_cli("--data_dir", demo_data, *FAST, *flags), needle)


def test_existing_run_is_never_silently_replaced(run_cli, demo_data, tmp_path):
    flags = ["--data_dir", demo_data, "--checkpoint_name", "keep", "--epochs", "1", *FAST]
    assert run_cli(*flags)[0] == 0
    best = tmp_path / "checkpoints" / "keep" / "best.pt"
    before = best.read_bytes()
    assert_user_error(run_cli(*flags), "--overwrite", "--resume")
    assert best.read_bytes() == before
    assert run_cli(*flags, "--overwrite")[0] == 0


def test_evaluate_or_resume_without_a_run(run_cli, demo_data):
    assert_user_error(run_cli("--data_dir", demo_data, "--checkpoint_name", "ghost", "--evaluate", *FAST), "best.pt")
    assert_user_error(run_cli("--data_dir", demo_data, "--checkpoint_name", "ghost", "--resume", *FAST), "last.pt")


def test_help_lists_every_flag_with_its_default(capsys):
    import main

    with pytest.raises(SystemExit) as exit_:
        main.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--amp", "--amp_dtype", "--batch_size", "--epochs", "--learning_rate", "--checkpoint_name",
                 "--resume", "--evaluate", "--demo", "--clip_grad_norm", "--accum_steps", "--device"):
        assert flag in text
    assert "(default: 256)" in text and "(default: 120)" in text and "(default: 0.0001)" in text
