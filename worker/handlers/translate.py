"""Translate one image region into every label of its model (docs/method.md section 5).

Job params: {"translation_id": T}. The Translation row (app/services/translations.py creates it)
names the model, the image, the box (original pixels, or None for the whole image) and the
options (`params`, {} for the defaults; see app.params.TranslationOptions). The handler

1. takes the model's view of the image exactly as scoring does (resize the shorter side to the
   model resolution, center crop) - of the whole image, or of a square context window around
   the box when params["context"] (window side = context x the box's longer side);
2. inverts it under its own label(s) and regenerates it under every label, in one batch
   (`engine.translation.translate`);
3. scores each translated image under its target label with a few typicality draws and takes the
   mean of the map over the box; the source is scored under every label the same way;
4. writes PNGs to `<result_dir>/`: `<label_id>.png` (the box cropped from the translation into
   that label), `<label_id>.full.png` (the whole translated view), `source.png` /
   `source.full.png` (the same from the source), and fills the row: status "ready",
   result_dir (relative to the data directory), results = one entry per label::

     {"label", "label_id", "crop", "image", "typicality", "source_typicality", "is_source"}

   plus, on the source label's entry, "reconstruction_error" (RMSE, pixels in [0, 1], of the
   source label's own regeneration against the source) and "psnr". The error also goes to
   params["reconstruction_error"].

result_dir is runs/<run>/translations/<id> for a mined patch, models/<model>/translations/<id>
otherwise. A job run again on a ready row does nothing (a cached click).
"""
from __future__ import annotations

import math
from pathlib import Path

from sqlalchemy import select

from app.db import session_scope
from app.models import Image, ImageLabel, Patch, TrainedModel, Translation
from app.params import TrainConfig, TranslationOptions
from app.services.runs import labels_of, load_run
from worker.context import JobContext, JobPreempted
from worker.models import load_trained


def run_translate(context: JobContext) -> dict:
    settings, translation_id = context.settings, context.job.translation_id
    with session_scope(settings) as session:
        row = session.get(Translation, translation_id)
        if row is None:
            raise ValueError(f"no translation {translation_id}")
        if row.status == "ready" and row.results:
            return {"translation": row.id, "labels": [r["label"] for r in row.results], "cached": True}
        row.status = "running"
    try:
        return translate_row(context, translation_id)
    except BaseException as error:
        with session_scope(settings) as session:
            session.get(Translation, translation_id).status = \
                "queued" if isinstance(error, JobPreempted) else "failed"
        raise


def translate_row(context: JobContext, translation_id: int) -> dict:
    import torch

    from worker.engine.data import multi_hot
    from worker.engine.registry import SIDE_MULTIPLES
    from worker.engine.translation import translate

    settings = context.settings
    with session_scope(settings) as session:
        row = session.get(Translation, translation_id)
        model = session.get(TrainedModel, row.model_id)
        image = session.get(Image, row.image_id)
        labels = [(label.id, label.name) for label in labels_of(session, model.label_set_id)]
        own = set(session.scalars(select(ImageLabel.label_id).where(ImageLabel.image_id == image.id)))
        run_id = session.scalar(select(Patch.run_id).where(Patch.id == row.patch_id)) if row.patch_id else None
        box, params = (list(row.box) if row.box else None), dict(row.params or {})
        model_id, weights, backend = model.id, settings.home_dir / model.weights_dir, model.backend
        configured = (model.config or {}).get("resolution")
        recipe = TrainConfig.model_validate(model.config) if model.config else None
        scored_at = scoring_size(session, settings, run_id, recipe)
        image_path, image_size = settings.home_dir / image.stored_path, (image.width, image.height)
    options = TranslationOptions.model_validate(params).resolved(backend)
    denoiser = load_trained(context, model_id, weights)
    resolution = int(configured or model_resolution(denoiser))
    view, model_box = model_view(image_path, image_size, box, resolution, options["context"], scored_at=scored_at,
                                 multiple=SIDE_MULTIPLES[backend])

    label_ids = [label_id for label_id, _ in labels]
    own_indices = [i for i, label_id in enumerate(label_ids) if label_id in own]
    source_condition = multi_hot([own_indices], len(labels))[0]
    targets = torch.eye(len(labels))

    def progress(done, total):
        context.progress(done, total + 1, "DDIM inversion and sampling", stage="translate")

    result = translate(denoiser, view, source_condition, targets, invert_steps=options["invert_steps"],
                       sample_steps=options["sample_steps"], guidance=options["guidance"],
                       sdedit_strength=options["sdedit_strength"], seed=options["seed"], pnp=options["pnp"],
                       invert_guidance=options["invert_guidance"], progress=progress)
    context.check()
    translated_scores, source_scores = box_typicality(denoiser, result.images, view, model_box,
                                                      draws=options["draws"], seed=options["seed"])

    relative = (f"runs/{run_id}" if run_id else f"models/{model_id}") + f"/translations/{translation_id}"
    folder = settings.home_dir / relative
    folder.mkdir(parents=True, exist_ok=True)
    crop = crop_box(model_box, resolution)
    save_png(view, folder / "source.full.png")
    save_png(view[:, crop[1]:crop[3], crop[0]:crop[2]], folder / "source.png")
    results = []
    for m, (label_id, name) in enumerate(labels):
        save_png(result.images[m], folder / f"{label_id}.full.png")
        save_png(result.images[m][:, crop[1]:crop[3], crop[0]:crop[2]], folder / f"{label_id}.png")
        entry = {"label": name, "label_id": label_id, "crop": f"{relative}/{label_id}.png",
                 "image": f"{relative}/{label_id}.full.png", "typicality": translated_scores[m],
                 "source_typicality": source_scores[m], "is_source": label_id in own,
                 # where the patch lies in the translated window (R x R model pixels)
                 "window": resolution, "window_box": [round(v, 2) for v in model_box]}
        if label_id in own:
            entry.update(reconstruction_error=result.reconstruction_error, psnr=result.psnr)
        results.append(entry)
    with session_scope(settings) as session:
        row = session.get(Translation, translation_id)
        row.status, row.result_dir, row.results = "ready", relative, results
        row.params = {**(row.params or {}), "reconstruction_error": result.reconstruction_error}
    context.progress(1, 1, "done", stage="translate", force=True)
    return {"translation": translation_id, "labels": [name for _, name in labels],
            "reconstruction_error": result.reconstruction_error, "result_dir": relative,
            "box": list(model_box)}


# --- helpers shared with the parallel-dataset job ------------------------------------------------
def model_resolution(denoiser) -> int:
    from worker.handlers.evaluate import denoiser_resolution

    return int(denoiser_resolution(denoiser))


def scoring_size(session, settings, run_id: int | None, recipe: TrainConfig | None) -> int | None:
    """The shorter side the patch's run scored its images at (`score --image-size` may differ
    from the model's), else the model's; None for the old centre-crop view."""
    if run_id is not None:
        record = load_run(session, settings, run_id)
        return record.view_size if record.whole_view else None
    return recipe.scoring_size if recipe is not None and recipe.view == "whole" else None


def context_window(box, image_size, context: float) -> tuple[int, int, int, int]:
    """A square window of side context x the box's longer side, centred on the box, moved (not
    shrunk) to stay inside the image, and at most the image's shorter side."""
    width, height = image_size
    x0, y0, x1, y1 = box[:4]
    side = min(max(1, round(context * max(x1 - x0, y1 - y0))), width, height)
    left = min(max(0, round((x0 + x1) / 2 - side / 2)), width - side)
    top = min(max(0, round((y0 + y1) / 2 - side / 2)), height - side)
    return left, top, left + side, top + side


def model_view(path, image_size, box, resolution: int, context: float | None = None,
               scored_at: int | None = None, multiple: int = 1):
    """The image as the model sees it ([3, R, R] in [-1, 1]) and the box in its pixels.

    With `context`: a square window around the box, resized to R. Else, for a model that scores
    whole images at `scored_at` (N, sides rounded to `multiple` as scoring rounds them): the
    R x R window of the image at N centred on the box, so the patch keeps the detail it was found
    at (the whole image when that is R x R). Else the image resized and center-cropped as for
    scoring (the box must overlap the crop).
    """
    from worker.engine.data import load_rgb, resize_shorter_side, to_tensor
    from worker.engine.patches import box_to_model

    picture = load_rgb(path)
    if picture.size != tuple(image_size):
        image_size = picture.size
    if box is not None and context is None and scored_at is not None:
        return window_at_scoring_size(picture, image_size, box, resolution, scored_at, multiple)
    if box is not None and context is not None:
        window = context_window(box, image_size, float(context))
        picture = picture.crop(window)
        box = [box[0] - window[0], box[1] - window[1], box[2] - window[0], box[3] - window[1]]
        image_size = picture.size
    resized = resize_shorter_side(picture, resolution)
    left, top = (resized.width - resolution) // 2, (resized.height - resolution) // 2
    view = to_tensor(resized.crop((left, top, left + resolution, top + resolution)))
    if box is None:
        return view, (0.0, 0.0, float(resolution), float(resolution))
    x0, y0, x1, y1 = box_to_model(box[:4], resolution, image_size)[:4]
    clipped = (max(0.0, x0), max(0.0, y0), min(float(resolution), x1), min(float(resolution), y1))
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        raise ValueError(f"box {list(box[:4])} lies outside the model's center crop of the image; "
                         f"translate it with a context window (params context, e.g. 2)")
    return view, clipped


def window_at_scoring_size(picture, image_size, box, resolution: int, size: int, multiple: int = 1):
    """[3, R, R] window of the picture as scoring saw it (shorter side `size`, sides rounded to
    `multiple`), centred on the box as far as the image allows, and the box in the window's
    pixels."""
    from worker.engine.data import View
    from worker.engine.patches import box_to_model

    resized = View(size, multiple=multiple).load_pil(picture)
    x0, y0, x1, y1 = box_to_model(box[:4], size, image_size, whole=True, multiple=multiple)[:4]
    height, width = resized.shape[-2:]
    left = min(max(0, round((x0 + x1 - resolution) / 2)), width - resolution)
    top = min(max(0, round((y0 + y1 - resolution) / 2)), height - resolution)
    window = resized[:, top:top + resolution, left:left + resolution]
    clipped = (max(0.0, x0 - left), max(0.0, y0 - top), min(float(resolution), x1 - left),
               min(float(resolution), y1 - top))
    return window, clipped


def crop_box(box, resolution: int) -> tuple[int, int, int, int]:
    """Integer pixel box (outward rounding, at least one pixel) inside [0, R)."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(resolution, max(x0 + 1, math.ceil(box[2]))), min(resolution, max(y0 + 1, math.ceil(box[3])))
    return x0, y0, x1, y1


def box_typicality(denoiser, translated, source, box, *, draws: int, seed: int) -> tuple[list, list]:
    """Mean typicality over the box: of translation m under label m, and of the source under each
    label m (the same draws), so a row shows how much translating raised it."""
    import torch

    from worker.engine.presets import FAST
    from worker.engine.typicality import label_scores, typicality

    preset = FAST.with_(name=f"translation-{draws}", draws=draws)
    labels = len(translated)
    own = typicality(denoiser, translated, torch.eye(labels), preset, seed=seed).maps  # [M, h, w]
    before = label_scores(denoiser, source[None], preset, seed=seed, maps=True).maps[0]  # [M, h, w]
    return box_mean(own, box, translated.shape[-1]), box_mean(before, box, translated.shape[-1])


def box_mean(maps, box, resolution: int) -> list[float]:
    """Mean of each [h, w] map over a box in image pixels (maps upsampled to the image first)."""
    import torch.nn.functional as F

    maps = maps.float()
    if maps.shape[-1] != resolution:
        maps = F.interpolate(maps[:, None], size=(resolution, resolution), mode="bilinear",
                             align_corners=False)[:, 0]
    x0, y0, x1, y1 = crop_box(box, resolution)
    return maps[:, y0:y1, x0:x1].mean(dim=(1, 2)).tolist()


def save_png(image, path: Path) -> None:
    """[3, H, W] in [-1, 1] -> PNG (written beside and renamed, so a file is whole or absent)."""
    import os

    from PIL import Image as PILImage

    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    temporary = path.with_name(path.name + ".tmp")
    PILImage.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, path)
