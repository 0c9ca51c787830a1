"""The job queue as the web and the CLI see it: record work, list it, cancel it, and tell a
running job from a stalled one (its worker is gone).

The worker process (worker/queue.py) claims and runs jobs; nothing here imports torch.

Recording work is guarded: an identical job already queued or running is returned instead of
a second one (a double-clicked form), and a dataset's queued and running jobs are capped
(Settings.max_pending_jobs_per_dataset). Both checks run under the database's write lock, so
concurrent requests cannot slip past them.
"""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import hold_write_lock
from app.locks import Held, hold, is_held, read_info, try_hold
from app.models import Dataset, Job, MiningRun, TrainedModel, utcnow
from app.params import Params, job_params
from app.settings import Settings

ACTIVE = ("queued", "running")
#: Interactive work (a clicked translation) runs before batch work.
PRIORITY_INTERACTIVE = 10
PRIORITY_BATCH = 0
#: Kinds the per-dataset cap leaves out: translations are interactive, cached per setting and
#: queued several at once by a cluster's page; an ingest has no dataset yet.
UNCAPPED_KINDS = ("translate", "ingest")


class QueueFull(Exception):
    """A dataset has as many queued and running jobs as it may (a 429 on the web)."""


def enqueue(session: Session, *, kind: str, params: dict | Params, priority: int = PRIORITY_BATCH,
            parent_id: int | None = None, max_attempts: int = 3) -> Job:
    """A queued job; its params are checked against its kind's model (app/params.py).

    An active job of the same kind with the same params is returned instead of a new one; a
    dataset that already has its limit of active jobs raises QueueFull."""
    stored = job_params(kind, params).model_dump(exclude_defaults=True)
    lock_queue(session)
    existing = pending_job(session, kind, lambda p: p == stored)
    if existing is not None:
        return existing
    check_capacity(session, kind=kind, params=stored)
    job = Job(kind=kind, params=stored, priority=priority, parent_id=parent_id,
              max_attempts=max_attempts, status="queued")
    session.add(job)
    session.flush()
    return job


def lock_queue(session: Session) -> None:
    """Hold the write lock until the session commits: call it before looking for a duplicate
    (and before creating the rows a job will fill), so that two requests never both miss it."""
    hold_write_lock(session, Job.__tablename__)


def pending_job(session: Session, kind: str, matches: Callable[[dict], bool]) -> Job | None:
    """The oldest queued or running job of `kind` whose params `matches` (one not being
    cancelled: a user who cancelled a job and asks again wants a new one)."""
    for job in session.scalars(select(Job).where(Job.kind == kind, Job.status.in_(ACTIVE),
                                                 Job.cancel_requested.is_(False)).order_by(Job.id)):
        if matches(job.params or {}):
            return job
    return None


def check_capacity(session: Session, *, kind: str, params: dict) -> None:
    """Raise QueueFull when the dataset this job works on has its limit of active jobs."""
    if kind in UNCAPPED_KINDS:
        return
    settings = session.info.get("settings")
    limit = (settings.max_pending_jobs_per_dataset if settings is not None
             else Settings.model_fields["max_pending_jobs_per_dataset"].default)
    dataset_id = _datasets_of(session, [params]).get(0)
    if dataset_id is None:
        return
    active = session.execute(select(Job.kind, Job.params).where(
        Job.status.in_(ACTIVE), Job.kind.not_in(UNCAPPED_KINDS))).all()
    datasets = _datasets_of(session, [p or {} for _, p in active])
    pending = sum(1 for d in datasets.values() if d == dataset_id)
    if pending >= limit:
        name = session.get(Dataset, dataset_id).name
        raise QueueFull(f"dataset {name!r} already has {pending} jobs queued or running, its limit "
                        f"(DIFFMINE_MAX_PENDING_JOBS_PER_DATASET={limit}): wait for some to finish "
                        f"or cancel them (see: diffmine jobs; diffmine cancel JOB)")


def _datasets_of(session: Session, params: list[dict]) -> dict[int, int]:
    """{index in `params`: dataset id} for job params naming a model or a run."""
    model_of_run = dict(session.execute(select(MiningRun.id, MiningRun.model_id).where(
        MiningRun.id.in_({p["run_id"] for p in params if isinstance(p.get("run_id"), int)}))).all())
    models = {p.get("model_id") or model_of_run.get(p.get("run_id")) for p in params}
    dataset_of_model = dict(session.execute(select(TrainedModel.id, TrainedModel.dataset_id)
                                            .where(TrainedModel.id.in_(models - {None}))).all())
    found = {}
    for index, p in enumerate(params):
        model_id = p.get("model_id") or model_of_run.get(p.get("run_id"))
        if model_id in dataset_of_model:
            found[index] = dataset_of_model[model_id]
    return found


def list_jobs(session: Session, *, active_only: bool = False, limit: int = 50) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if active_only:
        query = query.where(Job.status.in_(ACTIVE))
    return list(session.scalars(query))


def request_cancel(session: Session, job_id: int, *, workers: Workers | None = None) -> Job | None:
    """A queued job is cancelled at once; a running one stops at its next step boundary; a
    stalled one (its worker is gone, as `workers` saw) is cancelled at once too."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status == "queued" or (workers is not None and workers.owner_gone(job)):
        job.lease_until = None
        job.status, job.finished_at = "cancelled", utcnow()
    elif job.status == "running":
        job.cancel_requested = True
    return job


def resume_job(session: Session, *, job_id: int, workers: Workers) -> Job:
    """Put a cancelled or failed job back in the queue, as it was (its checkpoints and the rows
    it filled so far are where it left them, so it goes on from there). A stalled job (its
    worker is gone) and a queued one are left as they are: the next claim takes them."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id} (see: diffmine jobs --all)")
    if job.status == "succeeded":
        raise ValueError(f"job {job_id} has already succeeded")
    if job.status == "running" and not workers.owner_gone(job):
        raise ValueError(f"job {job_id} is running (worker {job.worker_id}); follow it with: "
                         f"diffmine jobs")
    if job.status in ("cancelled", "failed"):
        lock_queue(session)
        check_capacity(session, kind=job.kind, params=job.params or {})
        job.status, job.cancel_requested, job.error = "queued", False, None
        job.finished_at, job.worker_id, job.lease_until, job.attempts = None, None, None, 0
    return job


def job_json(job: Job, *, workers: Workers | None = None) -> dict:
    """The job as the CLI and the pages show it. With `workers` (who is alive), a running job
    whose worker is gone shows as "stalled", with how it resumes."""
    total = job.progress_total or 0
    data = {"id": job.id, "kind": job.kind, "status": job.status, "priority": job.priority,
            "params": job.params, "result": job.result, "stage": job.stage,
            "done": job.progress_done, "total": job.progress_total,
            "fraction": (job.progress_done / total) if total else None,
            "message": job.message, "rate": job.rate, "eta_seconds": job.eta_seconds,
            "attempts": job.attempts, "error": job.error, "worker": job.worker_id,
            "parent": job.parent_id, "cancel_requested": job.cancel_requested,
            "log": (job.log or "").splitlines()[-20:],
            "created_at": job.created_at.isoformat(timespec="seconds"),
            "finished_at": job.finished_at.isoformat(timespec="seconds") if job.finished_at else None}
    if workers is not None and workers.owner_gone(job):
        data.update(status="stalled", resumable=not job.cancel_requested,
                    resume=workers.resume_hint(job))
    return data


# --- who is alive -----------------------------------------------------------------------------
# Every worker process (and every foreground command running its own job) holds a lock on a
# file of its own under <home>/workers/ while it runs. A job whose worker holds no such lock any
# more, or whose lease ran out, is stalled: nobody is working on it.
WORKERS = "workers"


def register_worker(settings: Settings, *, worker_id: str, claims: bool) -> Held:
    """Record this process as a live worker until the returned lock is released (or the
    process dies). `claims`: it takes jobs from the queue (`diffmine worker`), not only its own
    (a foreground command)."""
    name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
    return hold(settings.home_dir / WORKERS / name,
                {"worker": worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                 "claims": claims, "started": utcnow().isoformat(timespec="seconds")})


@dataclass
class Workers:
    """The registered workers, alive and dead, as seen once (for one listing or one claim)."""

    #: worker id -> its registration, for the live ones
    live: dict[str, dict] = field(default_factory=dict)
    #: ids with a registration whose process is gone, and no live one
    dead: set[str] = field(default_factory=set)
    now: datetime = field(default_factory=utcnow)

    @classmethod
    def of(cls, settings: Settings) -> Workers:
        folder = settings.home_dir / WORKERS
        live, dead = {}, set()
        for path in sorted(folder.glob("*.lock")) if folder.is_dir() else ():
            info = read_info(path)
            if "worker" not in info:
                continue  # being written
            if is_held(path):
                live[info["worker"]] = info
            else:
                dead.add(info["worker"])
        return cls(live=live, dead=dead - set(live))

    def owner_gone(self, job: Job) -> bool:
        """A running job nobody works on: its worker's process is gone, or its lease ran out
        (a worker on another machine, or one that did not register) and that worker is not
        known to be alive."""
        if job.status != "running" or job.worker_id in self.live:
            return False
        return job.worker_id in self.dead or (job.lease_until is not None and job.lease_until < self.now)

    def claimers(self) -> list[str]:
        return [worker for worker, info in self.live.items() if info.get("claims")]

    def resume_hint(self, job: Job) -> str:
        if job.cancel_requested:
            return (f"its worker ({job.worker_id}) stopped before the cancel took effect; the next "
                    f"worker's claim ends it as cancelled")
        claimers = self.claimers()
        if claimers:
            return (f"its worker ({job.worker_id}) stopped; worker {claimers[0]} resumes it from "
                    f"its last checkpoint when it is free")
        return (f"its worker ({job.worker_id}) stopped and no worker is running: start one "
                f"(diffmine worker) or run it here (diffmine resume {job.id}); it resumes from its "
                f"last checkpoint")


def expire_dead_owners(session: Session, workers: Workers) -> int:
    """End the leases of running jobs whose worker is known to be dead, so that a worker
    resumes them now rather than when the lease would have run out. Returns how many."""
    if not workers.dead:
        return 0
    return session.execute(update(Job).where(Job.status == "running",
                                             Job.worker_id.in_(workers.dead),
                                             Job.lease_until > workers.now)
                           .values(lease_until=workers.now - timedelta(seconds=1))).rowcount


def prune_dead_workers(settings: Settings) -> int:
    """Remove the registrations of worker processes that are gone; call it after
    `expire_dead_owners` (their jobs' leases are over by then). Returns how many."""
    folder, removed = settings.home_dir / WORKERS, 0
    for path in folder.glob("*.lock") if folder.is_dir() else ():
        free = try_hold(path)
        if free is not None and "worker" in read_info(path):
            free.release(remove=True)
            removed += 1
        elif free is not None:
            free.release()
    return removed
