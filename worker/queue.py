"""The worker's side of the job table: claim atomically, hold a lease, report, finish.

Claiming is one UPDATE ... WHERE id = (SELECT ...) RETURNING statement: SQLite runs it as a
single write, so two workers can never take the same job. A job whose lease runs out (its
worker died) is claimable again and resumes from its own checkpoints.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, or_, select, update

from app.db import session_scope
from app.jobs import Workers, expire_dead_owners
from app.models import Job, utcnow
from app.settings import Settings

LOG_LINES_KEPT = 200


def _expired(now: datetime):
    return and_(Job.status == "running", Job.lease_until < now)


def fail_exhausted(settings: Settings) -> None:
    """Jobs whose worker died on every attempt fail instead of looping forever; a job whose
    worker died after a cancel was asked for is cancelled (no worker would claim it again).
    A job whose worker is known to be dead (its registration lock is free: app/jobs.py) has
    its lease ended first, so that it resumes now."""
    with session_scope(settings) as session:
        expire_dead_owners(session, Workers.of(settings))
    now = utcnow()
    with session_scope(settings) as session:
        session.execute(update(Job).where(_expired(now), Job.cancel_requested.is_(True))
                        .values(status="cancelled", finished_at=now, lease_until=None))
        session.execute(update(Job).where(_expired(now), Job.attempts >= Job.max_attempts)
                        .values(status="failed", finished_at=now, lease_until=None,
                                error="the worker running this job stopped responding on "
                                      "every attempt"))


def claim_next(settings: Settings, *, worker_id: str, lease_seconds: float,
               kinds: tuple[str, ...] | None = None) -> int | None:
    fail_exhausted(settings)
    now = utcnow()
    candidate = (select(Job.id)
                 .where(or_(Job.status == "queued", _expired(now)), Job.cancel_requested.is_(False))
                 .order_by(Job.priority.desc(), Job.id).limit(1))
    if kinds:
        candidate = candidate.where(Job.kind.in_(kinds))
    with session_scope(settings) as session:
        return session.scalar(
            update(Job).where(Job.id == candidate.scalar_subquery())
            .values(status="running", worker_id=worker_id, heartbeat_at=now,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now))
            .returning(Job.id))


def renew_lease(settings: Settings, *, job_id: int, worker_id: str, lease_seconds: float
                ) -> tuple[bool, bool, bool]:
    """Extend our lease. Returns (still ours, cancel requested, higher-priority work waiting)."""
    now = utcnow()
    with session_scope(settings) as session:
        renewed = session.execute(
            update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
            .values(lease_until=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
            .returning(Job.cancel_requested, Job.priority)).first()
        if renewed is None:
            return False, False, False
        cancel, priority = renewed
        waiting = session.scalar(select(exists().where(Job.status == "queued",
                                                       Job.priority > priority)))
        return True, bool(cancel), bool(waiting)


def save_progress(settings: Settings, *, job_id: int, worker_id: str, **values) -> None:
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id)
                        .values(**values))


def append_log(settings: Settings, *, job_id: int, lines: list[str]) -> None:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job is not None:
            kept = ((job.log or "").splitlines() + lines)[-LOG_LINES_KEPT:]
            job.log = "\n".join(kept)


def finish(settings: Settings, *, job_id: int, worker_id: str, status: str,
           result: dict | None = None, error: str | None = None) -> None:
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id)
                        .values(status=status, result=result, error=error, finished_at=utcnow(),
                                lease_until=None))


def requeue(settings: Settings, *, job_id: int, worker_id: str, count_attempt: bool,
            error: str | None = None) -> None:
    """Put a running job back in the queue (preempted, or failed with an error that can pass)."""
    with session_scope(settings) as session:
        values = dict(status="queued", worker_id=None, lease_until=None, error=error)
        if not count_attempt:
            values["attempts"] = Job.attempts - 1
        session.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id)
                        .values(**values))


def claim_job(settings: Settings, *, job_id: int, worker_id: str, lease_seconds: float) -> bool:
    """Claim one specific queued job, or one whose worker is gone (the CLI runs its own job in
    the foreground, or resumes one)."""
    fail_exhausted(settings)
    now = utcnow()
    with session_scope(settings) as session:
        return session.scalar(
            update(Job).where(Job.id == job_id, or_(Job.status == "queued", _expired(now)),
                              Job.cancel_requested.is_(False))
            .values(status="running", worker_id=worker_id, heartbeat_at=now,
                    started_at=func.coalesce(Job.started_at, now),
                    lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=Job.attempts + 1).returning(Job.id)) is not None
