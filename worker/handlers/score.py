"""Typicality of every image under its labels, shard by shard.

A shard is done when its map file exists. Rows are written first (replacing any a killed
attempt left), then an all_labels run's maps under the labels an image does not have (in
`shard-N.all.npz`, which mining never reads), and the map file is renamed into place last, so
a resumed job neither loses nor duplicates rows, and the same seed gives the same numbers
however the work was interrupted.

A shard is computed by `compute_shard` (denoiser in, numbers out: no database, no files) and
written by `write_shard`, through `worker.pieces.run_pieces`: computed here, or, with
`DIFFMINE_RAY_ADDRESS` set, on Ray actors (worker/ray_backend.py), and written here either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, insert, select

from app.db import session_scope
from app.models import ImageLabel, ImageScore, MiningRun
from app.params import RunParams
from app.services.runs import Example, examples, load_run, sampled_ids
from app.settings import Settings
from worker.context import JobContext
from worker.executors import executor
from worker.handlers.evaluate import denoiser_resolution
from worker.pieces import run_pieces


@dataclass
class ShardScores:
    """One shard's results before they are written."""

    #: "imageid_labelid" -> typicality map (float16), one per (image, own label)
    maps: dict[str, np.ndarray]
    #: ImageScore values without run_id and map_path; `map_key` names the row's map, if any
    records: list[dict]
    #: all_labels: the maps under the labels each image does not have, same keys
    other_maps: dict[str, np.ndarray] = field(default_factory=dict)


def run_score(context: JobContext) -> dict:
    settings, run_id = context.settings, context.job.run_id
    with session_scope(settings) as session:
        record = load_run(session, settings, run_id)
        session.get(MiningRun, run_id).status = "scoring"
        counted = (select(func.count(func.distinct(ImageLabel.image_id)))
                   .where(ImageLabel.label_id.in_(record.label_ids)))
        if record.params.images_per_label is not None:
            counted = counted.where(ImageLabel.image_id.in_(
                sampled_ids(record.label_ids, record.params.images_per_label, record.params.seed)))
        total = session.scalar(counted)
    maps_dir = settings.runs_dir / str(run_id) / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    from worker.engine.data import View

    view = View(record.view_size, whole=record.whole_view)
    execute = executor(context, model_id=record.model_id, weights=record.weights, compute=compute_shard,
                       options=dict(label_ids=record.label_ids, params=record.params, view=view), name="score")

    def write(path, shard, scores):
        write_shard(settings, shard, path, run_id=run_id, scores=scores)

    done = run_pieces(context, shards(settings, record.label_set_id, record.params, maps_dir),
                      execute, write,
                      stage="score", message="{done}/{total} images", size=len, total=total)
    with session_scope(settings) as session:
        run = session.get(MiningRun, run_id)
        run.status, run.stages_done = "scored", sorted(set(run.stages_done or []) | {"score"})
    return {"run": run_id, "images": done}


#: Denoiser inputs per forward call for pixel models on a GPU. At the presets' 128 a 32 px pass
#: costs far more Python (diffusers' module calls) than GPU time: the score job ran at 47 images/s
#: on an H200, where the engine at 512 rows ran at 123 (docs/benchmarks.md, "GPU check").
GPU_PIXEL_FORWARD_BATCH = 512

#: Pixel models on a CPU: channels_last at 64 rows per call scored 1.23-1.29x faster than
#: contiguous at the presets' 128 on this project's CPUs (bench/bench_cpu_layout.py).
CPU_PIXEL_LAYOUT = {"forward_batch": 64, "channels_last": True}


def preset_for(params: RunParams, denoiser):
    """The run's typicality preset with its draws, precision and the denoiser's device applied.
    None of these change the draws, so the numbers stay those of the preset (up to rounding)."""
    from worker.engine.presets import get_preset

    device = next(denoiser.parameters()).device.type
    preset = get_preset(params.preset)
    if params.draws:
        preset = preset.with_(draws=params.draws)
    precision = params.precision
    if precision != "fp32":
        if device == "cpu":
            raise ValueError(f"{precision} scoring needs a GPU (it runs 2-4x slower than fp32 on a CPU); "
                             "this worker's device is cpu: score with --precision fp32")
        preset = preset.with_(autocast=precision)
    if device == "cuda" and denoiser.backend == "pixel":
        preset = preset.with_(forward_batch=max(preset.forward_batch, GPU_PIXEL_FORWARD_BATCH))
    if device == "cpu" and denoiser.backend == "pixel":
        preset = preset.with_(**CPU_PIXEL_LAYOUT)
    return preset


def shards(settings: Settings, label_set_id: int, params: RunParams, maps_dir: Path):
    """(map file, examples) of every shard in image-id order (of the run's sample per label, if
    it has one), read from the database a page at a time."""
    after_id = 0
    while True:
        with session_scope(settings) as session:
            shard = examples(session, settings, label_set_id=label_set_id, after_id=after_id,
                             limit=params.shard_size, per_label=params.images_per_label, seed=params.seed)
        if not shard:
            return
        yield maps_dir / f"shard-{shard[0].image_id:09d}.npz", shard
        after_id = shard[-1].image_id


def compute_shard(denoiser, shard: list[Example], label_ids: list[int], params: RunParams,
                  view=None) -> ShardScores:
    """Typicality of a shard's images under their own labels (and every label with all_labels),
    with a map for every row, each image seen through `view` (default: the centre square at the
    model's resolution); images of one shape are scored in one batch."""
    from worker.engine.data import View, load_view_groups

    view = view or View(denoiser_resolution(denoiser), whole=False)
    preset, seed = preset_for(params, denoiser), params.seed
    scores = ShardScores(maps={}, records=[])
    records: dict = {}
    for indices, images in load_view_groups([e.path for e in shard], view):
        group = [shard[i] for i in indices]
        records.update(own_label_scores(denoiser, group, images, label_ids, preset, seed, scores.maps))
        if params.all_labels:
            every_label_scores(denoiser, group, images, label_ids, preset, seed, scores, records)
    scores.records = list(records.values())
    return scores


def own_label_scores(denoiser, shard, images, label_ids, preset, seed, maps) -> dict:
    """(image, label) -> record under each own label, its map added to `maps`."""
    from worker.engine.data import multi_hot
    from worker.engine.tiles import typicality_as_trained

    # One row per (image, own label): a multi-label image is scored under each of its labels.
    rows = [(i, label) for i, e in enumerate(shard) for label in e.label_indices]
    own = typicality_as_trained(denoiser, images[[i for i, _ in rows]],
                     multi_hot([label for _, label in rows], len(label_ids)), preset, seed=seed)
    records = {}
    for r, (i, label) in enumerate(rows):
        image_id, label_id = shard[i].image_id, label_ids[label]
        maps[map_key(image_id, label_id)] = own.maps[r].cpu().numpy().astype(np.float16)
        records[(image_id, label_id)] = dict(
            image_id=image_id, label_id=label_id, typicality=float(own.scores[r]),
            std_error=float(own.stderr[r]), loss=None, map_key=map_key(image_id, label_id))
    return records


def every_label_scores(denoiser, shard, images, label_ids, preset, seed, scores: ShardScores,
                       records: dict) -> None:
    """Every image under every label (the diffusion-classifier view): a loss on every record,
    and a record and map (in `scores.other_maps`) for each label the image does not have.

    Own labels keep typicality()'s numbers and map, the reference rows. The other maps are kept
    so the image page can show a heatmap under any label; they cost no extra forward passes (the
    loss maps are summed either way) but disk: labels x map size per image, float16, 2.2 KiB per
    label at 32x32 with the npz headers (22 KiB an image for 10 labels: a 64-image shard grows
    from 143 KiB to 1.4 MiB) and 8.2 KiB per label for SD's 64x64 latents (82 KiB an image for
    10 labels, about a 512 px JPEG of the image). Acceptable: only all_labels runs pay it, and
    they already pay (labels + 1) forward passes per draw, which costs far more than the disk.
    """
    from worker.engine.tiles import label_scores_as_trained

    everything = label_scores_as_trained(denoiser, images, preset, seed=seed, maps=True)
    every_map = everything.maps.cpu().numpy().astype(np.float16)  # [B, M, h, w]
    for i, example in enumerate(shard):
        for m, label_id in enumerate(label_ids):
            key = map_key(example.image_id, label_id)
            if key not in scores.maps:
                scores.other_maps[key] = every_map[i, m]
            record = records.setdefault((example.image_id, label_id), dict(
                image_id=example.image_id, label_id=label_id,
                typicality=float(everything.typicality[i, m]),
                std_error=float(everything.stderr[i, m]), map_key=key))
            record["loss"] = float(everything.label_losses[i, m])


def map_key(image_id: int, label_id: int) -> str:
    """The map's name in its shard file (and after the ':' of ImageScore.map_path)."""
    return f"{image_id}_{label_id}"


def write_shard(settings: Settings, shard: list[Example], shard_file: Path, *, run_id: int,
                scores: ShardScores) -> None:
    """The shard's ImageScore rows (replacing any a killed attempt left), the other labels' maps,
    then its own map file, whose existence marks the shard done."""
    others_file = shard_file.with_suffix(".all.npz")  # shard-N.npz -> shard-N.all.npz

    def map_path(key: str | None) -> str | None:
        if key is None:
            return None
        file = others_file if key in scores.other_maps else shard_file
        return f"{file.relative_to(settings.home_dir).as_posix()}:{key}"

    rows = [dict(run_id=run_id, image_id=r["image_id"], label_id=r["label_id"],
                 typicality=r["typicality"], std_error=r["std_error"], loss=r["loss"],
                 map_path=map_path(r["map_key"])) for r in scores.records]
    with session_scope(settings) as session:
        session.execute(delete(ImageScore).where(ImageScore.run_id == run_id,
                                                 ImageScore.image_id.in_([e.image_id for e in shard])))
        session.execute(insert(ImageScore), rows)
    if scores.other_maps:
        save_maps(others_file, scores.other_maps)
    save_maps(shard_file, scores.maps)


def save_maps(path: Path, maps: dict[str, np.ndarray]) -> None:
    """Written aside and renamed, so a kill never leaves a half-written map file."""
    temporary = path.with_name(path.name.removesuffix(".npz") + ".tmp.npz")
    np.savez(temporary, **maps)
    os.replace(temporary, path)
