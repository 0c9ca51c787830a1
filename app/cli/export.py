"""`diffmine export`: a run's results as JSON, CSV or HTML (formats in docs/export.md)."""
from __future__ import annotations

import argparse
import os
import sys

from app.cli.common import command
from app.settings import Settings


@command("export")
def cmd_export(args, settings: Settings) -> None:
    import tempfile
    from pathlib import Path

    from app.services.export import export_run

    if not args.output:
        export_run(settings, run_id=args.run, format=args.format, out=sys.stdout)
        return None
    target = Path(args.output)
    # Written beside the target and renamed at the end: a failed export leaves no file.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent or ".",
                                     suffix=".partial", delete=False) as out:
        try:
            export_run(settings, run_id=args.run, format=args.format, out=out)
        except BaseException:
            os.unlink(out.name)
            raise
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)
    if not args.json:
        print(f"Wrote the {args.format} export of run {args.run} to {target}", file=sys.stderr)
    return None


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser("export", parents=[common], help="a run's results as JSON, CSV or HTML")
    export.add_argument("run", type=int)
    export.add_argument("--format", choices=("json", "csv", "html"), default="json")
    export.add_argument("-o", "--output", help="file to write (default: stdout)")
