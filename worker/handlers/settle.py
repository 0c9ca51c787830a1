"""The mining stage "settle": how settled each mined patch is (worker/engine/settled.py).

The score job keeps, besides each map's mean over the draws, the draws a standard error needs
as block means (`draw_blocks_file`: the run's very draws for presets of up to 24 draws,
stratified ones and early stopping; the first 24 of the paper's 100 i.i.d. draws, whose spread
stands in for all of theirs: worker/engine/settled.settle_preset). Each patch's per-draw values
are pooled from them, giving its standard error and, with the label's top-K cut, its chance to
stay in the top K, at no denoiser pass. Runs scored before the score job kept them (and the
adaptive preset's rows, whose draws come in stages) are scored again under the patch's label
instead, keeping every draw's map: one scoring of the images that hold patches, at most 24
draws (bench/bench_settled.py measures it).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy import select, update

from app.db import session_scope
from app.models import Image, ImageScore, MiningRun, Patch
from worker.context import JobContext
from worker.models import load_trained

#: (image, label) groups scored per call
BATCH = 16


def settle_patches(context: JobContext, info, groups: list[tuple[int, int, list]]) -> None:
    """Each patch's `score_stderr`, and its `stay` unless the patches were drawn at random.

    `info` is the mining job's `RunInfo`; `groups` its `patch_groups`: (image, label, [(patch
    id, original box)])."""
    stderrs = patch_standard_errors(context, info, groups)
    with session_scope(context.settings) as session:
        cuts = session.get(MiningRun, info.run_id).top_k_cuts or {}
        rows = session.execute(select(Patch.id, Patch.label_id, Patch.score)
                               .where(Patch.run_id == info.run_id)).all()
    stays = {} if info.selection == "random" else stay_of_patches(rows, stderrs, cuts,
                                                                  lowest=info.selection == "least")
    with session_scope(context.settings) as session:
        if stderrs:
            session.execute(update(Patch), [{"id": patch_id, "score_stderr": stderr, "stay": stays.get(patch_id)}
                                            for patch_id, stderr in stderrs.items()])


def stay_of_patches(rows, stderrs: dict[int, float], cuts: dict, *, lowest: bool) -> dict[int, float]:
    """{patch id: chance to stay in its label's top K}, label by label; the cut's own noise is
    taken as the label's median patch stderr (worker/engine/settled.stay_probabilities)."""
    from worker.engine.settled import stay_probabilities

    by_label: dict[int, list] = defaultdict(list)
    for patch_id, label_id, score in rows:
        by_label[label_id].append((patch_id, score, stderrs[patch_id]))
    out = {}
    for label_id, patches in by_label.items():
        ids, scores, errors = (np.array(column) for column in zip(*patches))
        stay = stay_probabilities(scores, errors, cuts.get(str(label_id)), float(np.median(errors)),
                                  lowest=lowest)
        out.update(zip(ids.tolist(), stay.tolist()))
    return out


def patch_standard_errors(context: JobContext, info, groups: list[tuple[int, int, list]]) -> dict[int, float]:
    """{patch id: standard error of its score}: from the score job's kept draws where it kept
    them, else by scoring again."""
    images = image_files(context, {image_id for image_id, _, _ in groups})
    stderrs, missing = stored_standard_errors(context, info, groups, {i: size for i, (_, size) in images.items()})
    if missing:
        stderrs.update(rescored_standard_errors(context, info, missing, images))
    return stderrs


def image_files(context: JobContext, image_ids: set[int]) -> dict[int, tuple[Path, tuple[int, int]]]:
    """{image id: (its file, its (width, height))}."""
    with session_scope(context.settings) as session:
        return {i: (context.settings.home_dir / p, (w, h)) for i, p, w, h in session.execute(
            select(Image.id, Image.stored_path, Image.width, Image.height).where(Image.id.in_(image_ids)))}


def stored_standard_errors(context: JobContext, info, groups: list[tuple[int, int, list]],
                           sizes: dict[int, tuple[int, int]]) -> tuple[dict[int, float], list]:
    """Standard errors from the per-draw block maps the score job kept, a shard file at a time,
    and the groups whose rows have none."""
    import torch

    from worker.engine.settled import box_draw_values, box_standard_errors, settle_preset, unpool_draw_maps
    from worker.handlers.score import draw_blocks_file, engine_preset

    preset, score_draws = settle_preset(engine_preset(info.params))
    with session_scope(context.settings) as session:
        map_paths = dict(((i, label), path) for i, label, path in session.execute(
            select(ImageScore.image_id, ImageScore.label_id, ImageScore.map_path)
            .where(ImageScore.run_id == info.run_id, ImageScore.map_path.is_not(None))))
    by_file: dict[Path, list] = defaultdict(list)
    missing = []
    for group in groups:
        path = map_paths.get(group[:2])
        if path is None:
            missing.append(group)
            continue
        file, key = path.split(":")
        by_file[draw_blocks_file(context.settings.home_dir / file)].append((key, group))
    stderrs: dict[int, float] = {}
    for number, (file, keyed) in enumerate(sorted(by_file.items()), 1):
        if not file.exists():
            missing.extend(group for _, group in keyed)
            continue
        with np.load(file) as data:
            for key, group in keyed:
                if key not in data.files:
                    missing.append(group)
                    continue
                image_id, _, members = group
                height, width, block = (int(v) for v in data[key + ":shape"])
                draw_maps = unpool_draw_maps(torch.from_numpy(data[key].astype(np.float32)), block, (height, width))
                values = box_draw_values(draw_maps, [box for _, box in members], [sizes[image_id]] * len(members),
                                         view_size=info.view.size, patch_size=info.patch_size,
                                         whole=info.view.whole, multiple=info.view.multiple)
                errors = box_standard_errors(values, len(draw_maps), preset.timesteps, preset.round_size,
                                             score_draws=score_draws)
                stderrs.update(zip([patch_id for patch_id, _ in members], errors.tolist()))
        context.progress(number, len(by_file), "standard errors of the patches' scores", stage="settle")
        context.check()
    return stderrs, missing


def rescored_standard_errors(context: JobContext, info, groups: list[tuple[int, int, list]],
                             images: dict[int, tuple[Path, tuple[int, int]]]) -> dict[int, float]:
    """{patch id: standard error of its score}, every (image, label) holding patches scored again
    with the run's draws, BATCH of them at a time."""
    from worker.engine.data import load_view_groups, multi_hot
    from worker.engine.settled import box_draw_values, box_standard_errors, settle_preset
    from worker.engine.tiles import typicality_as_trained
    from worker.handlers.score import preset_for

    label_index = {label_id: i for i, (label_id, _) in enumerate(info.labels)}
    denoiser = load_trained(context, info.model_id, info.weights)
    preset, score_draws = settle_preset(preset_for(info.params, denoiser))
    stderrs: dict[int, float] = {}
    for start in range(0, len(groups), BATCH):
        batch = groups[start:start + BATCH]
        for indices, pixels in load_view_groups([images[image_id][0] for image_id, _, _ in batch], info.view):
            conditions = multi_hot([label_index[batch[i][1]] for i in indices], len(info.labels))
            # tiled as the score job tiled them, so the draws' maps are those of the scores
            result = typicality_as_trained(denoiser, pixels, conditions, preset, seed=info.seed, draw_maps=True,
                                           tile_stride=info.params.tile_stride)
            for i, draw_maps, used in zip(indices, result.draw_maps, result.draws.tolist()):
                image_id, _, members = batch[i]
                values = box_draw_values(draw_maps, [box for _, box in members], [images[image_id][1]] * len(members),
                                         view_size=info.view.size, patch_size=info.patch_size,
                                         whole=info.view.whole, multiple=info.view.multiple)
                errors = box_standard_errors(values, int(used), preset.timesteps, preset.round_size,
                                             score_draws=score_draws)
                stderrs.update(zip([patch_id for patch_id, _ in members], errors.tolist()))
        context.progress(min(start + BATCH, len(groups)), len(groups),
                         "standard errors of the patches' scores", stage="settle")
        context.check()
    return stderrs

