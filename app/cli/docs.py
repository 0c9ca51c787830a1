"""docs/cli.md, generated from the parser: `python -m app.cli.docs > docs/cli.md`.

tests/test_cli_docs.py fails when the committed file differs from what this prints. The text is
formatted here, not by argparse, so it does not depend on the terminal's width.
"""
from __future__ import annotations

import argparse
import sys

INTRO = """\
# The `diffmine` command line

<!-- Generated from the parser (app/cli): python -m app.cli.docs > docs/cli.md -->

Every step of the web app can also be run from the shell. Each command prints a human summary (with
a progress bar on stderr for long work) or, with `--json`, one JSON object on stdout. It exits with
status 0 on success; on failure it prints a one-line reason on stderr, exits non-zero and leaves
nothing written. `--home DIR` (or `DIFFMINE_HOME`) selects the data directory (database, files,
indexes). Long commands run in the foreground; `--queue` puts the work on the worker's queue and
prints the job id (`{"job": ID}`), `--wait` also follows it to the end. Ctrl-C on a foreground
command cancels its job at the next step (a second Ctrl-C: at once), keeps what it finished
(checkpoints) and prints the `diffmine resume JOB` that goes on from there (exit status 130). The
same command run again while its job is queued or running gets that job, not a second one; a
dataset may have `DIFFMINE_MAX_PENDING_JOBS_PER_DATASET` (20) jobs queued or running at once.
`serve` and `demo` listen on 127.0.0.1:8000 unless `--host`/`--port` (or
`DIFFMINE_HOST`/`DIFFMINE_PORT`) say otherwise.
"""


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown reference of every command of `parser` (default: the diffmine parser)."""
    if parser is None:
        from app.cli import build_parser

        parser = build_parser()
    common = [a for a in arguments(parser) if a.option_strings and not is_help(a)]
    shared = {a.dest for a in common}
    out = [INTRO, "## Options of every command", "", *option_table(common), ""]
    for name, help_line, command in subcommands(parser):
        positionals = [a for a in arguments(command) if not a.option_strings]
        options = [a for a in arguments(command)
                   if a.option_strings and not is_help(a) and a.dest not in shared]
        out += [f"## `{parser.prog} {name}`", "", f"{cell(help_line[:1].upper() + help_line[1:])}.", ""]
        usage = " ".join([parser.prog, name, "[options]", *(placeholder(a) for a in positionals)])
        out += ["```", usage, "```", ""]
        for action in positionals:
            out.append(f"- `{placeholder(action)}`" + (f": {cell(action.help)}" if action.help else ""))
        if positionals:
            out.append("")
        if options:
            out += option_table(options) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def option_table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| option | default | description |", "|---|---|---|"]
    for action in actions:
        value = "" if action.nargs == 0 else " " + value_name(action)
        flags = ", ".join(f"`{flag}{value}`" for flag in action.option_strings)
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS
        shown = "" if hidden else f"`{cell(str(default))}`"
        rows.append(f"| {flags} | {shown} | {cell(action.help or '')} |")
    return rows


def value_name(action: argparse.Action) -> str:
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.metavar or action.dest.upper()


def placeholder(action: argparse.Action) -> str:
    return action.metavar or action.dest.upper()


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def is_help(action: argparse.Action) -> bool:
    return action.dest == "help"


# argparse has no public accessor for a parser's arguments or its subcommands' help lines; these
# two read them (sphinx-argparse does the same) and never change them.
def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a.choices, dict)]


def subcommands(parser: argparse.ArgumentParser):
    """(name, help line, parser) of every subcommand, in the order --help lists them."""
    for action in parser._actions:
        if isinstance(action.choices, dict):  # the subparsers action
            for choice in action._choices_actions:
                yield choice.dest, choice.help or "", action.choices[choice.dest]


if __name__ == "__main__":
    sys.stdout.write(render())
