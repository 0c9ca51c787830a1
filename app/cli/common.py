"""What every command group shares: the command registry, the failure every command may raise,
progress bars, following a job (queue, wait or run it here), and the flags of the settings."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from app.settings import Settings

COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], dict | None]] = {}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def command(name: str):
    def register(func):
        COMMANDS[name] = func
        return func
    return register


# Bars still drawn when a command fails: main() closes them, so the error gets a line of its own.
open_bars: list = []


def progress_bar(description: str, json_mode: bool):
    """A progress callback(done, total) drawing a tqdm bar on stderr (not when piped in --json)."""
    from tqdm import tqdm

    bar = None

    def update(done: float, total: float, message: str | None = None) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="img", file=sys.stderr,
                       disable=json_mode and not sys.stderr.isatty(), dynamic_ncols=True)
            open_bars.append(bar)
        bar.total = total
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.update(done - bar.n)  # tqdm redraws at most every 0.1 s
        if done >= total:
            bar.close()
    return update


# --- jobs -----------------------------------------------------------------------------------
def queue_or_wait(args, settings: Settings, kind: str, params) -> dict | None:
    """With --queue, record the job and return its id; with --wait, also follow it to the end.
    Returns None when the work should run in the foreground."""
    if not (args.queue or args.wait):
        return None
    from app.db import session_scope, upgrade
    from app.jobs import enqueue

    upgrade(settings)
    with session_scope(settings) as session:
        job_id = enqueue(session, kind=kind, params=params).id
    if not args.wait:
        if not args.json:
            print(f"Queued job {job_id} ({kind}); follow it with: diffmine jobs")
        return {"job": job_id}
    return wait_for_job(settings, job_id, json_mode=args.json)


def wait_for_job(settings: Settings, job_id: int, *, json_mode: bool) -> dict:
    import time

    from app.db import session_scope
    from app.models import Job

    bar = progress_bar(f"job {job_id}", json_mode)
    while True:
        with session_scope(settings) as session:
            job = session.get(Job, job_id)
            status, result, error = job.status, job.result, job.error
            done, total, message = job.progress_done, job.progress_total, job.message
        if total:
            bar(min(done, total), total, message)
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    if status != "succeeded":
        raise CommandError(f"job {job_id} {status}" + (f": {error}" if error else ""))
    return dict(result or {}, job=job_id)


def run_job(args, settings: Settings, job_id: int, description: str) -> dict:
    """Follow a job created by a command: return its id (--queue), wait for the worker (--wait),
    or run it here in the foreground (the default), with the same code the worker runs."""
    if args.queue:
        if not args.json:
            print(f"Queued job {job_id} ({description}); follow it with: diffmine jobs")
        return {"job": job_id}
    if args.wait:
        return wait_for_job(settings, job_id, json_mode=args.json)
    from worker import queue
    from worker.runner import Worker

    worker = Worker(settings, worker_id=f"cli:{os.getpid()}")
    bar = progress_bar(description, args.json)
    # Claimed again after an error that can pass (the job went back to the queue), until
    # it ends or runs out of attempts.
    while queue.claim_job(settings, job_id=job_id, worker_id=worker.worker_id,
                          lease_seconds=worker.lease_seconds):
        # In the foreground nothing else shares this process, so the job never yields.
        worker.run_claimed(job_id, on_progress=bar, preemptible=False)
    return wait_for_job(settings, job_id, json_mode=True)


def create_rows(settings: Settings, launch) -> int:
    """Run `launch(session)` (which creates rows, usually a job) and return what it returns."""
    from app.db import session_scope, upgrade
    from app.params import ValidationError, readable
    from app.services.runs import NotFound

    upgrade(settings)
    try:
        with session_scope(settings) as session:
            return launch(session)
    except ValidationError as error:
        raise CommandError(readable(error)) from error
    except (NotFound, ValueError) as error:
        raise CommandError(str(error)) from error


def add_queue_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", action="store_true", help="put the work on the worker's queue")
    parser.add_argument("--wait", action="store_true", help="queue it and follow it to the end")


# --- settings -------------------------------------------------------------------------------
# Settings fields that have a flag; every other field is set by its DIFFMINE_ variable only.
SETTING_FLAGS = ("home", "host", "port", "database_url", "device", "token")


def common_flags() -> argparse.ArgumentParser:
    """The parent parser of every command: the data directory, the other settings, --json."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="data directory (default: $DIFFMINE_HOME or ./diffmine-data)")
    add_setting_flag(common, "database_url", "SQLAlchemy URL (default: $DIFFMINE_DATABASE_URL, "
                                             "else SQLite in the data directory)")
    add_setting_flag(common, "device", "torch device: auto (cuda, then mps, then cpu), cuda, cuda:1, "
                                       "cpu... (default: $DIFFMINE_DEVICE or auto)")
    # The environment variable is the safer way to pass a secret: a flag shows in `ps`.
    add_setting_flag(common, "token", "access token every web request then needs (default: "
                                      "$DIFFMINE_TOKEN or none; prefer the variable: flags show in ps)")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return common


def add_setting_flag(parser: argparse.ArgumentParser, field: str, help: str) -> None:
    """A flag for a field of Settings, spelled like it (database_url -> --database-url)."""
    assert field in Settings.model_fields and field in SETTING_FLAGS, field
    parser.add_argument("--" + field.replace("_", "-"), help=help)


def settings_environment(settings: Settings) -> dict[str, str]:
    """The flagged settings as DIFFMINE_ variables, so that a child process (a worker started
    with only --home) uses the same database, device and token as the command that started it."""
    return {f"DIFFMINE_{field.upper()}": str(value) for field in SETTING_FLAGS
            if (value := getattr(settings, field)) is not None}


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment's settings, with the flags given on the command line overriding them."""
    from pydantic import ValidationError

    overrides = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as error:  # e.g. --port 99999: refused, never taken modulo 65536
        raise CommandError("; ".join(_setting_error(e) for e in error.errors())) from None


def _setting_error(error: dict) -> str:
    field = str(error["loc"][0]) if error["loc"] else "setting"
    where = f"DIFFMINE_{field.upper()}" + (f" or --{field.replace('_', '-')}"
                                           if field in SETTING_FLAGS else "")
    return f"bad setting {field} ({where}): {error['msg'].removeprefix('Value error, ')}"
