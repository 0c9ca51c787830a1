"""The demo: the builtin Twemoji dataset mined by category, by year and (its flags) by world
region with the shipped weights (demo/weights, trained by bench/train_demo_model.py; recipes and
the sizes tried in docs/demo.md)."""
from __future__ import annotations

import json
import shutil

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, LabelSet, MiningRun, TrainedModel
from app.params import MineOptions, RunParams
from app.services.runs import create_model, find_dataset, find_label_set, new_run
from app.settings import REPO_ROOT, Settings

DATASET = "twemoji"
LABEL_SETS = ("category", "year", "region")
WEIGHTS = REPO_ROOT / "demo" / "weights"
#: The emoji are rendered at the package PNGs' 72 px: the gallery crops are cut from those pixels,
#: and the shipped models see each emoji whole at their own 32 px. 64 px models on 32 px crops
#: were trained on a CPU this session and classified worse (docs/demo.md, "Choosing the size").
RENDER_SIZE = 72
#: Chosen so the whole demo, install included, stays under 10 minutes on 2 CPU cores
#: (measured in docs/demo.md). Year trends: 3 members per cluster under all 11 years, 4 draws.
MINING = RunParams(preset="fast", draws=4, mine=MineOptions(per_label=100, clusters=8, trend_members=3,
                                                           trend_draws=4))
#: The recipe of the shipped category and year weights, for `diffmine demo --retrain`.
RECIPE = dict(size="small", resolution=32, steps=2000, batch_size=256, seed=0)  # a pixel model


def ready_run(session: Session, label_set_id: int, image_size: int | None = None) -> MiningRun | None:
    """The label set's latest mined run at this image size (None: the model's own)."""
    runs = session.scalars(select(MiningRun).join(TrainedModel)
                           .where(TrainedModel.label_set_id == label_set_id, MiningRun.status == "ready")
                           .order_by(MiningRun.id.desc()))
    return next((run for run in runs if RunParams.model_validate(run.params).image_size == image_size), None)


def shipped_model(session: Session, settings: Settings, label_set: LabelSet) -> TrainedModel:
    """A model row for the shipped weights of one label set, its files copied into the data dir."""
    source = WEIGHTS / f"{DATASET}-{label_set.name}"
    record = json.loads((source / "training.json").read_text())
    model = create_model(session, settings, dataset=label_set.dataset, label_set=label_set,
                         backend="pixel", config={**RECIPE, "steps": record["steps"],
                                                  "batch_size": record["batch_size"],
                                                  "lr": record.get("lr", 1e-4),
                                                  "image_size": record.get("image_size", record["resolution"]),
                                                  "shipped": str(source.relative_to(REPO_ROOT))})
    model.status, model.metrics = "ready", {"final_loss": record["final_loss"],
                                            "steps": record["steps"], "trained_on": record["device"]}
    target = settings.home_dir / model.weights_dir
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return model


def demo_jobs(session: Session, settings: Settings, *, retrain: bool, image_size: int | None = None) -> list[int]:
    """Pipeline jobs for the label sets that have no mined run yet (at `image_size`, if given)."""
    from app.jobs import enqueue

    dataset = find_dataset(session, DATASET)
    jobs = []
    for name in LABEL_SETS:
        label_set = find_label_set(session, dataset, name)
        if ready_run(session, label_set.id, image_size) is not None:
            continue
        if retrain:
            model = create_model(session, settings, dataset=dataset, label_set=label_set,
                                 backend="pixel", config=dict(RECIPE, image_size=image_size))
        else:
            model = shipped_model(session, settings, label_set)
        run = new_run(session, model_id=model.id,
                      params=MINING.model_copy(update={"seed": RECIPE["seed"], "image_size": image_size}))
        job: Job = enqueue(session, kind="pipeline", params={"model_id": model.id, "run_id": run.id},
                           max_attempts=5)
        jobs.append(job.id)
    return jobs
