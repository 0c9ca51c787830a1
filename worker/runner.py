"""The worker process: claim a job, run its handler, record the outcome, repeat."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import traceback

from sqlalchemy.exc import OperationalError

from app.db import session_scope, upgrade
from app.jobs import Workers, expire_dead_owners, prune_dead_workers, register_worker
from app.models import Job
from app.settings import Settings
from worker import queue
from worker.context import JobCancelled, JobContext, JobPreempted, LeaseLost, TransientError
from worker.handlers import handler_for

log = logging.getLogger("diffmine.worker")


def is_transient(error: BaseException) -> bool:
    """Errors worth a retry: a locked database, a busy device, a full GPU."""
    if isinstance(error, (TransientError, TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OperationalError) and "locked" in str(error):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class Worker:
    def __init__(self, settings: Settings, *, worker_id: str | None = None,
                 lease_seconds: float | None = None, poll_seconds: float = 1.0,
                 kinds: tuple[str, ...] | None = None):
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_seconds = settings.lease_seconds if lease_seconds is None else lease_seconds
        self.poll_seconds = poll_seconds
        self.kinds = kinds
        self.models: dict = {}  # kept loaded between jobs on the same model
        self._stopping = threading.Event()

    def stop(self, *_args) -> None:
        self._stopping.set()

    def run(self, *, exit_when_idle: bool = False) -> None:
        upgrade(self.settings)
        signal.signal(signal.SIGTERM, self.stop)
        # Alive while this lock is held (app/jobs.py): `diffmine jobs` and /jobs tell a job of a
        # dead worker (stalled) from one being worked on.
        registration = register_worker(self.settings, worker_id=self.worker_id, claims=True)
        with session_scope(self.settings) as session:
            expire_dead_owners(session, Workers.of(self.settings))
        prune_dead_workers(self.settings)
        try:
            while not self._stopping.is_set():
                if not self.run_one():
                    if exit_when_idle:
                        return
                    self._stopping.wait(self.poll_seconds)
        finally:
            registration.release(remove=True)

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job_id = queue.claim_next(self.settings, worker_id=self.worker_id,
                                  lease_seconds=self.lease_seconds, kinds=self.kinds)
        if job_id is None:
            return False
        self.run_claimed(job_id)
        return True

    def run_claimed(self, job_id: int, *, on_progress=None, preemptible: bool = True,
                    interrupt: threading.Event | None = None) -> None:
        """Run a job this worker claimed. `interrupt` (set by a foreground command's Ctrl-C)
        cancels it at its next step boundary."""
        with session_scope(self.settings) as session:
            job = session.get(Job, job_id)
            kind, params, priority = job.kind, dict(job.params), job.priority
        context = JobContext(settings=self.settings, job_id=job_id, kind=kind, params=params,
                             worker_id=self.worker_id, priority=priority,
                             lease_seconds=self.lease_seconds, models=self.models,
                             on_progress=on_progress, preemptible=preemptible, interrupt=interrupt)
        self._run(context)

    def _attempts_left(self, job_id: int) -> bool:
        with session_scope(self.settings) as session:
            job = session.get(Job, job_id)
            return job.attempts < job.max_attempts

    def _run(self, context: JobContext) -> None:
        ids = dict(job_id=context.job_id, worker_id=self.worker_id)
        context.start()
        try:
            result = handler_for(context.kind)(context)
            queue.finish(self.settings, status="succeeded", result=result, **ids)
        except JobCancelled:
            queue.finish(self.settings, status="cancelled", **ids)
        except JobPreempted:
            queue.requeue(self.settings, count_attempt=False, **ids)
        except LeaseLost:
            log.warning("job %s was taken over by another worker", context.job_id)
        except Exception as error:  # noqa: BLE001 - a job's failure must not kill the worker
            message = f"{type(error).__name__}: {error}"
            context.log(*traceback.format_exc().splitlines()[-15:])
            if is_transient(error) and self._attempts_left(context.job_id):
                queue.requeue(self.settings, count_attempt=True, error=message, **ids)
            else:
                queue.finish(self.settings, status="failed", error=message, **ids)
        finally:
            context.stop()
