"""Helpers shared by the test files: waiting on a condition with a deadline, free ports, servers
that answer, job rows."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from app.db import session_scope
from app.models import Job
from app.settings import Settings

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout: float, interval: float = 0.1,
               message: str | Callable[[], str] | None = None) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return
    that; once `timeout` seconds have passed, fail with an AssertionError "timed out after N s
    waiting for MESSAGE", where `message` says what was awaited (a callable is asked for it
    then, so it can show the latest state or a log). An exception the predicate raises (a
    pytest.fail for a state the wait can no longer get out of) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for "
                                 f"{text or getattr(predicate, '__name__', 'the condition')}")
        time.sleep(min(interval, left))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def wait_for_server(base: str, process: subprocess.Popen, *, timeout: float = 60,
                    log: Path | None = None) -> None:
    """Wait until the `diffmine serve` process at `base` serves its static files; fail at once,
    with its output (`log`, else its stderr pipe), if it exits first."""
    def output() -> str:
        if log is not None:
            return Path(log).read_text()
        if process.stderr is not None and process.poll() is not None:
            return process.stderr.read()
        return ""

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with code {process.returncode}: {output()}")
        return url_answers(base + "/static/style.css")

    wait_until(answering, timeout=timeout,
               message=lambda: f"{base} to answer. {output()}".rstrip())


def job_row(settings: Settings | Path, job_id: int) -> Job:
    """The job's row as it is now, detached from its session; `settings` may be a data directory."""
    if not isinstance(settings, Settings):
        settings = Settings(home=settings)
    with session_scope(settings) as session:
        row = session.get(Job, job_id)
        session.expunge(row)
        return row


# --- processes a test starts ----------------------------------------------------------------------
_STARTED: list = []


def started(process):
    """Register a process a test started: conftest's `kill_started` kills it after the test, even
    one that fails halfway."""
    _STARTED.append(process)
    return process


def kill_started() -> None:
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@contextmanager
def served(home: Path, log: Path, **environment: str) -> Iterator[str]:
    """`diffmine serve` over the data in `home` on a free port, in a subprocess: its base URL,
    the server stopped on the way out. `environment`: more variables for the server."""
    port = free_port()
    env = dict(os.environ, DIFFMINE_HOME=str(home), DIFFMINE_PORT=str(port), **environment)
    web = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env,
                           stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, web, log=log)
        yield base
    finally:
        web.terminate()
        try:
            web.wait(timeout=10)
        except subprocess.TimeoutExpired:
            web.kill()
