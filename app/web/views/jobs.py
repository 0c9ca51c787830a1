"""Jobs: the list, one job's live progress (its fragment is polled every second while the job is
active, so a reload finds it where it is), and cancel."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy import select

from app.jobs import ACTIVE, Workers, job_json, list_jobs, request_cancel
from app.models import Dataset, Job
from app.web.deps import CSRF, SessionDep, SettingsDep, is_htmx, redirect, render

router = APIRouter(tags=["jobs"])


@router.get("/jobs", summary="Recent jobs, newest first")
def jobs_page(request: Request, session: SessionDep, settings: SettingsDep, limit: int = 100):
    workers = Workers.of(settings)  # a running job whose worker is gone shows as stalled
    jobs = [job_json(j, workers=workers) for j in list_jobs(session, limit=min(max(limit, 1), 500))]
    return render(request, "jobs.html", {"data": {"jobs": jobs}})


def job_data(session, job: Job, settings) -> dict:
    data = job_json(job, workers=Workers.of(settings))
    data["active"] = job.status in ACTIVE
    data["links"] = job_links(session, job)
    return data


def job_links(session, job: Job) -> list[dict]:
    """Where to go from a job: what it works on, and what it made."""
    params, result, links = job.params or {}, job.result or {}, []
    run_id = result.get("run") or params.get("run_id")
    if run_id and job.kind in ("pipeline", "mine", "score"):
        links.append({"url": f"/runs/{run_id}", "text": "Open the run's galleries" if
                      job.status == "succeeded" else f"Run {run_id}"})
    if job.kind == "ingest":
        name = result.get("dataset") or params.get("name")
        dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == name)) if name else None
        if dataset_id:
            links.append({"url": f"/datasets/{dataset_id}", "text": f"Open dataset {name}"})
    if job.kind == "translate" and params.get("translation_id"):
        links.append({"url": f"/translations/{params['translation_id']}", "text": "The translation"})
    if job.kind == "train" and params.get("model_id"):
        links.append({"url": "/", "text": f"Model {params['model_id']}"})
    return links


def _job_or_404(session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"There is no job {job_id}.")
    return job


@router.get("/jobs/{job_id:int}", summary="One job: stage, done/total, rate, ETA, log tail")
def job_page(request: Request, job_id: int, session: SessionDep, settings: SettingsDep):
    data = job_data(session, _job_or_404(session, job_id), settings)
    return render(request, "job.html", {"data": data})


@router.get("/jobs/{job_id:int}/progress", summary="The job's progress panel (polled by the page)")
def job_progress(request: Request, job_id: int, session: SessionDep, settings: SettingsDep):
    data = job_data(session, _job_or_404(session, job_id), settings)
    return render(request, "_job.html", {"data": data, "job": data})


@router.post("/jobs/{job_id:int}/cancel", dependencies=CSRF, summary="Cancel a job")
def cancel_job(request: Request, job_id: int, session: SessionDep, settings: SettingsDep):
    job = request_cancel(session, job_id, workers=Workers.of(settings))
    if job is None:
        raise HTTPException(404, f"There is no job {job_id}.")
    session.flush()
    if is_htmx(request):
        data = job_data(session, job, settings)
        return render(request, "_job.html", {"data": data, "job": data})
    return redirect(request, f"/jobs/{job_id}", data=job_json(job))
