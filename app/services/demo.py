"""The demo: the builtin Twemoji dataset rendered at 64 px, mined by category, by year and (its
flags) by world region with the shipped weights (demo/weights, trained by
bench/train_demo_model.py on 32 px crops of the emoji at 64 px; recipe in docs/demo.md)."""
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
#: The side the emoji are rendered at and scored at (N): 32 px crops (R) at 64 px show each
#: emoji's parts at twice the old 32 px squeeze's detail; the table in docs/demo.md has the cost
#: of each size.
IMAGE_SIZE = 64
#: Chosen so the whole demo, install included, stays under 10 minutes on 2 CPU cores
#: (measured in docs/demo.md): at 64 px an emoji costs 9 tiles, so each label is mined from a
#: seeded sample of its images (enough for its 100 patches, 5 per image). Year trends: the first
#: 2 members of each cluster under all 11 years.
MINING = RunParams(preset="fast", draws=4, images_per_label=40,
                   mine=MineOptions(per_label=100, clusters=8, trend_members=2, trend_draws=2))
#: The recipe of the shipped weights, for `diffmine demo --retrain` (docs/demo.md): trained from
#: scratch on a CPU, so with 10x the paper's learning rate.
RECIPE = dict(size="small", resolution=32, image_size=IMAGE_SIZE, steps=2000, batch_size=64, lr=1e-3, seed=0)


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
                                 backend="pixel", config=dict(RECIPE, image_size=image_size or IMAGE_SIZE))
        else:
            model = shipped_model(session, settings, label_set)
        run = new_run(session, model_id=model.id,
                      params=MINING.model_copy(update={"seed": RECIPE["seed"], "image_size": image_size}))
        job: Job = enqueue(session, kind="pipeline", params={"model_id": model.id, "run_id": run.id},
                           max_attempts=5)
        jobs.append(job.id)
    return jobs
