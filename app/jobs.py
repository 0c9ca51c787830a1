"""The job queue as the web and the CLI see it: record work, list it, cancel it.

The worker process (worker/queue.py) claims and runs jobs; nothing here imports torch.
"""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, utcnow
from app.params import Params, job_params

ACTIVE = ("queued", "running")
#: Interactive work (a clicked translation) runs before batch work.
PRIORITY_INTERACTIVE = 10
PRIORITY_BATCH = 0


def enqueue(session: Session, *, kind: str, params: dict | Params, priority: int = PRIORITY_BATCH,
            parent_id: int | None = None, max_attempts: int = 3) -> Job:
    """A queued job; its params are checked against its kind's model (app/params.py)."""
    stored = job_params(kind, params).model_dump(exclude_defaults=True)
    job = Job(kind=kind, params=stored, priority=priority, parent_id=parent_id,
              max_attempts=max_attempts, status="queued")
    session.add(job)
    session.flush()
    return job


def list_jobs(session: Session, *, active_only: bool = False, limit: int = 50) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if active_only:
        query = query.where(Job.status.in_(ACTIVE))
    return list(session.scalars(query))


def request_cancel(session: Session, job_id: int) -> Job | None:
    """A queued job is cancelled at once; a running one stops at its next step boundary."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
    elif job.status == "running":
        job.cancel_requested = True
    return job


def job_json(job: Job) -> dict:
    total = job.progress_total or 0
    return {"id": job.id, "kind": job.kind, "status": job.status, "priority": job.priority,
            "params": job.params, "result": job.result, "stage": job.stage,
            "done": job.progress_done, "total": job.progress_total,
            "fraction": (job.progress_done / total) if total else None,
            "message": job.message, "rate": job.rate, "eta_seconds": job.eta_seconds,
            "attempts": job.attempts, "error": job.error, "worker": job.worker_id,
            "parent": job.parent_id, "cancel_requested": job.cancel_requested,
            "log": (job.log or "").splitlines()[-20:],
            "created_at": job.created_at.isoformat(timespec="seconds"),
            "finished_at": job.finished_at.isoformat(timespec="seconds") if job.finished_at else None}
