"""SIGKILL the worker in the middle of training, scoring and mining: a new worker finishes the
job with exactly the results of an uninterrupted run, and no duplicate rows."""
import hashlib
import signal

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Cluster, ClusterMember, ImageScore, Patch
from app.settings import Settings
from tests.cli_helpers import run_diffmine
from tests.helpers import job_row, wait_until
from tests.small_data import animal_folder

RUN_OPTIONS = ["--size", "tiny", "--steps", "40", "--batch-size", "8", "--checkpoint-every", "10",
               "--preset", "fast", "--draws", "8", "--shard-size", "8", "--per-label", "12",
               "--clusters", "2"]


def results(home):
    settings = Settings(home=home)
    weights = (home / "models/1/weights/unet/diffusion_pytorch_model.safetensors").read_bytes()
    with session_scope(settings) as session:
        scores = session.execute(select(ImageScore.image_id, ImageScore.label_id, ImageScore.typicality)
                                 .order_by(ImageScore.image_id, ImageScore.label_id)).all()
        patches = session.execute(select(Patch.image_id, Patch.label_id, Patch.x0, Patch.y0, Patch.score)
                                  .order_by(Patch.label_id, Patch.score.desc(), Patch.image_id)).all()
        clusters = session.execute(select(Cluster.label_id, Cluster.rank, Cluster.size,
                                          func.count(ClusterMember.patch_id))
                                   .join(ClusterMember).group_by(Cluster.id)
                                   .order_by(Cluster.label_id, Cluster.rank)).all()
    return hashlib.sha256(weights).hexdigest(), scores, patches, clusters


def kill_when(home, process, attempt, predicate, timeout=300):
    """SIGKILL the worker `process` once it runs the job (its `attempt`-th claim: the dead
    worker's lease ran out and this one took the job over) and the job is at `predicate`."""
    def at_the_kill_point() -> bool:
        job = job_row(home, 1)
        if job.status not in ("running", "queued"):
            pytest.fail(f"the job ended ({job.status}) before the worker could be killed at this point")
        return job.attempts == attempt and predicate(job.stage, job.progress_done or 0)

    def state() -> str:
        job = job_row(home, 1)
        return (f"the kill point of attempt {attempt} (the job is at {job.stage} {job.progress_done}, "
                f"attempt {job.attempts})")

    wait_until(at_the_kill_point, timeout=timeout, interval=0.05, message=state)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return animal_folder(tmp_path_factory.mktemp("animals"))


def ingest(home, source):
    assert run_diffmine(home, "ingest", str(source), "--name", "a", "--min-per-label", "5").returncode == 0


def test_killed_in_training_scoring_and_mining(source, tmp_path, start_worker):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for home in (reference, resumed):
        ingest(home, source)
    done = run_diffmine(reference, "run", "a", *RUN_OPTIONS, "--json", timeout=600)
    assert done.returncode == 0, done.stderr

    queued = run_diffmine(resumed, "run", "a", *RUN_OPTIONS, "--queue", "--json")
    assert queued.returncode == 0 and '"job": 1' in queued.stdout
    kill_points = [lambda stage, done: stage == "train" and done >= 15,
                   lambda stage, done: stage == "score" and done >= 8,
                   # from the features stage's start: its parts take well under a second here,
                   # so waiting for the first one to finish raced the end of the job
                   lambda stage, done: stage == "features"]
    for attempt, point in enumerate(kill_points, start=1):
        kill_when(resumed, start_worker(resumed, "--lease", "2", "--poll", "0.1"), attempt, point)
    last = start_worker(resumed, "--lease", "2", "--poll", "0.1")
    job = wait_until(lambda: (row := job_row(resumed, 1)).status not in ("queued", "running") and row,
                     timeout=300, interval=0.2, message="the last worker to finish the job")
    last.terminate()
    last.wait(timeout=30)
    assert job.status == "succeeded" and job.attempts == 4, job.error
    assert results(resumed) == results(reference)
