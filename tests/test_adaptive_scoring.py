"""The adaptive preset through the real score and mine jobs: rows that can be mined end with the
paper's draws, each row's draws are stored and shown, and a worker killed in a later stage is
resumed by another to exactly the uninterrupted results, no row scored twice."""
from sqlalchemy import select

from app.db import session_scope
from app.ingest import ingest_dataset
from app.models import ImageScore, Job, Patch
from app.params import MineOptions, RunParams
from app.services.demo import shipped_model
from app.services.runs import find_dataset, find_label_set, launch_mine, launch_score
from app.settings import Settings
from tests.cli_helpers import run_diffmine
from tests.helpers import job_row, wait_until
from tests.test_worker_resume import kill_when

#: stages (12, 16): every row at 12 draws, the rows that may be mined at 16; shards of 4 images
PARAMS = RunParams(preset="adaptive", draws=16, shard_size=4, mine=MineOptions(per_label=2, clusters=2))


def queued_run(home) -> Settings:
    """Twemoji, 4 images per category, the demo's shipped category model, an adaptive score job queued."""
    settings = Settings(home=home)
    ingest_dataset(settings, source="builtin:twemoji", name="twemoji", limit_per_label=4, min_images_per_label=1)
    with session_scope(settings) as session:
        dataset = find_dataset(session, "twemoji")
        model = shipped_model(session, settings, find_label_set(session, dataset, "category"))
        session.flush()
        launch_score(session, model_id=model.id, params=PARAMS)
    return settings


def mined(settings: Settings) -> tuple[list, list]:
    with session_scope(settings) as session:
        launch_mine(session, run_id=1, mine=PARAMS.mine)
    assert run_diffmine(settings.home_dir, "worker", "--exit-when-idle", timeout=600).returncode == 0
    with session_scope(settings) as session:
        scores = session.execute(select(ImageScore.image_id, ImageScore.label_id, ImageScore.typicality,
                                        ImageScore.std_error, ImageScore.draws)
                                 .order_by(ImageScore.image_id, ImageScore.label_id)).all()
        patches = session.execute(select(Patch.image_id, Patch.label_id, Patch.x0, Patch.y0, Patch.score)
                                  .order_by(Patch.label_id, Patch.score.desc(), Patch.image_id)).all()
    return scores, patches


def test_adaptive_scoring_resumes_in_a_later_stage_to_the_same_results(tmp_path, start_worker):
    reference = queued_run(tmp_path / "reference")
    assert run_diffmine(reference.home_dir, "worker", "--exit-when-idle", timeout=600).returncode == 0
    with session_scope(reference) as session:
        result = session.get(Job, 1).result
    assert result["stages"] and result["stages"][0]["draws"] == 16
    scores, patches = mined(reference)

    # Draws are stored per row: the first stage's or the last's, and every mined patch comes from
    # a row with the last stage's (the paper-quality) draws.
    draws = {(image, label): n for image, label, _, _, n in scores}
    assert set(draws.values()) <= {12, 16} and patches
    assert all(draws[(image, label)] == 16 for image, label, *_ in patches)
    # A later stage adds the draws a row lacks: 4 more per image (one label each) that went on.
    assert result["passes"] == 2 * (12 * len(scores) + 4 * sum(stage["images"] for stage in result["stages"]))

    resumed = queued_run(tmp_path / "resumed")
    kill_when(resumed.home_dir, start_worker(resumed.home_dir, "--lease", "2", "--poll", "0.1"), 1,
              lambda stage, done: stage == "score, stage 2" and done >= 4)
    last = start_worker(resumed.home_dir, "--lease", "2", "--poll", "0.1")
    job = wait_until(lambda: (row := job_row(resumed.home_dir, 1)).status not in ("queued", "running") and row,
                     timeout=600, interval=0.2, message="the second worker to finish the score job")
    last.terminate()
    last.wait(timeout=30)
    assert job.status == "succeeded" and job.attempts == 2, job.error
    assert mined(resumed) == (scores, patches)
