"""`diffmine demo` mines its label sets side by side: one worker process per job, the cores split
between them (app/cli/serve.py run_side_by_side). Here on two quick scoring jobs of a mined run."""
import psutil
from sqlalchemy import func, select

from app.cli import run_side_by_side
from app.db import session_scope
from app.models import ImageLabel, ImageScore, Job, MiningRun
from app.params import RunParams
from app.services.runs import examples, launch_score


def test_jobs_run_side_by_side_and_the_workers_stop(mined_settings):
    with session_scope(mined_settings) as session:
        jobs = [launch_score(session, model_id=1, params=RunParams(preset="fast", draws=2, seed=seed))[1].id
                for seed in (0, 1)]
    results = list(run_side_by_side(mined_settings, jobs, json_mode=True))
    assert [r["job"] for r in results] == jobs and [r["images"] for r in results] == [120, 120]
    with session_scope(mined_settings) as session:
        ran_by = {session.get(Job, job_id).worker_id for job_id in jobs}
    assert ran_by <= {"side-0", "side-1"}
    assert (mined_settings.home_dir / "logs/worker-side-0.log").exists()
    home = str(mined_settings.home_dir)
    leftover = [p for p in psutil.process_iter(["cmdline"])
                if home in " ".join(p.info["cmdline"] or []) and "worker" in (p.info["cmdline"] or [])]
    assert not leftover  # the workers are gone once the jobs are done


def test_a_run_scores_a_seeded_sample_of_each_label(mined_settings):
    """`images_per_label` (a way to afford large images): the score job scores at most that many
    images of each label, the same ones for the same seed."""
    with session_scope(mined_settings) as session:
        launched = [launch_score(session, model_id=1, params=RunParams(preset="fast", draws=2, seed=seed,
                                                                       images_per_label=3))
                    for seed in (0, 5)]
        run_ids, jobs = [run.id for run, _ in launched], [job.id for _, job in launched]
        sample = {e.image_id for e in examples(session, mined_settings, label_set_id=1, per_label=3, seed=0)}
    results = list(run_side_by_side(mined_settings, jobs, json_mode=True))
    assert [r["images"] for r in results] == [30, 30]  # 10 labels, 12 images each
    with session_scope(mined_settings) as session:
        scored = [set(session.scalars(select(ImageScore.image_id).where(ImageScore.run_id == run_id)))
                  for run_id in run_ids]
        per_label = session.execute(select(ImageLabel.label_id, func.count()).where(
            ImageLabel.image_id.in_(scored[0])).group_by(ImageLabel.label_id)).all()
        assert all(session.get(MiningRun, run_id).status == "scored" for run_id in run_ids)
    assert scored[0] == sample and scored[0] != scored[1]
    assert sorted(count for _, count in per_label) == [3] * 10


def test_the_demo_mines_at_the_image_size_asked_for(tmp_path):
    """`diffmine demo --image-size N`: the shipped models (the emoji whole at 32 px), their runs
    scored at N; a run mined at another size does not count as this demo's."""
    from app.ingest import ingest_dataset
    from app.models import LabelSet, TrainedModel
    from app.services.demo import demo_jobs, ready_run
    from app.settings import Settings

    settings = Settings(home=tmp_path / "home")
    ingest_dataset(settings, source="builtin:twemoji", name="twemoji", limit_per_label=8,
                   min_images_per_label=1)
    with session_scope(settings) as session:
        jobs = demo_jobs(session, settings, retrain=False, image_size=48)
        runs = session.query(MiningRun).all()
        assert len(jobs) == len(runs) == 3  # category, year, region
        assert all(RunParams.model_validate(r.params).image_size == 48 for r in runs)
        models = [session.get(TrainedModel, run.model_id) for run in runs]
        assert [session.get(LabelSet, m.label_set_id).name for m in models] == ["category", "year", "region"]
        assert all(m.config["resolution"] == 32 and m.config["image_size"] == 32 and m.status == "ready"
                   for m in models)
        model = models[0]
        runs[0].status = "ready"
        label_set_id = model.label_set_id
        session.flush()
        assert ready_run(session, label_set_id, 48) is runs[0] and ready_run(session, label_set_id) is None
    # The shipped models load with their labels: the region model's are the world regions.
    from app.ingest.builtin import EMOJI_REGIONS
    from worker.engine.registry import load_denoiser

    assert load_denoiser(settings.home_dir / models[2].weights_dir).labels == EMOJI_REGIONS
