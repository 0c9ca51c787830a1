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


class Interrupted(CommandError):
    """Ctrl-C stopped the command's job: printed as one line, exit status 130."""


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
    from app.jobs import enqueue

    job_id = create_rows(settings, lambda session: enqueue(session, kind=kind, params=params).id)
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
    return run_here(settings, job_id, description, json_mode=args.json)


def run_here(settings: Settings, job_id: int, description: str, *, json_mode: bool) -> dict:
    """Run the job in this process. Ctrl-C cancels it at its next step boundary (a second
    Ctrl-C at once), keeps what it finished (checkpoints, scored shards) and says how to resume
    it; a process killed otherwise leaves it stalled, and resumable by a worker."""
    import signal
    import threading

    interrupt = threading.Event()

    def on_ctrl_c(_signum, _frame) -> None:
        if interrupt.is_set():
            raise KeyboardInterrupt
        interrupt.set()
        print(f"\nStopping job {job_id} at its next step (Ctrl-C again: at once)...",
              file=sys.stderr, flush=True)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if in_main else None
    claimed = []
    try:
        _run_claimed_here(settings, job_id, description, json_mode, interrupt, claimed)
    except KeyboardInterrupt:  # a second Ctrl-C before the job was claimed
        interrupt.set()
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if interrupt.is_set():
        status = _cancel_if_ours(settings, job_id, ours=bool(claimed))
        if status in ("cancelled", "cancelling"):
            raise Interrupted(f"job {job_id} ({description}) cancelled by Ctrl-C; what it finished "
                              f"is kept (checkpoints, earlier runs). Resume it with: diffmine "
                              f"resume {job_id} --home {settings.home_dir}")
        if status in ("queued", "running"):  # an identical job another process runs: not ours
            raise Interrupted(f"stopped following job {job_id}, which goes on elsewhere; follow it "
                              f"with: diffmine jobs")
    return wait_for_job(settings, job_id, json_mode=True)


def _run_claimed_here(settings: Settings, job_id: int, description: str, json_mode: bool,
                      interrupt, claimed: list) -> None:
    from app.jobs import register_worker
    from worker import queue
    from worker.runner import Worker

    worker = Worker(settings, worker_id=f"cli:{os.getpid()}")
    bar = progress_bar(description, json_mode)
    # Alive while held: if this process dies, `diffmine jobs` shows the job stalled at once.
    registration = register_worker(settings, worker_id=worker.worker_id, claims=False)
    try:
        # Claimed again after an error that can pass (the job went back to the queue), until
        # it ends or runs out of attempts.
        while not interrupt.is_set() and queue.claim_job(settings, job_id=job_id,
                                                         worker_id=worker.worker_id,
                                                         lease_seconds=worker.lease_seconds):
            # In the foreground nothing else shares this process, so the job never yields.
            claimed.append(job_id)
            worker.run_claimed(job_id, on_progress=bar, preemptible=False, interrupt=interrupt)
    except KeyboardInterrupt:  # the second Ctrl-C: stop where we are
        interrupt.set()
        queue.finish(settings, job_id=job_id, worker_id=worker.worker_id, status="cancelled")
    finally:
        registration.release(remove=True)


def _cancel_if_ours(settings: Settings, job_id: int, *, ours: bool) -> str | None:
    """After a Ctrl-C: cancel the job if it is still queued (stopped before it was claimed), or
    ours and not ended. Returns its status then ("cancelling": asked to stop), None if gone."""
    from app.db import session_scope
    from app.jobs import request_cancel
    from app.models import Job

    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        if job.status == "queued" or (job.status == "running" and ours):
            request_cancel(session, job_id)
        return "cancelling" if job.status == "running" and job.cancel_requested else job.status


def create_rows(settings: Settings, launch) -> int:
    """Run `launch(session)` (which creates rows, usually a job) and return what it returns."""
    from app.db import session_scope, upgrade
    from app.jobs import QueueFull
    from app.params import ValidationError, readable
    from app.services.runs import NotFound

    upgrade(settings)
    try:
        with session_scope(settings) as session:
            return launch(session)
    except ValidationError as error:
        raise CommandError(readable(error)) from error
    except (NotFound, ValueError, QueueFull) as error:
        raise CommandError(str(error)) from error


def add_queue_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", action="store_true", help="put the work on the worker's queue")
    parser.add_argument("--wait", action="store_true", help="queue it and follow it to the end")


# --- settings -------------------------------------------------------------------------------
# Settings fields that have a flag; every other field is set by its DIFFMINE_ variable only.
SETTING_FLAGS = ("home", "host", "port", "database_url", "device", "token")


def common_flags(*, defaults: bool = True) -> argparse.ArgumentParser:
    """The parent parser of every command: the data directory, the other settings, --json.

    The subcommands' copy has no defaults (`defaults=False`): argparse lets a subparser's default
    overwrite what the main parser read, so `diffmine --home X ingest ...` would lose X."""
    common = argparse.ArgumentParser(add_help=False, argument_default=None if defaults else argparse.SUPPRESS)
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
