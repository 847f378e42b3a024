"""The flags as users type them (issue 30): other spellings (the dashed forms, timm's and
torchvision's names), no abbreviations, the flag meant named in every "unrecognized" error;
docs/flags.md up to date; every command in README.md and docs/ parsed by the real parser.
All parse-only: nothing trains, no torch is needed."""

import glob
import os
import re
import shlex
import sys

import pytest
from conftest import ROOT

import config
from utils import UserError

sys.path.insert(0, os.path.join(ROOT, "tools"))
import flags_md  # noqa: E402


def parse(*argv):
    return config.parse_flags([str(arg) for arg in argv])


def refusal(*argv):
    with pytest.raises(UserError) as error:
        parse(*argv)
    return str(error.value)


# --------------------------------------------------------------------------- other spellings
@pytest.mark.parametrize(
    "typed,setting,value",
    [
        (["--lr", "1e-3"], "learning_rate", 1e-3),
        (["--learning-rate", "1e-3"], "learning_rate", 1e-3),
        (["--batch-size", "64"], "batch_size", 64),
        (["-b", "64"], "batch_size", 64),
        (["-b64"], "batch_size", 64),
        (["--wd", "0.05"], "weight_decay", 0.05),
        (["--weight-decay", "0.05"], "weight_decay", 0.05),
        (["-j", "3"], "num_workers", 3),
        (["--workers", "3"], "num_workers", 3),
        (["--output", "runs"], "checkpoint_dir", "runs"),
        (["--experiment", "mine"], "checkpoint_name", "mine"),
        (["--data-path", "imagenet"], "data_dir", "imagenet"),
        (["--opt", "sgd"], "optimizer", "sgd"),
        (["--sched", "constant"], "lr_schedule", "constant"),
        (["--smoothing", "0.1"], "label_smoothing", 0.1),
        (["--clip-grad", "1.0"], "clip_grad_norm", 1.0),
        (["--mixup", "0.2", "--cutmix", "1.0"], "cutmix_alpha", 1.0),
        (["--model-ema-decay", "0.9998"], "ema_decay", 0.9998),
        (["--aa", "randaugment"], "auto_augment", "randaugment"),
        (["--reprob", "0.25"], "random_erase", 0.25),
        (["--print-freq", "5"], "log_interval", 5),
        (["--warmup-epochs", "2"], "warmup_epochs", 2),
        (["--no-channels-last"], "channels_last", False),
        (["--no-pretrained"], "pretrained", False),
    ],
)
def test_timm_and_torchvision_spellings_set_our_setting_and_count_as_typed(typed, setting, value):
    cfg, explicit = parse(*typed)
    assert getattr(cfg, setting) == value
    assert setting in explicit  # (so --resume and --evaluate treat it as the user's choice)


def test_every_flag_answers_to_its_dashed_spelling_and_its_aliases():
    for action in config.build_parser()._actions:
        if action.dest == "help":
            continue
        canonical = action.option_strings[0]
        assert action.option_strings == list(config.spellings(canonical)), action.option_strings
        assert canonical.replace("_", "-") in action.option_strings
        negated = {"--no_pretrained": "pretrained", "--no_progress": "progress", "--no_channels_last": "channels_last"}
        assert action.dest == negated.get(canonical, canonical[2:])  # the setting is named by the first spelling
    aliased = {s for action in config.build_parser()._actions for s in action.option_strings}
    assert not set(config.ALIASES) - aliased, "an alias names no flag"
    assert not set(config.UNLIKE_FLAGS) & aliased, "a flag said to mean something else is one of ours"


def test_help_shows_each_flag_once_with_all_its_spellings():
    text = config.build_parser().format_help()
    assert "--learning_rate, --learning-rate, --lr LEARNING_RATE" in text
    assert "--batch_size, --batch-size, -b BATCH_SIZE" in text
    assert text.count("--lr ") == 1  # the value's name once, after the last spelling
    usage = text[: text.index("\n\n")]
    assert "--learning-rate" not in usage and "[--learning_rate LEARNING_RATE]" in usage


def test_hints_and_saved_settings_keep_the_canonical_names():
    cfg, explicit = parse("--lr", "1e-3", "--wd", "0")
    assert config.as_flag("learning_rate", cfg.learning_rate) == "with --learning_rate 0.001"
    saved = {**vars(parse()[0]), "learning_rate": 1e-4}
    cfg.resume = True
    with pytest.raises(UserError, match="trained with --learning_rate 0.0001, not with --learning_rate 0.001"):
        config.merge_saved(saved, cfg, explicit, config.RESUMABLE_OVERRIDES)


# --------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize(
    "typed,meant",
    [
        ("--epoch", "--epochs"),  # an abbreviation: refused, since a later flag could take it over
        ("--learning", "--learning_rate"),
        ("--batchsize", "--batch_size"),
        ("--batch-sise", "--batch-size"),  # in the spelling the user types
        ("--lr_rate", "--learning_rate"),
        ("--no", "--no_progress, --no_pretrained or --no_bias_decay"),  # a shared beginning: three
        ("--warmup", "--warmup_epochs"),
        ("-lr", "--lr"),
        ("--LR", "--lr"),
    ],
)
def test_an_unknown_flag_names_the_flag_meant(typed, meant):
    assert refusal(typed, "2") == f"unrecognized argument {typed} (did you mean {meant}?)"


def test_a_far_off_flag_points_to_help_and_every_unknown_flag_is_named():
    assert refusal("--frobnicate", "1") == "unrecognized argument --frobnicate (see --help)"
    message = refusal("--epoch", "2", "--batchsize=8")
    assert message == (
        "unrecognized argument --epoch (did you mean --epochs?); "
        "unrecognized argument --batchsize (did you mean --batch_size?)"
    )


def test_flags_that_mean_something_else_here_say_what_to_type():
    assert "--checkpoint_dir DIR" in refusal("--output-dir", "runs")
    assert "--checkpoint_dir DIR" in refusal("--output_dir", "runs")
    assert "--evaluate" in refusal("--test-only")
    assert "--ema_decay D" in refusal("--model-ema")


def test_a_value_after_a_switch_is_named_as_such():
    # timm's and torchvision's --resume take a checkpoint path; ours continues the named run
    assert refusal("--resume", "checkpoint.pth") == (
        "--resume takes no value (continue the run from its last.pt), got 'checkpoint.pth'"
    )
    assert refusal("stray") == refusal("--epochs", "3", "stray") == "unrecognized argument 'stray' (see --help)"
    assert refusal("--epochs", "3", "--amp", "3").startswith("--amp takes no value (automatic mixed precision")
    assert refusal("--resume=checkpoint.pth") == refusal("--resume", "checkpoint.pth")  # (argparse's own words before)


def test_a_double_dash_is_named_not_every_flag_after_it():
    # (argparse took the flags after it as values, and named each as unknown: "--evaluate (did you mean --evaluate?)")
    assert refusal("--", "--evaluate") == "main.py takes no '--': drop it, and give the flags after it as flags"


def test_a_bad_value_names_the_flag_once():
    assert refusal("--aa", "augmix").startswith("argument --auto_augment: invalid choice: 'augmix'")
    assert refusal("--lr", "fast").startswith("argument --learning_rate: invalid float value: 'fast'")


# --------------------------------------------------------------------------- docs/flags.md
def test_docs_flags_md_is_up_to_date():
    with open(flags_md.PATH) as f:
        written = f.read()
    assert written == flags_md.flags_markdown(), "docs/flags.md is out of date: run `python tools/flags_md.py`"


def test_docs_flags_md_lists_every_flag_with_its_default():
    text = flags_md.flags_markdown()
    for action in config.build_parser()._actions:
        if action.dest != "help":
            assert f"| `{action.option_strings[0]}`" in text, action.option_strings[0]
    assert "| `--batch_size`, `--batch-size`, `-b` BATCH_SIZE | `256` |" in text
    assert (
        "| `--num_workers`, `--num-workers`, `-j`, `--workers` NUM_WORKERS | on a GPU the CPUs per process, on the CPU those"
        in text
    )
    assert "## optimization" in text and "| `--amp` | off |" in text and "| `--channels_last`, " in text


# --------------------------------------------------------------------------- commands in the docs
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# A command: optional VAR=value settings, then python (or torchrun and its own flags) and main.py.
COMMAND = re.compile(r"^(?:\w+=\S*\s+)*(?:python3?|torchrun)\s.*?\bmain\.py(?:\s|$)")


def documented_commands(path):
    """(where, the arguments after main.py) of each main.py command in `path`'s fenced code
    blocks (backslash continuations joined, comments dropped) and inline code spans."""
    with open(path) as f:
        lines = f.read().split("\n")
    found, fenced, pending, first = [], False, "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if fenced:
            first = first if pending else number  # (a command is found at its first line)
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            candidates, pending = [pending.strip()], ""
        else:
            candidates, first = re.findall(r"`([^`]+)`", line), number
        found += [(f"{os.path.relpath(path, ROOT)}:{first}", c) for c in candidates if COMMAND.match(c)]
    return [(where, arguments(command)) for where, command in found]


def arguments(command):
    """The arguments after main.py, up to a shell operator; $variables stand for a number."""
    lexer = shlex.shlex(re.sub(r"\$\{?\w+\}?", "1", command), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    tokens = tokens[tokens.index("main.py") + 1 :]
    operator = next((i for i, token in enumerate(tokens) if set(token) <= set(";&|()")), len(tokens))
    return tokens[:operator]


COMMANDS = [command for path in DOCS for command in documented_commands(path)]


def test_commands_are_read_as_a_shell_would(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python main.py --demo --amp` or `main.py` alone.\n"
        "```bash\n"
        "for seed in 1 2; do\n"
        "    python main.py --checkpoint_name s$seed --seed ${seed}   # a comment --epoch 2\n"
        "done\n"
        "OMP_NUM_THREADS=1 python main.py --epochs 3 \\\n"
        "    --lr 1e-3 && echo done\n"
        "torchrun --standalone --nproc_per_node 4 main.py --amp\n"
        "python benchmarks/overhead.py --rounds 4\n"
        "# python main.py --in-a-comment\n"
        "```\n"
    )
    assert [argv for _, argv in documented_commands(str(page))] == [
        ["--demo", "--amp"],
        ["--checkpoint_name", "s1", "--seed", "1"],
        ["--epochs", "3", "--lr", "1e-3"],
        ["--amp"],
    ]


def test_the_docs_show_commands_to_check():
    wheres = " ".join(where for where, _ in COMMANDS)
    assert len(COMMANDS) >= 30 and "torchrun" not in wheres  # (torchrun's own flags are cut off)
    assert ["--compare", "fp32_s1", "fp32_s2", "fp32_s3", "amp_s1", "amp_s2", "amp_s3"] in [a for _, a in COMMANDS]
    assert any(argv[:2] == ["--checkpoint_name", "baseline_4gpu"] for _, argv in COMMANDS)  # a torchrun line


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{where} {' '.join(argv)}" for where, argv in COMMANDS])
def test_every_documented_command_parses(where, argv):
    if "--help" in argv:
        return
    try:
        parse(*argv)
    except UserError as exc:
        pytest.fail(f"{where}: python main.py {' '.join(argv)}: {exc}")
