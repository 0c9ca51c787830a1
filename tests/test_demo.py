"""`diffmine demo` mines its label sets side by side: one worker process per job, the cores split
between them (app/cli/serve.py run_side_by_side). Here on two quick scoring jobs of a mined run."""
import psutil

from app.cli import run_side_by_side
from app.db import session_scope
from app.models import Job
from app.params import RunParams
from app.services.runs import launch_score


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


def test_the_demo_mines_at_the_image_size_asked_for(tmp_path):
    """`diffmine demo --image-size N`: the shipped 32 px models, their runs scored at N; a run
    mined at another size does not count as this demo's."""
    from app.ingest import ingest_dataset
    from app.models import MiningRun, TrainedModel
    from app.services.demo import demo_jobs, ready_run
    from app.settings import Settings

    settings = Settings(home=tmp_path / "home")
    ingest_dataset(settings, source="builtin:twemoji", name="twemoji", limit_per_label=5, min_images_per_label=1)
    with session_scope(settings) as session:
        jobs = demo_jobs(session, settings, retrain=False, image_size=48)
        runs = session.query(MiningRun).all()
        assert len(jobs) == len(runs) == 2
        assert all(RunParams.model_validate(r.params).image_size == 48 for r in runs)
        model = session.get(TrainedModel, runs[0].model_id)
        assert model.config["resolution"] == 32 and model.status == "ready"
        runs[0].status = "ready"
        label_set_id = model.label_set_id
        session.flush()
        assert ready_run(session, label_set_id, 48) is runs[0] and ready_run(session, label_set_id) is None
