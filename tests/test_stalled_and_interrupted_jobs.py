"""Crashes outside the worker (issue 14, section 8): Ctrl-C on a foreground command cancels its
job, keeps its checkpoints and says how to resume it; a foreground command or a worker killed
with SIGKILL leaves its job stalled (not "running" forever), in `diffmine jobs` and on /jobs,
and resumable by a worker."""
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from app.db import session_scope
from app.models import Job
from app.settings import Settings
from tests.cli_helpers import diffmine_json, run_diffmine
from tests.helpers import free_port, job_row, started, wait_for_server, wait_until

TRAIN = ["--size", "tiny", "--batch-size", "4", "--checkpoint-every", "5"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture
def home(pets_home):
    return pets_home


def start(home, *args) -> subprocess.Popen:
    """A `diffmine` command in the foreground of its own process, as a user types it."""
    return started(subprocess.Popen([sys.executable, "-m", "app.cli", *args, "--home", str(home)],
                                    env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def training_past(home, job_id: int, step: int, process: subprocess.Popen | None = None):
    def past() -> bool:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process exited ({process.returncode}): {process.stderr.read()}")
        with session_scope(Settings(home=home)) as session:
            job = session.get(Job, job_id)
            return job is not None and job.stage == "train" and (job.progress_done or 0) >= step
    wait_until(past, timeout=300, interval=0.05, message=f"job {job_id} to train past step {step}")


def checkpoints(home, model_id: int) -> list[str]:
    """The model's completed training checkpoints."""
    return sorted(p.parent.name for p in (home / f"models/{model_id}/checkpoints").glob("step-*/state.json"))


def listed(home, job_id: int) -> dict:
    return next(j for j in diffmine_json(home, "jobs")["jobs"] if j["id"] == job_id)


def test_ctrl_c_cancels_the_foreground_job_keeps_its_checkpoints_and_says_how_to_resume(home):
    train = start(home, "train", "pets", *TRAIN, "--steps", "100")
    training_past(home, 1, 7, train)
    train.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = train.communicate(timeout=120)
    assert train.returncode == 130, err
    assert "Stopping job 1 at its next step" in err
    assert f"Resume it with: diffmine resume 1 --home {home}" in err
    job = job_row(home, 1)
    assert job.status == "cancelled" and not job.cancel_requested
    assert checkpoints(home, 1)
    # No worker takes a cancelled job over (before, the next worker finished it silently).
    done = run_diffmine(home, "worker", "--exit-when-idle", env=ENV)
    assert done.returncode == 0 and job_row(home, 1).status == "cancelled"

    # Resumed from its last checkpoint, it finishes the 100 steps.
    resumed = diffmine_json(home, "resume", "1")
    assert resumed["model"] == 1 and resumed["steps"] == 100
    assert job_row(home, 1).status == "succeeded"


def test_a_killed_foreground_job_is_stalled_and_a_worker_resumes_it(home, start_worker):
    train = start(home, "train", "pets", *TRAIN, "--steps", "40")
    training_past(home, 1, 7, train)
    train.send_signal(signal.SIGKILL)
    train.wait(timeout=30)
    job = listed(home, 1)
    assert job["status"] == "stalled" and job["resumable"]
    assert "no worker is running" in job["resume"] and "diffmine resume 1" in job["resume"]
    text = run_diffmine(home, "jobs", env=ENV).stdout
    assert "stalled" in text and "resumable:" in text

    start_worker(home, "--poll", "0.2")
    finished = wait_until(lambda: (row := job_row(home, 1)).status not in ("queued", "running") and row,
                          timeout=300, message="the worker to resume the killed job")
    assert finished.status == "succeeded" and finished.attempts == 2, finished.error
    assert finished.result["steps"] == 40


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_a_dead_workers_job_shows_stalled_in_the_cli_and_on_the_jobs_page(home, start_worker):
    queued = diffmine_json(home, "train", "pets", *TRAIN, "--steps", "400", "--queue")
    worker = start_worker(home, "--poll", "0.2")
    training_past(home, queued["job"], 3)
    alive = listed(home, queued["job"])
    assert alive["status"] == "running" and "resumable" not in alive
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)

    job = listed(home, queued["job"])
    assert job["status"] == "stalled" and "no worker is running" in job["resume"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--home", str(home),
                               "--port", str(port)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    started(server)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, server)
        page = get_json(f"{base}/jobs/{queued['job']}.json")
        assert page["status"] == "stalled" and page["resumable"] and page["active"]
        assert [j["status"] for j in get_json(f"{base}/jobs.json")["jobs"]] == ["stalled"]
        with urllib.request.urlopen(f"{base}/jobs/{queued['job']}", timeout=10) as response:
            assert "Stalled: its worker" in response.read().decode()
        # A stalled job has no worker to stop it: a cancel ends it at once; it can be resumed.
        assert diffmine_json(home, "cancel", str(queued["job"]))["status"] == "cancelled"
        assert get_json(f"{base}/jobs/{queued['job']}.json")["status"] == "cancelled"
        assert diffmine_json(home, "resume", str(queued["job"]), "--queue") == {"job": queued["job"]}
        # A worker alive again: it takes the job over and it runs again.
        start_worker(home, "--poll", "0.2")
        wait_until(lambda: get_json(f"{base}/jobs/{queued['job']}.json")["status"] == "running",
                   timeout=120, message="the new worker to take the resumed job over")
        assert job_row(home, queued["job"]).attempts == 1  # attempts start again on resume
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
