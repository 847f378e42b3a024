"""Write docs/flags.md, the reference of main.py's flags, from config.build_parser(): each flag's
spellings, default and help, grouped as --help groups them. tests/test_flags.py fails when the
file is out of date: run `python tools/flags_md.py` after changing a flag."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402

PATH = os.path.join(ROOT, "docs", "flags.md")
# Defaults that depend on the machine, as the file states them (--help prints this machine's number).
MACHINE_DEFAULTS = {
    "num_workers": "on a GPU the CPUs per process, on the CPU those PyTorch's threads leave (0 on 2 cores), at most 8"
}

HEADER = """\
# The flags of main.py

Generated from `config.build_parser()` by `python tools/flags_md.py`: do not edit it by hand
(tests/test_flags.py fails when it is out of date). `python main.py --help` prints the same.

Every `--under_score` flag also answers to its `--dashed` spelling, and some to the names that
timm's `train.py` and torchvision's classification reference give the same setting (`--lr`,
`-b`, `--wd`, `-j`, ...). Abbreviations are refused (`--epoch 2` is an error naming `--epochs`), so
a flag added later cannot change what an old command means.
"""


def default_text(action):
    """The flag's default as the table shows it."""
    if action.dest in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[action.dest]
    if action.nargs == 0:  # a switch: on by default only if giving it changes nothing
        return "on" if action.default == action.const else "off"
    if action.default is None:  # what the help says happens then, else none
        said = re.search(r"\bdefault: ([^;)]*)", action.help)
        return help_markdown(said.group(1)) if said else "none"
    value = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
    return f"`{value}`"


def help_markdown(text):
    """Help text as Markdown: flags, and names with underscores, as code (so `_vs_` stays itself)."""
    text = re.sub(r"(?<![\w`])(--[\w-]+|[\w./]*_[\w./]*(?:\(\))?(?<!\.))", r"`\1`", text)
    return text.replace("|", "\\|")


def invocation(action):
    """The flag's spellings, its value's name after the last: `--learning_rate`, `--lr` LEARNING_RATE."""
    spellings = ", ".join(f"`{option}`" for option in action.option_strings)
    if action.nargs == 0:
        return spellings
    metavar = action.metavar or action.dest.upper()
    if action.choices:
        metavar = "{" + ",".join(action.choices) + "}"
    return f"{spellings} {metavar}" + (f" [{metavar} ...]" if action.nargs == "+" else "")


def flags_markdown(parser=None):
    """docs/flags.md's text."""
    parser = parser or config.build_parser()
    parts = [HEADER]
    for group in parser._action_groups:  # (argparse has no public way to list a group's flags)
        actions = [action for action in group._group_actions if action.dest != "help"]
        if not actions:
            continue
        parts.append(f"\n## {group.title}\n\n| Flag | Default | What it does |\n|---|---|---|\n")
        parts.extend(
            f"| {invocation(a)} | {default_text(a)} | {help_markdown(a.help % {'default': a.default})} |\n"
            for a in actions
        )
    return "".join(parts)


if __name__ == "__main__":
    with open(PATH, "w") as f:
        f.write(flags_markdown())
    print(f"wrote {os.path.relpath(PATH)}")
