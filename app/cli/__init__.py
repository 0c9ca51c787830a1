"""The `diffmine` command line (reference: docs/cli.md).

Every command returns a JSON-able dict; `--json` prints it as one object on stdout, otherwise a
human summary is printed. Failures print one line on stderr and exit non-zero.

One module per command group (data, pipeline, export, translate, jobs, serve) holds its commands
and their parsers; common holds what they share. docs/cli.md is generated from build_parser() by
app/cli/docs.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from app.cli import data, export, jobs, pipeline, serve, translate

# Besides main and build_parser, what tests and scripts import from app.cli.
from app.cli.common import (  # noqa: F401
    COMMANDS,
    CommandError,
    Interrupted,
    command,
    common_flags,
    open_bars,
    settings_environment,
    settings_from,
)
from app.cli.serve import run_side_by_side  # noqa: F401

# In the order `diffmine --help` lists their commands.
GROUPS = (data, pipeline, export, translate, jobs, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmine", parents=[common_flags()],
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub, common_flags(defaults=False))
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads (torch, FAISS) otherwise spin and starve each other on small machines;
    # it must be set before either library starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        result = COMMANDS[args.command](args, settings)
    except KeyboardInterrupt:
        print("diffmine: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line
        from app.ingest import IngestError

        known = isinstance(exc, (IngestError, CommandError, FileNotFoundError, LookupError))
        reason = str(exc) if known else f"{type(exc).__name__}: {exc}"
        for bar in open_bars:
            bar.close()  # a no-op for a bar already closed
        print(f"diffmine {args.command}: {reason}".replace("\n", " "), file=sys.stderr)
        if os.environ.get("DIFFMINE_TRACEBACK"):
            raise
        return 130 if isinstance(exc, Interrupted) else 1
    if args.json and result is not None:
        print(json.dumps(result, default=str))
    return 0
