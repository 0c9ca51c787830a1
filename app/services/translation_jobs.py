"""Translation requests beyond a clicked patch (the CLI's image + box form) and the
consistent-change job. The per-patch request and the cache contract live in
app/services/translations.py; this module follows the same contract. Nothing here imports torch."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import ACTIVE, PRIORITY_INTERACTIVE, enqueue
from app.models import Image, ImageLabel, Job, MiningRun, TrainedModel, Translation
from app.services.runs import NotFound, labels_of
from app.services.translations import jobs_for, translation_key


def request_region_translation(session: Session, *, model_id: int, image_id: int, box: list | None,
                               params: dict | None = None,
                               patch_id: int | None = None) -> tuple[Translation, int | None]:
    """Like `request_translation`, for any image of the model's dataset and any box (original
    pixels; None for the whole image): the cached row when there is one, else a new row and an
    interactive "translate" job."""
    model = session.get(TrainedModel, model_id)
    if model is None:
        raise NotFound(f"no model {model_id}")
    image = session.get(Image, image_id)
    if image is None or image.dataset_id != model.dataset_id:
        raise NotFound(f"no image {image_id} in model {model_id}'s dataset")
    if box is not None:
        box = [int(v) for v in box]
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
            raise ValueError(f"box {box} is not inside the {image.width}x{image.height} image")
    params = dict(params or {})
    key = translation_key(box, params)
    row = session.scalar(select(Translation).where(Translation.model_id == model_id,
                                                   Translation.image_id == image_id,
                                                   Translation.settings_key == key)
                         .order_by(Translation.id.desc()).limit(1))
    if row is None:
        row = Translation(model_id=model_id, image_id=image_id, patch_id=patch_id, box=box,
                          params=params, settings_key=key, status="queued")
        session.add(row)
        session.flush()
    elif row.status == "ready":
        return row, None
    else:
        job = jobs_for(session, [row.id]).get(row.id)
        if job is not None and job.status in ACTIVE:
            return row, job.id
        row.status = "queued"
    job = enqueue(session, kind="translate", params={"translation_id": row.id},
                  priority=PRIORITY_INTERACTIVE)
    return row, job.id


def launch_parallel(session: Session, *, run_id: int, images: int, params: dict | None = None,
                    clusters: int | None = None, per_image: int | None = None,
                    patch_size: int | None = None) -> Job:
    """The consistent-change job: a seeded sample of `images` images of the run's dataset,
    each translated into every label (worker/handlers/parallel.py)."""
    run = session.get(MiningRun, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    if images < 1:
        raise ValueError(f"--parallel needs at least one image, got {images}")
    model = session.get(TrainedModel, run.model_id)
    label_ids = [label.id for label in labels_of(session, model.label_set_id)]
    available = session.scalar(select(ImageLabel.image_id).where(ImageLabel.label_id.in_(label_ids)).limit(1))
    if available is None:
        raise ValueError(f"run {run_id}'s label set has no labeled images")
    mine = {k: v for k, v in dict(clusters=clusters, per_image=per_image, patch_size=patch_size).items()
            if v is not None}
    return enqueue(session, kind="parallel", params={"run_id": run_id, "images": images,
                                                     "translation": dict(params or {}), "mine": mine})
