"""One image as the web shows it: its labels, its scores under every label of a run (the
diffusion-classifier view), its mined patches, and typicality heatmaps rendered once per
(image, label) from the run's map files into PNGs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Dataset, Image, ImageLabel, ImageScore, Label, LabelSet, MiningRun, Patch, TrainedModel
from app.params import TrainConfig
from app.settings import Settings


def image_info(session: Session, *, image_id: int) -> dict | None:
    image = session.get(Image, image_id)
    if image is None:
        return None
    labels = [{"id": i, "name": n, "label_set": s} for i, n, s in session.execute(
        select(Label.id, Label.name, LabelSet.name).join(ImageLabel, ImageLabel.label_id == Label.id)
        .join(LabelSet, LabelSet.id == Label.label_set_id)
        .where(ImageLabel.image_id == image_id).order_by(LabelSet.id, Label.position))]
    return {"id": image.id, "dataset": image.dataset_id, "path": image.original_path,
            "width": image.width, "height": image.height, "split": image.split,
            "url": image_url(image.id, image.stored_path), "thumb": image.thumb_path,
            "labels": labels, "annotations": (image.extra or {}).get("boxes")}


def image_url(image_id: int, stored_path: str) -> str:
    # In-place datasets store absolute paths outside the data directory: a route serves those.
    if os.path.isabs(stored_path):
        return f"/images/{image_id}/original"
    return "/files/" + stored_path


def stored_file(settings: Settings, session: Session, *, image_id: int) -> Path | None:
    """The image's file, resolved, if it is still where its dataset keeps files: under the
    dataset's root folder (in-place datasets: the root as resolved at ingest) or under the data
    directory. A symlink planted after the ingest that leads elsewhere gives None: the web
    never serves a file outside those folders."""
    image = session.get(Image, image_id)
    if image is None:
        return None
    path = Path(image.stored_path)
    if path.is_absolute():
        dataset = session.get(Dataset, image.dataset_id)
        if dataset is None or not dataset.root:
            return None
        root = Path(dataset.root)  # not resolved again: a root swapped for a symlink fails too
    else:
        root = settings.home_dir
        path = root / path
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    return resolved if resolved.is_relative_to(root) else None


def runs_for_dataset(session: Session, *, dataset_id: int) -> list[dict]:
    """Runs of the dataset's models, newest first; ready ones are the useful default."""
    return [{"id": r.id, "status": r.status, "preset": r.preset, "model": r.model_id,
             "label_set_id": r.label_set_id}
            for r in session.execute(
                select(MiningRun.id, MiningRun.status, MiningRun.preset, MiningRun.model_id,
                       TrainedModel.label_set_id)
                .join(TrainedModel, TrainedModel.id == MiningRun.model_id)
                .where(TrainedModel.dataset_id == dataset_id)
                .order_by(MiningRun.id.desc()).limit(100))]


def image_scores(session: Session, *, run_id: int, image_id: int) -> dict:
    """Typicality and denoising loss of the image under each label of the run; the diffusion
    classifier's answer is the label with the lowest loss."""
    rows = session.execute(
        select(ImageScore.label_id, Label.name, ImageScore.typicality, ImageScore.std_error,
               ImageScore.loss, ImageScore.map_path, ImageScore.draws)
        .join(Label, Label.id == ImageScore.label_id)
        .where(ImageScore.run_id == run_id, ImageScore.image_id == image_id)
        .order_by(Label.position)).all()
    scores = [{"label_id": r.label_id, "label": r.name, "typicality": r.typicality,
               "std_error": r.std_error, "loss": r.loss, "draws": r.draws,
               "has_map": r.map_path is not None}
              for r in rows]
    with_loss = [s for s in scores if s["loss"] is not None]
    predicted = min(with_loss, key=lambda s: s["loss"])["label_id"] if with_loss else None
    return {"scores": scores, "predicted": predicted}


def image_patches(session: Session, *, run_id: int, image_id: int) -> list[dict]:
    return [{"id": r.id, "label_id": r.label_id, "label": r.name, "score": r.score,
             "box": [r.x0, r.y0, r.x1, r.y1], "crop": r.crop_path}
            for r in session.execute(
                select(Patch.id, Patch.label_id, Label.name, Patch.score, Patch.x0, Patch.y0,
                       Patch.x1, Patch.y1, Patch.crop_path)
                .join(Label, Label.id == Patch.label_id)
                .where(Patch.image_id == image_id, Patch.run_id == run_id)
                .order_by(Patch.score.desc()).limit(500))]


# --- heatmaps ----------------------------------------------------------------------------------
#: A perceptual dark-to-bright colormap (inferno-like), interpolated between these stops.
_STOPS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                   [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB."""
    x = np.clip(values, 0, 1) * (len(_STOPS) - 1)
    low = np.floor(x).astype(int).clip(0, len(_STOPS) - 2)
    t = (x - low)[..., None]
    return (_STOPS[low] * (1 - t) + _STOPS[low + 1] * t).round().astype(np.uint8)


def map_region(config: dict, run_params: dict, width: int, height: int) -> list[float]:
    """Where a run's map of a (width x height) image lies on it, in percent [left, top, w, h].

    A whole view covers the image. The old centre-crop view (models migrated from before image
    sizes) resized the shorter side to the model size and cropped the central square (as
    worker.engine.patches._crop_geometry): the map covers that square."""
    recipe = TrainConfig.model_validate(config) if config else None
    if recipe is None or recipe.view == "whole":
        return [0, 0, 100, 100]
    model_size = run_params.get("image_size") or recipe.scoring_size
    scale = model_size / min(width, height)
    resized_w, resized_h = max(model_size, round(width * scale)), max(model_size, round(height * scale))
    left, top = (resized_w - model_size) // 2, (resized_h - model_size) // 2
    sx, sy = resized_w / width, resized_h / height
    return [100 * left / sx / width, 100 * top / sy / height,
            100 * model_size / sx / width, 100 * model_size / sy / height]


def heatmap_path(settings: Settings, run_id: int, image_id: int, label_id: int) -> Path:
    return settings.runs_dir / str(run_id) / "heatmaps" / f"{image_id}_{label_id}.png"


def heatmap_file(settings: Settings, session: Session, *, run_id: int, image_id: int,
                 label_id: int) -> Path | None:
    """The heatmap PNG, rendered on first request and kept: colour = typicality scaled by the
    image's largest value over the labels it has maps under (every label in an all_labels run,
    so switching labels on the page compares like with like), alpha = the same value
    (transparent where the label does not help), so the page can threshold it."""
    target = heatmap_path(settings, run_id, image_id, label_id)
    if target.is_file():
        return target
    map_path = session.scalar(select(ImageScore.map_path).where(
        ImageScore.run_id == run_id, ImageScore.image_id == image_id,
        ImageScore.label_id == label_id))
    if not map_path:
        return None
    file, _, key = map_path.rpartition(":")
    source = settings.home_dir / file
    if not source.is_file():
        return None
    with np.load(source) as maps:
        if key not in maps.files:
            return None
        value = maps[key].astype(np.float32)
        prefix = f"{image_id}_"
        scale = max(float(np.percentile(maps[k].astype(np.float32), 99.5))
                    for k in maps.files if k.startswith(prefix))
    normalised = np.clip(value / scale, 0, 1) if scale > 0 else np.zeros_like(value)
    rgba = np.dstack([colormap(normalised), (normalised * 255).round().astype(np.uint8)])
    from PIL import Image as PILImage

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(f".{os.getpid()}.tmp")
    PILImage.fromarray(rgba, "RGBA").save(temporary, format="PNG")
    os.replace(temporary, target)
    return target
