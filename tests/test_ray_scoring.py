"""Scoring and the DIFT features of mining on Ray (DIFFMINE_RAY_ADDRESS) give the numbers of the
local path, written the same way, and a resumed job sends Ray only the pieces not done. Runs on
a local Ray instance (`ray.init(num_cpus=2)`) with a tiny model trained for a few steps on
builtin animals."""
import shutil
import time

import numpy as np
import pytest
from sqlalchemy import select

from app.cli import main as diffmine
from app.db import session_scope
from app.jobs import enqueue
from app.models import ImageScore, Job, MiningRun, Patch
from app.settings import Settings
from tests.small_data import animal_folder
from worker.runner import Worker

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

SCORE = ["score", "1", "--preset", "fast", "--draws", "4", "--shard-size", "8", "--all-labels"]
MINE = ["mine", "1", "--per-label", "20", "--clusters", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data directory with 3 labels x 8 animals (fewer if ingest drops a duplicate) and a
    tiny model trained for 10 steps."""
    root = tmp_path_factory.mktemp("ray")
    source = animal_folder(root / "animals", per_label=8)
    home = root / "trained"
    for argv in (["ingest", str(source), "--name", "a", "--min-per-label", "5"],
                 ["train", "a", "--size", "tiny", "--steps", "10", "--batch-size", "8"]):
        assert diffmine([*argv, "--home", str(home), "--json"]) == 0
    return home


@pytest.fixture(scope="module")
def local_ray():
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False)
    print(f"ray.init(num_cpus=2): {time.perf_counter() - started:.1f} s")
    yield
    ray.shutdown()


def scores(home, run_id=1):
    """(image, label) -> (typicality, std error, loss, map or None), read as the web reads them."""
    settings = Settings(home=home)
    with session_scope(settings) as session:
        rows = session.execute(select(ImageScore).where(ImageScore.run_id == run_id)
                               .order_by(ImageScore.image_id, ImageScore.label_id)).scalars().all()
        out = {}
        for r in rows:
            heat = None
            if r.map_path:
                file, key = r.map_path.rsplit(":", 1)
                with np.load(settings.home_dir / file) as data:
                    heat = data[key].astype(np.float32)
            out[(r.image_id, r.label_id)] = (r.typicality, r.std_error, r.loss, heat)
    return out


def assert_same_scores(expected, actual):
    assert actual.keys() == expected.keys()
    for key, (typicality, stderr, loss, heat) in expected.items():
        got = actual[key]
        # The same seeds give the same draws; only batched-kernel rounding may differ.
        np.testing.assert_allclose(got[:2], (typicality, stderr), rtol=1e-5, atol=1e-7)
        assert (got[2] is None) == (loss is None)
        if loss is not None:
            np.testing.assert_allclose(got[2], loss, rtol=1e-5, atol=1e-7)
        assert (got[3] is None) == (heat is None)
        if heat is not None:
            np.testing.assert_allclose(got[3], heat, rtol=1e-3, atol=1e-3)  # stored as float16


def test_ray_scoring_matches_local_and_resumes(trained, local_ray, tmp_path, monkeypatch):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(trained, local)
    shutil.copytree(trained, on_ray)

    started = time.perf_counter()
    assert diffmine([*SCORE, "--home", str(local), "--json"]) == 0
    local_seconds = time.perf_counter() - started
    monkeypatch.setenv("DIFFMINE_RAY_ADDRESS", "local")  # Ray is already up: it is used as it is
    started = time.perf_counter()
    assert diffmine([*SCORE, "--home", str(on_ray), "--json"]) == 0
    ray_seconds = time.perf_counter() - started

    expected = scores(local)
    images = len({image_id for image_id, _ in expected})
    print(f"{images} images in 3 shards: local {local_seconds:.1f} s, Ray {ray_seconds:.1f} s")
    assert images > 16 and len(expected) == images * 3  # --all-labels: under each of 3 labels
    assert_same_scores(expected, scores(on_ray))
    files = sorted(p.name for p in (on_ray / "runs/1/maps").glob("*.npz"))
    assert files == sorted(p.name for p in (local / "runs/1/maps").glob("*.npz"))
    # Each shard: its own labels' maps, and (--all-labels) the other labels' in shard-N.all.npz.
    shards = sorted(p for p in (on_ray / "runs/1/maps").glob("shard-*.npz") if not p.name.endswith(".all.npz"))
    assert len(shards) == 3 and len(files) == 6

    # A worker killed after writing the last shard's rows but before its map file: a resumed Ray
    # scoring sends that shard alone, replaces its rows, and leaves the finished shards untouched.
    shards[-1].unlink()
    finished = {p: p.stat().st_mtime_ns for p in shards[:-1]}
    log = rerun(on_ray, "score", [])
    assert "ray: 1 score tasks on 2 cpu actor(s)" in log
    with session_scope(Settings(home=on_ray)) as session:
        job = session.scalars(select(Job).order_by(Job.id.desc())).first()
        assert job.progress_done == job.progress_total == images
        assert session.get(MiningRun, 1).stages_done == ["score"]
    assert shards[-1].exists()
    assert {p: p.stat().st_mtime_ns for p in shards[:-1]} == finished
    assert_same_scores(expected, scores(on_ray))  # no row lost or duplicated


def rerun(home, kind, stages_done):
    """Run the job `kind` of run 1 again in a worker on Ray, as after a kill; returns its log."""
    settings = Settings(home=home, ray_address="local")
    with session_scope(settings) as session:
        session.get(MiningRun, 1).stages_done = stages_done
        job_id = enqueue(session, kind=kind, params={"run_id": 1}).id
    assert Worker(settings).run_one()
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded", job.error
        return job.log


def mined(home):
    """Patch rows (with their feature rows) and the features array of run 1."""
    with session_scope(Settings(home=home)) as session:
        patches = session.execute(select(Patch.image_id, Patch.label_id, Patch.x0, Patch.y0,
                                         Patch.x1, Patch.y1, Patch.score, Patch.feature_row)
                                  .where(Patch.run_id == 1).order_by(Patch.id)).all()
    return patches, np.load(home / "runs/1/features.npy")


def test_ray_features_match_local_and_resume(trained, local_ray, tmp_path, monkeypatch):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    for home in (local, on_ray):
        shutil.copytree(trained, home)
        assert diffmine([*SCORE, "--home", str(home), "--json"]) == 0
    assert diffmine([*MINE, "--home", str(local), "--json"]) == 0
    monkeypatch.setenv("DIFFMINE_RAY_ADDRESS", "local")
    assert diffmine([*MINE, "--home", str(on_ray), "--json"]) == 0

    patches, features = mined(local)
    parts = sorted((on_ray / "runs/1/features").glob("part-*.npz"))
    assert len(parts) >= 2 and len(patches) == len(features) > 0
    assert mined(on_ray)[0] == patches  # the same patches, in the same feature rows
    np.testing.assert_allclose(mined(on_ray)[1], features, rtol=1e-5, atol=1e-6)

    # Killed in the features stage: only the missing part goes to Ray, the others are kept.
    parts[0].unlink()
    kept = {p: p.stat().st_mtime_ns for p in parts[1:]}
    log = rerun(on_ray, "mine", ["patches", "score"])
    assert "ray: 1 features tasks on 2 cpu actor(s)" in log
    assert parts[0].exists() and {p: p.stat().st_mtime_ns for p in parts[1:]} == kept
    assert mined(on_ray)[0] == patches
    np.testing.assert_allclose(mined(on_ray)[1], features, rtol=1e-5, atol=1e-6)
