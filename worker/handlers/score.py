"""Typicality of every image under its labels, shard by shard.

A shard is done when its map file exists. Rows are written first (replacing any a killed
attempt left) and the map file is renamed into place last, so a resumed job neither loses nor
duplicates rows, and the same seed gives the same numbers however the work was interrupted.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, insert, select

from app.db import session_scope
from app.models import ImageLabel, ImageScore, MiningRun, TrainedModel
from app.services.runs import examples, labels_of
from worker.context import JobContext
from worker.handlers.evaluate import denoiser_resolution
from worker.handlers.models import load_trained

SHARD_IMAGES = 64


def run_score(context: JobContext) -> dict:
    settings, run_id = context.settings, context.params["run_id"]
    with session_scope(settings) as session:
        run = session.get(MiningRun, run_id)
        model = session.get(TrainedModel, run.model_id)
        run.status = "scoring"
        label_ids = [l.id for l in labels_of(session, model.label_set_id)]
        total = session.scalar(select(func.count(func.distinct(ImageLabel.image_id)))
                               .where(ImageLabel.label_id.in_(label_ids)))
        params, label_set_id = dict(run.params), model.label_set_id
        weights = settings.home_dir / model.weights_dir
        model_id = model.id
    denoiser = load_trained(context, model_id, weights)
    maps_dir = settings.runs_dir / str(run_id) / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    done, after_id = 0, 0
    while True:
        with session_scope(settings) as session:
            shard = examples(session, settings, label_set_id=label_set_id, after_id=after_id,
                             limit=params.get("shard_size") or SHARD_IMAGES)
        if not shard:
            break
        shard_file = maps_dir / f"shard-{shard[0].image_id:09d}.npz"
        if not shard_file.exists():
            score_shard(context, denoiser, shard, label_ids, shard_file, run_id=run_id,
                        params=params)
        done, after_id = done + len(shard), shard[-1].image_id
        context.progress(done, total, f"{done}/{total} images", stage="score")
        context.check()
    with session_scope(settings) as session:
        run = session.get(MiningRun, run_id)
        run.status, run.stages_done = "scored", sorted(set(run.stages_done or []) | {"score"})
    return {"run": run_id, "images": done}


def preset_for(params: dict):
    from worker.engine.presets import get_preset

    preset = get_preset(params["preset"])
    if params.get("draws"):
        preset = preset.with_(draws=params["draws"])
    return preset


def score_shard(context, denoiser, shard, label_ids, shard_file: Path, *, run_id: int,
                params: dict) -> None:
    import torch

    from worker.engine.data import ImageDataset, multi_hot
    from worker.engine.typicality import label_scores, typicality

    preset, seed = preset_for(params), params["seed"]
    dataset = ImageDataset([e.path for e in shard], multi_hot([[0]] * len(shard), len(label_ids)),
                           resolution=denoiser_resolution(denoiser), train=False)
    images = torch.stack([dataset[i][0] for i in range(len(shard))])
    # One row per (image, own label): a multi-label image is scored under each of its labels.
    rows = [(i, label) for i, e in enumerate(shard) for label in e.label_indices]
    own = typicality(denoiser, images[[i for i, _ in rows]],
                     multi_hot([label for _, label in rows], len(label_ids)), preset, seed=seed)
    maps = {f"{shard[i].image_id}_{label_ids[label]}": own.maps[r].cpu().numpy().astype(np.float16)
            for r, (i, label) in enumerate(rows)}
    relative = shard_file.relative_to(context.settings.home_dir).as_posix()
    records = {(shard[i].image_id, label_ids[label]): dict(
        run_id=run_id, image_id=shard[i].image_id, label_id=label_ids[label],
        typicality=float(own.scores[r]), std_error=float(own.stderr[r]), loss=None,
        map_path=f"{relative}:{shard[i].image_id}_{label_ids[label]}")
        for r, (i, label) in enumerate(rows)}
    if params.get("all_labels"):
        everything = label_scores(denoiser, images, preset, seed=seed)
        for i, example in enumerate(shard):
            for m, label_id in enumerate(label_ids):
                record = records.setdefault((example.image_id, label_id), dict(
                    run_id=run_id, image_id=example.image_id, label_id=label_id,
                    typicality=float(everything.typicality[i, m]),
                    std_error=float(everything.stderr[i, m]), map_path=None))
                record["loss"] = float(everything.label_losses[i, m])
    with session_scope(context.settings) as session:
        session.execute(delete(ImageScore).where(ImageScore.run_id == run_id,
                                                 ImageScore.image_id.in_([e.image_id for e in shard])))
        session.execute(insert(ImageScore), list(records.values()))
    temporary = shard_file.with_suffix(".tmp.npz")
    np.savez(temporary, **maps)
    os.replace(temporary, shard_file)
