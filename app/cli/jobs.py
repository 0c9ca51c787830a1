"""The job queue: `diffmine worker` (runs queued jobs), `diffmine jobs` and `diffmine cancel`."""
from __future__ import annotations

import argparse

from app.cli.common import CommandError, add_queue_flags, command, run_job
from app.settings import Settings


@command("worker")
def cmd_worker(args, settings: Settings) -> None:
    from worker.runner import Worker

    worker = Worker(settings, worker_id=args.worker_id, lease_seconds=args.lease,
                    poll_seconds=args.poll)
    if not args.json:
        print(f"diffmine worker {worker.worker_id} on {settings.home_dir}", flush=True)
    worker.run(exit_when_idle=args.exit_when_idle)


@command("jobs")
def cmd_jobs(args, settings: Settings) -> dict:
    from app.db import session_scope, upgrade
    from app.jobs import Workers, job_json, list_jobs

    upgrade(settings)
    workers = Workers.of(settings)
    with session_scope(settings) as session:
        jobs = [job_json(j, workers=workers)
                for j in list_jobs(session, active_only=not args.all, limit=args.limit)]
    if not args.json:
        if not jobs:
            print("No queued or running jobs." if not args.all else "No jobs.")
        for job in jobs:
            fraction = f" {100 * job['fraction']:.0f}%" if job["fraction"] is not None else ""
            eta = f" eta {job['eta_seconds']:.0f}s" if job["eta_seconds"] else ""
            print(f"{job['id']:>5} {job['kind']:<10} {job['status']:<10}{fraction}{eta} "
                  f"{job['stage'] or ''} {job['message'] or ''} {job['error'] or ''}".rstrip())
            if job["status"] == "stalled":
                print(f"      {'resumable' if job['resumable'] else 'stalled'}: {job['resume']}")
    return {"jobs": jobs}


@command("cancel")
def cmd_cancel(args, settings: Settings) -> dict:
    from app.db import session_scope
    from app.jobs import Workers, job_json, request_cancel

    with session_scope(settings) as session:
        job = request_cancel(session, args.job, workers=Workers.of(settings))
        if job is None:
            raise CommandError(f"no job {args.job}")
        result = job_json(job)
    if not args.json:
        print(f"Job {args.job}: {result['status']}"
              + (" (stops at its next step)" if result["cancel_requested"] else ""))
    return result


@command("resume")
def cmd_resume(args, settings: Settings) -> dict:
    from app.db import session_scope, upgrade
    from app.jobs import QueueFull, Workers, resume_job

    upgrade(settings)
    try:
        with session_scope(settings) as session:
            job = resume_job(session, job_id=args.job, workers=Workers.of(settings))
            kind = job.kind
    except (LookupError, ValueError, QueueFull) as error:
        raise CommandError(str(error)) from error
    return run_job(args, settings, args.job, kind)


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    worker = sub.add_parser("worker", parents=[common], help="run the job worker until stopped")
    worker.add_argument("--worker-id")
    worker.add_argument("--lease", type=float,
                        help="seconds a job's lease lasts (default: $DIFFMINE_LEASE_SECONDS, else 30)")
    worker.add_argument("--poll", type=float, default=1.0, help="seconds between queue polls")
    worker.add_argument("--exit-when-idle", action="store_true", help="stop when the queue is empty")

    jobs = sub.add_parser("jobs", parents=[common], help="queued and running jobs with progress")
    jobs.add_argument("--all", action="store_true", help="finished jobs too")
    jobs.add_argument("--limit", type=int, default=50)

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job", type=int)

    resume = sub.add_parser("resume", parents=[common],
                            help="resume a cancelled, failed or stalled job from its checkpoints")
    resume.add_argument("job", type=int)
    add_queue_flags(resume)
