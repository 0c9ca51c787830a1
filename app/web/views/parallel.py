"""Consistent changes of a run: translate a sample of images into every label, mine the patches
that are typical under every label at once, and show each as a row of its versions."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from app.services.parallel import DEFAULT_IMAGES, parallel_jobs, parallel_summary
from app.services.translation_jobs import launch_parallel
from app.web.deps import CSRF, SessionDep, SettingsDep, is_htmx, redirect, render
from app.web.views.runs import credit_for, load_run

router = APIRouter(tags=["consistent changes"])


@router.get("/runs/{run_id:int}/parallel",
            summary="The run's parallel datasets (consistent changes) and a form to start one")
def parallel_page(request: Request, run_id: int, session: SessionDep):
    run = load_run(session, run_id)
    jobs = parallel_jobs(session, run_id=run_id)
    pending = any(job["status"] in ("queued", "running") for job in jobs)
    context = {"run": run, "data": {"run": run, "jobs": jobs, "pending": pending,
                                    "default_images": DEFAULT_IMAGES}}
    if is_htmx(request):
        return render(request, "_parallel_jobs.html", context)
    return render(request, "parallel.html", context)


@router.post("/runs/{run_id:int}/parallel", dependencies=CSRF,
             summary="Start a parallel dataset: N sampled images translated into every label")
async def start_parallel(request: Request, run_id: int, session: SessionDep):
    form = await request.form()
    load_run(session, run_id)
    try:
        images = int(form.get("images") or DEFAULT_IMAGES)
        if not 1 <= images <= 100_000:
            raise ValueError(f"the sample must have 1 to 100000 images, got {images}")
        job = launch_parallel(session, run_id=run_id, images=images)
    except ValueError as error:
        raise HTTPException(400, str(error)) from error
    session.commit()
    return redirect(request, f"/runs/{run_id}/parallel", data={"job": job.id})


@router.get("/runs/{run_id:int}/parallel/{job_id:int}",
            summary="One parallel dataset: clusters of consistent changes, each member as a row of versions")
def parallel_result(request: Request, run_id: int, job_id: int, session: SessionDep,
                    settings: SettingsDep):
    run = load_run(session, run_id)
    summary = parallel_summary(session, settings, run_id=run_id, job_id=job_id)
    if summary is None:
        raise HTTPException(404, f"Run {run_id} has no parallel dataset {job_id}.")
    return render(request, "parallel_result.html",
                  {"run": run, "data": summary, "credit": credit_for(run)})
