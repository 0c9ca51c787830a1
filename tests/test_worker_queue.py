"""The job queue with the real worker process: claiming, failure, cancel, kill and resume."""
import json
import signal
import threading

from sqlalchemy import func, select

from app.db import session_scope
from app.jobs import PRIORITY_INTERACTIVE, enqueue, request_cancel
from app.models import Dataset, Image, Job, utcnow
from tests.cli_helpers import run_diffmine
from tests.conftest import label_files, write_zip
from tests.helpers import job_row, wait_until
from worker import queue


def add_job(settings, kind="ingest", priority=0, **params):
    with session_scope(settings) as session:
        return enqueue(session, kind=kind, params=params, priority=priority).id


def lease_expired(settings, job_id) -> bool:
    """The job's worker holds it no longer: the next claim may take it over."""
    row = job_row(settings, job_id)
    return row.status == "running" and row.lease_until < utcnow()


def test_claim_is_atomic_under_concurrency(settings):
    ids = [add_job(settings, source="x", name=f"n{i}") for i in range(30)]
    claimed: list[int] = []

    def claimer(worker):
        while (job_id := queue.claim_next(settings, worker_id=worker, lease_seconds=60)) is not None:
            claimed.append(job_id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ids


def test_interactive_jobs_are_claimed_first(settings):
    batch = add_job(settings, source="x", name="batch")
    click = add_job(settings, source="x", name="click", priority=PRIORITY_INTERACTIVE)
    assert queue.claim_next(settings, worker_id="w", lease_seconds=60) == click
    assert queue.claim_next(settings, worker_id="w", lease_seconds=60) == batch


def test_expired_lease_is_claimable_and_exhausted_jobs_fail(settings):
    job_id = add_job(settings, source="x", name="n")
    with session_scope(settings) as session:
        session.get(Job, job_id).max_attempts = 2
    assert queue.claim_next(settings, worker_id="dead1", lease_seconds=0.01) == job_id
    wait_until(lambda: lease_expired(settings, job_id), timeout=10, interval=0.01, message="dead1's lease to run out")
    assert queue.claim_next(settings, worker_id="dead2", lease_seconds=0.01) == job_id
    wait_until(lambda: lease_expired(settings, job_id), timeout=10, interval=0.01, message="dead2's lease to run out")
    assert queue.claim_next(settings, worker_id="w3", lease_seconds=60) is None
    failed = job_row(settings, job_id)
    assert failed.status == "failed" and failed.attempts == 2
    assert "stopped responding" in failed.error


def test_two_worker_processes_never_run_the_same_job(settings, tmp_path, start_worker):
    ids = []
    for i in range(6):
        archive = write_zip(tmp_path / f"{i}.zip", label_files({"a": 3, "b": 3}, start=10 * i))
        ids.append(add_job(settings, source=str(archive), name=f"set{i}", min_images_per_label=3))
    workers = [start_worker(settings.home_dir, "--poll", "0.2", "--exit-when-idle",
                            "--worker-id", f"w{i}") for i in range(2)]
    for w in workers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    jobs = [job_row(settings, i) for i in ids]
    assert all(j.status == "succeeded" and j.attempts == 1 for j in jobs)
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 6


def test_failed_job_keeps_its_error(settings, tmp_path, start_worker):
    files = label_files({"a": 3, "b": 3})
    files["a/bad.png"] = b"nope"
    job_id = add_job(settings, source=str(write_zip(tmp_path / "bad.zip", files)), name="bad",
                     min_images_per_label=3)
    assert start_worker(settings.home_dir, "--poll", "0.2", "--exit-when-idle").wait(timeout=120) == 0
    failed = job_row(settings, job_id)
    assert failed.status == "failed" and failed.attempts == 1  # a bad file is not retried
    assert failed.error == "IngestError: a/bad.png: not an image file (Pillow cannot identify it)"


def test_cancel_queued_and_running(settings, start_worker):
    queued = add_job(settings, source="builtin:animals", name="never")
    with session_scope(settings) as session:
        assert request_cancel(session, queued).status == "cancelled"
    running = add_job(settings, source="builtin:animals", name="animals")
    worker = start_worker(settings.home_dir, "--poll", "0.2", "--lease", "1")
    try:
        wait_until(lambda: (job_row(settings, running).progress_done or 0) > 200, timeout=120, interval=0.2,
                   message="the ingest to get going")
        with session_scope(settings) as session:
            request_cancel(session, running)
        wait_until(lambda: job_row(settings, running).status == "cancelled", timeout=60, interval=0.2,
                   message=lambda: f"the cancel (the job is {job_row(settings, running).status})")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 0
    assert job_row(settings, queued).status == "cancelled"


def test_killed_worker_job_is_resumed_not_lost_or_doubled(settings, start_worker):
    job_id = add_job(settings, source="builtin:animals", name="animals", limit_per_label=300)
    first = start_worker(settings.home_dir, "--poll", "0.2", "--lease", "2")
    wait_until(lambda: (job_row(settings, job_id).progress_done or 0) > 800, timeout=120, interval=0.2,
               message="the ingest to get going")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    # The next worker exits when it finds nothing to claim: start it once the dead one's lease ran out.
    wait_until(lambda: lease_expired(settings, job_id), timeout=30, message="the dead worker's lease to run out")
    second = start_worker(settings.home_dir, "--poll", "0.2", "--lease", "2", "--exit-when-idle")
    assert second.wait(timeout=300) == 0, second.stderr.read()
    resumed = job_row(settings, job_id)
    assert resumed.status == "succeeded" and resumed.attempts == 2
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 2974  # as an uninterrupted run
    assert not any((settings.staging_dir).rglob("*.png"))


def test_cli_queue_and_wait(settings, tmp_path, start_worker):
    archive = write_zip(tmp_path / "w.zip", label_files({"a": 5, "b": 5}))
    worker = start_worker(settings.home_dir, "--poll", "0.2")
    try:
        done = run_diffmine(settings.home_dir, "ingest", str(archive), "--name", "w", "--wait", "--json",
                            timeout=120)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dataset"] == "w" and result["images"] == 10 and result["job"] == 1
