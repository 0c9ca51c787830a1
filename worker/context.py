"""What a running job sees: its parameters, progress reporting, and step-boundary checks.

A heartbeat thread keeps the job's lease alive and notices a cancel request or waiting
interactive work; `check()` turns those into exceptions at the next step boundary, so handlers
stop only where their checkpoints make resuming exact.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from app.params import Params, job_params
from app.settings import Settings
from worker import queue


class JobCancelled(Exception):
    pass


class JobPreempted(Exception):
    """Interactive work is waiting: give the worker back; the job resumes from its checkpoint."""


class LeaseLost(Exception):
    """Another worker took the job over (our lease expired): stop without writing anything."""


class TransientError(Exception):
    """An error that can pass (a busy resource): the job is retried up to its attempt limit."""


@dataclass
class JobContext:
    settings: Settings
    job_id: int
    kind: str
    params: dict
    worker_id: str
    priority: int
    lease_seconds: float
    #: models kept loaded between jobs, keyed by model id
    models: dict = field(default_factory=dict)
    preemptible: bool = True
    #: also told of every progress update (the CLI draws a progress bar with it)
    on_progress: object = None
    #: set by the foreground command's Ctrl-C: cancel at the next step boundary
    interrupt: threading.Event | None = None

    def __post_init__(self):
        self._cancel = self._preempt = self._lost = False
        self._stop = threading.Event()
        self._last_write = 0.0
        self._rate_start: tuple[float, float] | None = None
        self._heartbeat = threading.Thread(target=self._beat, daemon=True)

    # --- lifecycle (the runner calls these) ---------------------------------------------------
    def start(self) -> None:
        self._heartbeat.start()

    def stop(self) -> None:
        self._stop.set()
        self._heartbeat.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                ours, cancel, waiting = queue.renew_lease(self.settings, job_id=self.job_id,
                                                          worker_id=self.worker_id,
                                                          lease_seconds=self.lease_seconds)
            except Exception:  # noqa: BLE001 - a busy database: try again at the next beat
                continue
            self._lost, self._cancel, self._preempt = not ours, cancel, waiting

    # --- for handlers -------------------------------------------------------------------------
    @cached_property
    def job(self) -> Params:
        """The job's parameters as its kind's model (app/params.py); a pipeline's stages read
        its run_id and model_id the way the score, mine and train jobs do."""
        return job_params(self.kind, self.params)

    @property
    def work_dir(self) -> Path:
        """This job's own folder, for checkpoints that survive a killed worker."""
        path = self.settings.home_dir / "jobs" / str(self.job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def check(self) -> None:
        """Call at step boundaries: raises if the job must stop here."""
        if self._lost:
            raise LeaseLost()
        if self._cancel or (self.interrupt is not None and self.interrupt.is_set()):
            raise JobCancelled()
        if self._preempt and self.preemptible:
            raise JobPreempted()

    def progress(self, done: float, total: float | None, message: str | None = None, *,
                 stage: str | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress is not None and total:
            self.on_progress(done, total, message)
        if self._rate_start is None or done < self._rate_start[1]:
            self._rate_start = (now, done)
        # Throttled: one small write every half second is plenty for a progress bar.
        if not force and now - self._last_write < 0.5 and (total is None or done < total):
            return
        self._last_write = now
        elapsed = now - self._rate_start[0]
        rate = (done - self._rate_start[1]) / elapsed if elapsed > 0 else None
        eta = (total - done) / rate if rate and total is not None else None
        values = dict(progress_done=done, progress_total=total, message=message, rate=rate,
                      eta_seconds=eta)
        if stage is not None:
            values["stage"] = stage
        queue.save_progress(self.settings, job_id=self.job_id, worker_id=self.worker_id, **values)

    def log(self, *lines: str) -> None:
        queue.append_log(self.settings, job_id=self.job_id, lines=list(lines))
