"""Consistent changes of a run (docs/method.md section 5), as the web reads them: the parallel-dataset
jobs of the run and the summary.json each finished one wrote (worker/handlers/parallel.py)."""
from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import job_json
from app.models import Job
from app.settings import Settings

#: Sample size offered by default: minutes on a CPU for the demo model.
DEFAULT_IMAGES = 32


def parallel_jobs(session: Session, *, run_id: int) -> list[dict]:
    """The run's parallel-dataset jobs, newest first."""
    jobs = session.scalars(select(Job).where(Job.kind == "parallel",
                                             Job.params["run_id"].as_integer() == run_id)
                           .order_by(Job.id.desc())).all()
    return [job_json(job) for job in jobs]


def parallel_summary(session: Session, settings: Settings, *, run_id: int, job_id: int) -> dict | None:
    """A finished job's summary (clusters of consistently changing patches), or None.

    Small by construction: a few clusters of at most 16 members, one crop path per label."""
    job = session.get(Job, job_id)
    if job is None or job.kind != "parallel" or (job.params or {}).get("run_id") != run_id:
        return None
    if job.status != "succeeded" or not (job.result or {}).get("summary"):
        return {"job": job_json(job), "clusters": None}
    summary = json.loads((settings.home_dir / job.result["summary"]).read_text())
    return dict(summary, job=job_json(job))
