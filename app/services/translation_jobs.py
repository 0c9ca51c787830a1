"""Translation requests beyond a clicked patch (the CLI's image + box form) and the
consistent-change job. The per-patch request and the cache contract live in
app/services/translations.py; this module follows the same contract. Nothing here imports torch."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import enqueue
from app.models import Image, ImageLabel, Job, MiningRun, TrainedModel, Translation
from app.params import ParallelJob, ParallelMine, TranslationOptions
from app.services.runs import NotFound, labels_of
from app.services.translations import cached_or_queued


def request_region_translation(session: Session, *, model_id: int, image_id: int, box: list | None,
                               options: TranslationOptions | None = None) -> tuple[Translation, int | None]:
    """Like `request_translation`, for any image of the model's dataset and any box (original
    pixels; None for the whole image)."""
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
    return cached_or_queued(session, model=model, image_id=image_id, patch_id=None, box=box,
                            options=options)


def launch_parallel(session: Session, *, run_id: int, images: int,
                    options: TranslationOptions | None = None, mine: ParallelMine | None = None) -> Job:
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
    return enqueue(session, kind="parallel", params=ParallelJob(
        run_id=run_id, images=images, translation=options or TranslationOptions(),
        mine=mine or ParallelMine()))
