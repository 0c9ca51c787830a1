"""SIGKILL the worker in the middle of training, scoring and mining: a new worker finishes the
job with exactly the results of an uninterrupted run, and no duplicate rows."""
import hashlib
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Cluster, ClusterMember, ImageScore, Job, Patch
from app.settings import Settings
from tests.small_data import animal_folder

RUN_OPTIONS = ["--size", "tiny", "--steps", "40", "--batch-size", "8", "--checkpoint-every", "10",
               "--preset", "fast", "--draws", "8", "--shard-size", "8", "--per-label", "12",
               "--clusters", "2"]


def cli(home, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=600, **kwargs)


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


def job_state(home, job_id=1):
    with session_scope(Settings(home=home)) as session:
        job = session.get(Job, job_id)
        return job.status, job.stage, job.progress_done or 0, job.attempts


def kill_when(home, process, predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, stage, done, _ = job_state(home)
        if status != "running" and status != "queued":
            pytest.fail(f"the job ended ({status}) before the worker could be killed at this point")
        if predicate(stage, done):
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            time.sleep(2.5)  # its lease runs out
            return
        time.sleep(0.05)
    pytest.fail("timed out waiting for the kill point")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return animal_folder(tmp_path_factory.mktemp("animals"))


def ingest(home, source):
    assert cli(home, "ingest", str(source), "--name", "a", "--min-per-label", "5").returncode == 0


def test_killed_in_training_scoring_and_mining(source, tmp_path, start_worker):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for home in (reference, resumed):
        ingest(home, source)
    done = cli(reference, "run", "a", *RUN_OPTIONS, "--json")
    assert done.returncode == 0, done.stderr

    queued = cli(resumed, "run", "a", *RUN_OPTIONS, "--queue", "--json")
    assert queued.returncode == 0 and '"job": 1' in queued.stdout
    kill_points = [lambda stage, done: stage == "train" and done >= 15,
                   lambda stage, done: stage == "score" and done >= 8,
                   lambda stage, done: stage == "features" and done >= 1]
    for point in kill_points:
        kill_when(resumed, start_worker(resumed, "--lease", "2", "--poll", "0.1"), point)
    last = start_worker(resumed, "--lease", "2", "--poll", "0.1")
    deadline = time.time() + 300
    while job_state(resumed)[0] in ("queued", "running") and time.time() < deadline:
        time.sleep(0.2)
    last.terminate()
    last.wait(timeout=30)
    status, _, _, attempts = job_state(resumed)
    assert status == "succeeded" and attempts == 4
    assert results(resumed) == results(reference)
