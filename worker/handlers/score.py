"""Typicality of every image under its labels, shard by shard.

A shard is done when its map file exists. Rows are written first (replacing any a killed
attempt left), then an all_labels run's maps under the labels an image does not have (in
`shard-N.all.npz`, which mining never reads), and the map file is renamed into place last, so
a resumed job neither loses nor duplicates rows, and the same seed gives the same numbers
however the work was interrupted.

A shard is computed by `compute_shard` (denoiser in, numbers out: no database, no files) and
written by `write_shard`, through `worker.pieces.run_pieces`: computed here, or, with
`DIFFMINE_RAY_ADDRESS` set, on Ray actors (worker/ray_backend.py), and written here either way.

The adaptive preset (worker/engine/adaptive.py) scores in stages. Stage 0 is the pass above at
the first stage's draws, each shard also leaving its rows' box bounds, map sums and per-draw
differences in `maps/adaptive/shard-N.stage-0.npz`. Each later stage takes the images with a row
still open under the earlier stages' bounds up to its draws, shard by shard, scoring only the
draws their rows lack and adding them to the earlier ones: the shard's map file is rewritten
with their maps, their rows updated, and `shard-N.stage-S.npz` written last, marking that
shard's stage done. Which rows a stage takes is a function of the earlier stages' files alone,
so a resumed job takes the same rows and gives the same numbers, never scoring a row twice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import and_, delete, func, insert, select, update

from app.db import session_scope
from app.models import ImageLabel, ImageScore, MiningRun
from app.params import RunParams
from app.services.runs import Example, examples, load_run, sampled_ids
from app.settings import Settings
from worker.context import JobContext
from worker.executors import executor
from worker.handlers.evaluate import denoiser_resolution
from worker.models import run_view
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
    #: adaptive: map key -> [2, P] scores and standard errors of the row's top boxes
    bounds: dict[str, np.ndarray] = field(default_factory=dict)
    #: adaptive: map key -> (map sum, per-draw differences) of all the row's draws, which a
    #: later stage extends
    state: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: map key -> the row's per-draw maps as block means [draws, hb, wb] (float16), the draws
    #: the settle stage reads standard errors from (worker/engine/settled.py); key + ":shape"
    #: -> [h, w, block] of its map
    draw_blocks: dict[str, np.ndarray] = field(default_factory=dict)
    #: denoiser inputs spent (rows x draws x conditions x tiles)
    passes: int = 0


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
    view = run_view(record)
    stages = engine_preset(record.params).stages
    passes = 0

    def stage_executor(draws: int | None):
        return executor(context, model_id=record.model_id, weights=record.weights, compute=compute_shard,
                        options=dict(label_ids=record.label_ids, params=record.params, view=view,
                                     stage_draws=draws), name="score")

    def write(path, shard, scores):
        nonlocal passes
        if stages:
            save_stage(bounds_file(path, 0), scores)  # before the map file that marks the shard done
        write_shard(settings, shard, path, run_id=run_id, scores=scores)
        passes += scores.passes

    done = run_pieces(context, shards(settings, record.label_set_id, record.params, maps_dir),
                      stage_executor(stages[0] if stages else None), write,
                      stage="score", message="{done}/{total} images", size=len, total=total)
    result = {"run": run_id, "images": done}
    if stages:
        result["stages"] = adaptive_stages(context, record, maps_dir, stages, stage_executor)
        passes += sum(stage["passes"] for stage in result["stages"])
    result["passes"] = passes  # computed by this attempt (a resumed job does not count the pieces it found done)
    with session_scope(settings) as session:
        run = session.get(MiningRun, run_id)
        run.status, run.stages_done = "scored", sorted(set(run.stages_done or []) | {"score"})
    return result


# --- adaptive stages -----------------------------------------------------------------------------
def bounds_file(shard_file: Path, stage: int) -> Path:
    """Where a shard's box bounds of one stage live (not shard-*.npz: mining reads those)."""
    return shard_file.parent / "adaptive" / f"{shard_file.stem}.stage-{stage}.npz"


def current_bounds(maps_dir: Path, stages, before: int) -> tuple[dict, dict]:
    """Every row's latest box bounds from stages < `before`: key -> (label id, bounds), and the
    draws its map has."""
    from worker.engine.adaptive import next_stage_draws

    bounds, draws = {}, {}
    for shard_file in sorted(maps_dir.glob("shard-*.npz")):
        if shard_file.name.endswith((".all.npz", ".tmp.npz")):
            continue
        for stage in range(before):
            path = bounds_file(shard_file, stage)
            if not path.exists():
                continue
            with np.load(path) as data:
                for key in data.files:
                    if ":" not in key:  # not a row's map sum or draws
                        bounds[key] = (int(key.split("_")[1]), data[key])
                        draws[key] = next_stage_draws(stages, stage)
    return bounds, draws


def adaptive_stages(context: JobContext, record, maps_dir: Path, stages, stage_executor) -> list[dict]:
    """Stages 1, 2, ...: more draws for the images with a row that may still be mined, until
    every such row has the last stage's (the paper's) draws. A row closed early that a later
    bar reopens goes straight to the last stage's draws (the stages after the last)."""
    from worker.engine.adaptive import next_stage_draws, open_rows

    settings, params = context.settings, record.params
    preset, done_stages = engine_preset(params), []
    stage = 1
    while True:
        bounds, draws = current_bounds(maps_dir, stages, stage)
        still_open = open_rows(bounds, params.mine.per_label, preset.confidence)
        if all(draws[key] >= stages[-1] for key in still_open):
            return done_stages
        target = next_stage_draws(stages, stage)
        todo = {int(key.split("_")[0]) for key in still_open if draws[key] < target}
        pieces = ((bounds_file(path, stage), stage_task(path, subset, stage, record.label_ids))
                  for path, shard in shards(settings, record.label_set_id, params, maps_dir)
                  if (subset := [e for e in shard if e.image_id in todo]))
        passes = 0

        def write(path, subset, scores):
            nonlocal passes
            rescore_rows(settings, maps_dir, path, run_id=record.run_id, scores=scores)
            passes += scores.passes

        run_pieces(context, pieces, stage_executor(target), write, stage=f"score, stage {stage + 1}",
                   message=f"{{done}}/{{total}} images at {target} draws", size=len, total=len(todo))
        done_stages.append({"stage": stage, "draws": target, "images": len(todo), "passes": passes})
        stage += 1


def stage_task(shard_file: Path, subset: list[Example], stage: int, label_ids: list[int]) -> StageTask:
    keys = {map_key(e.image_id, label_ids[label]) for e in subset for label in e.label_indices}
    return StageTask(subset, row_states(shard_file, stage, keys))


def rescore_rows(settings: Settings, maps_dir: Path, stage_file: Path, *, run_id: int,
                 scores: ShardScores) -> None:
    """A later stage's results for some of a shard's images: their maps replace the old ones in
    the shard's map file, their rows are updated, and the stage's bounds file is written last."""
    shard_file = maps_dir / (stage_file.name.split(".stage-")[0] + ".npz")
    with np.load(shard_file) as data:
        maps = {key: data[key] for key in data.files}
    save_maps(shard_file, {**maps, **scores.maps})
    with session_scope(settings) as session:
        for r in scores.records:
            session.execute(update(ImageScore).where(and_(
                ImageScore.run_id == run_id, ImageScore.image_id == r["image_id"],
                ImageScore.label_id == r["label_id"])).values(
                typicality=r["typicality"], std_error=r["std_error"], draws=r["draws"]))
    save_stage(stage_file, scores)


def save_stage(path: Path, scores: ShardScores) -> None:
    """A stage's file: each scored row's box bounds (key), map sum (key:sum) and per-draw
    differences (key:draws)."""
    arrays = dict(scores.bounds)
    for key, (total, differences) in scores.state.items():
        arrays[f"{key}:sum"], arrays[f"{key}:draws"] = total, differences
    save_maps(path, arrays)


def row_states(shard_file: Path, before: int, keys: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The latest (map sum, per-draw differences) of these rows from the shard's stages < `before`."""
    states = {}
    for stage in range(before):
        path = bounds_file(shard_file, stage)
        if path.exists():
            with np.load(path) as data:
                for key in keys & {name for name in data.files if ":" not in name}:
                    states[key] = (data[f"{key}:sum"], data[f"{key}:draws"])
    return states


#: Denoiser inputs per forward call for pixel models on a GPU. At the presets' 128 a 32 px pass
#: costs far more Python (diffusers' module calls) than GPU time: the score job ran at 47 images/s
#: on an H200, where the engine at 512 rows ran at 123 (docs/benchmarks.md, "GPU check").
GPU_PIXEL_FORWARD_BATCH = 512

#: Pixel models on a CPU: channels_last at 64 rows per call scored 1.23-1.29x faster than
#: contiguous at the presets' 128 on this project's CPUs (bench/bench_cpu_layout.py).
CPU_PIXEL_LAYOUT = {"forward_batch": 64, "channels_last": True}


def engine_preset(params: RunParams):
    """The run's typicality preset with its number of draws (an adaptive run's last stage)."""
    from worker.engine.presets import get_preset

    preset = get_preset(params.preset)
    if params.draws and preset.stages:  # the stages below the draws asked for, then those
        stages = tuple(n for n in preset.stages if n < params.draws) + (params.draws,)
        return preset.with_(draws=params.draws, stages=stages if len(stages) > 1 else None)
    return preset.with_(draws=params.draws) if params.draws else preset


def resolved_precision(precision: str, *, device: str, backend: str) -> str:
    """"auto" -> fp16 for Stable Diffusion on a GPU, where it scored 4.9-6.5x faster and agreed
    with fp32 better than fp32 agrees with itself under another seed; fp32 elsewhere: the small
    pixel models are launch-bound on a GPU and ran slower in fp16, and CPUs run half precision
    2-4x slower (docs/benchmarks.md). Any other choice is kept as given."""
    if precision != "auto":
        return precision
    return "fp16" if device == "cuda" and backend == "stable-diffusion" else "fp32"


def preset_for(params: RunParams, denoiser):
    """The run's typicality preset with its draws, precision and the denoiser's device applied.
    Precision and device change no draw, so the numbers stay those of the preset (up to rounding)."""
    device = next(denoiser.parameters()).device.type
    preset = engine_preset(params)
    precision = resolved_precision(params.precision, device=device, backend=denoiser.backend)
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


@dataclass
class StageTask:
    """A later adaptive stage's work in one shard: the images to score further, and the draws
    their rows already have (map key -> (map sum [h, w], per-draw differences [n]))."""

    examples: list[Example]
    prior: dict[str, tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.examples)


def compute_shard(denoiser, shard: list[Example] | StageTask, label_ids: list[int], params: RunParams,
                  view=None, stage_draws: int | None = None) -> ShardScores:
    """Typicality of a shard's images under their own labels (and every label with all_labels),
    with a map for every row, each image seen through `view` (default: the centre square at the
    model's resolution); images of one shape are scored in one batch. `stage_draws`: an adaptive
    stage, up to that many draws of the preset's sequence (extending a StageTask's earlier
    draws), with each row's box bounds."""
    from worker.engine.data import View, load_view_groups

    view = view or View(denoiser_resolution(denoiser), whole=False)
    preset, seed = preset_for(params, denoiser), params.seed
    examples, prior = (shard.examples, shard.prior) if isinstance(shard, StageTask) else (shard, None)
    bounds = None
    if stage_draws is not None:
        from worker.engine.patches import default_patch_size

        preset = preset.with_(prefix=stage_draws)
        bounds = dict(shorter_side=view.size, patch_size=params.mine.patch_size or default_patch_size(view.size),
                      per_image=params.mine.per_image)
    scores = ShardScores(maps={}, records=[])
    records: dict = {}
    for indices, images in load_view_groups([e.path for e in examples], view):
        group = [examples[i] for i in indices]
        if bounds is None:
            records.update(own_label_scores(denoiser, group, images, label_ids, preset, seed, scores,
                                            tile_stride=params.tile_stride, block=draw_block(params, view)))
        else:
            records.update(staged_scores(denoiser, group, images, label_ids, preset, seed, scores, bounds, prior,
                                         tile_stride=params.tile_stride))
        if params.all_labels and prior is None:  # later stages refine the own labels' rows only
            every_label_scores(denoiser, group, images, label_ids, preset, seed, scores, records,
                               tile_stride=params.tile_stride)
    scores.records = list(records.values())
    return scores


def own_label_rows(shard: list[Example]) -> list[tuple[int, int]]:
    """(index in shard, label index): one row per (image, own label), so a multi-label image is
    scored under each of its labels."""
    return [(i, label) for i, e in enumerate(shard) for label in e.label_indices]


#: Scoring that keeps every draw's map: rows are scored in chunks of at most this many
#: per-draw map values, about 256 MiB (float32, the maps and their tiles' copies).
DRAW_MAP_VALUES = 2 ** 25


def draw_block(params: RunParams, view) -> int:
    """Block side of the per-draw maps kept for the settle stage, from the run's box side."""
    from worker.engine.patches import default_patch_size
    from worker.engine.settled import block_size

    return block_size(params.mine.patch_size or default_patch_size(view.size))


def own_label_scores(denoiser, shard, images, label_ids, preset, seed, scores: ShardScores, *,
                     tile_stride: str = "half", block: int | None = None) -> dict:
    """(image, label) -> record under each own label, its map added to `scores.maps`; with a
    `block`, the draws the settle stage needs as block means in `scores.draw_blocks`, so that
    mining reads every patch's standard error from the score's own draws instead of scoring
    the images again."""
    from worker.engine.data import multi_hot
    from worker.engine.settled import pool_draw_maps, settle_preset
    from worker.engine.tiles import passes_per_draw, typicality_as_trained

    rows = own_label_rows(shard)
    tiles = passes_per_draw(denoiser, images, tile_stride)
    kept = settle_preset(preset)[0].draws_used if block else 0
    chunk = max(1, DRAW_MAP_VALUES // (preset.draws_used * tiles * images[0, 0].numel())) if block else len(rows)
    records = {}
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        own = typicality_as_trained(denoiser, images[[i for i, _ in part]],
                                    multi_hot([label for _, label in part], len(label_ids)), preset, seed=seed,
                                    tile_stride=tile_stride, draw_maps=bool(block))
        for r, (i, label) in enumerate(part):
            image_id, label_id = shard[i].image_id, label_ids[label]
            key = map_key(image_id, label_id)
            scores.maps[key] = own.maps[r].cpu().numpy().astype(np.float16)
            records[(image_id, label_id)] = dict(
                image_id=image_id, label_id=label_id, typicality=float(own.scores[r]),
                std_error=float(own.stderr[r]), draws=int(own.draws[r]), loss=None, map_key=key)
            if block:
                used = min(kept, int(own.draws[r]))  # an early-stopped row has zeros after its last draw
                blocks = pool_draw_maps(own.draw_maps[r, :used].cpu(), block)
                scores.draw_blocks[key] = blocks.numpy().astype(np.float16)
                scores.draw_blocks[key + ":shape"] = np.array([*own.maps[r].shape, block])
    scores.passes += len(rows) * preset.draws_used * 2 * tiles
    return records


def staged_scores(denoiser, shard, images, label_ids, preset, seed, scores: ShardScores, bounds: dict,
                  prior: dict | None, *, tile_stride: str = "half") -> dict:
    """An adaptive stage: each own-label row scored up to `preset.prefix` draws, extending the
    draws it already has in `prior`, with its state (map sum, per-draw differences) and its box
    bounds added to `scores.state` and `scores.bounds`."""
    import torch

    from worker.engine.adaptive import box_bounds, extend
    from worker.engine.data import multi_hot
    from worker.engine.tiles import passes_per_draw, typicality_as_trained
    from worker.engine.typicality import standard_error

    tiles = passes_per_draw(denoiser, images, tile_stride)
    by_start: dict[int, list] = {}  # rows grouped by the draws they already have
    for i, label in own_label_rows(shard):
        key = map_key(shard[i].image_id, label_ids[label])
        had = prior[key] if prior and key in prior else None
        by_start.setdefault(0 if had is None else len(had[1]), []).append((i, label, key, had))
    records = {}
    for skip, rows in sorted(by_start.items()):
        stage = preset.with_(skip=skip)
        chunk = max(1, DRAW_MAP_VALUES // (stage.draws_used * tiles * images[0, 0].numel()))
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            new = typicality_as_trained(denoiser, images[[i for i, *_ in part]],
                                        multi_hot([label for _, label, *_ in part], len(label_ids)), stage, seed=seed,
                                        draw_maps=True, tile_stride=tile_stride)
            states = [extend(None if had is None else torch.from_numpy(had[0]),
                             None if had is None else torch.from_numpy(had[1]), new.maps[r].cpu(),
                             new.differences[r].cpu()) for r, (*_, had) in enumerate(part)]
            means = torch.stack([total / len(differences) for total, differences in states])
            row_bounds = box_bounds(means, new.draw_maps.cpu(), [len(d) for _, d in states], **bounds)
            for r, (i, label, key, _) in enumerate(part):
                (total, differences), mean = states[r], means[r]
                scores.maps[key] = mean.numpy().astype(np.float16)
                scores.bounds[key] = row_bounds[r]
                scores.state[key] = (total.numpy().astype(np.float32), differences.numpy().astype(np.float32))
                records[(shard[i].image_id, label_ids[label])] = dict(
                    image_id=shard[i].image_id, label_id=label_ids[label], typicality=float(mean.mean()),
                    std_error=float(standard_error(differences)), draws=len(differences), loss=None, map_key=key)
        scores.passes += len(rows) * stage.draws_used * 2 * tiles
    return records


def every_label_scores(denoiser, shard, images, label_ids, preset, seed, scores: ShardScores,
                       records: dict, *, tile_stride="half") -> None:
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
    from worker.engine.tiles import label_scores_as_trained, passes_per_draw

    everything = label_scores_as_trained(denoiser, images, preset, seed=seed, maps=True, tile_stride=tile_stride)
    scores.passes += (len(images) * preset.draws_used * (len(label_ids) + 1)
                      * passes_per_draw(denoiser, images, tile_stride))
    every_map = everything.maps.cpu().numpy().astype(np.float16)  # [B, M, h, w]
    for i, example in enumerate(shard):
        for m, label_id in enumerate(label_ids):
            key = map_key(example.image_id, label_id)
            if key not in scores.maps:
                scores.other_maps[key] = every_map[i, m]
            record = records.setdefault((example.image_id, label_id), dict(
                image_id=example.image_id, label_id=label_id,
                typicality=float(everything.typicality[i, m]),
                std_error=float(everything.stderr[i, m]), draws=preset.draws_used, map_key=key))
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
                 typicality=r["typicality"], std_error=r["std_error"], loss=r["loss"], draws=r["draws"],
                 map_path=map_path(r["map_key"])) for r in scores.records]
    with session_scope(settings) as session:
        session.execute(delete(ImageScore).where(ImageScore.run_id == run_id,
                                                 ImageScore.image_id.in_([e.image_id for e in shard])))
        session.execute(insert(ImageScore), rows)
    if scores.other_maps:
        save_maps(others_file, scores.other_maps)
    if scores.draw_blocks:
        save_maps(draw_blocks_file(shard_file), scores.draw_blocks)
    save_maps(shard_file, scores.maps)


def draw_blocks_file(shard_file: Path) -> Path:
    """Where a shard's per-draw block maps live (not shard-*.npz of the maps folder: mining
    reads those as maps)."""
    return shard_file.parent / "draws" / shard_file.name


def save_maps(path: Path, maps: dict[str, np.ndarray]) -> None:
    """Written aside and renamed, so a kill never leaves a half-written map file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name.removesuffix(".npz") + ".tmp.npz")
    np.savez(temporary, **maps)
    os.replace(temporary, path)
