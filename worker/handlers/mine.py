"""Mine a scored run: typical patches, DIFT features in FAISS, clusters, gallery crops.

Each stage writes its results whole (rows replaced in one transaction, files renamed into
place) and is recorded in `MiningRun.stages_done`, so a resumed job starts at the first stage
not done; the features stage also resumes batch by batch.

Clusters the user marked as artifacts survive re-clustering (`launch_recluster`): their
members' look-alikes are left out of every label's clusters, and no image is rescored.
"""
from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, insert, select, update

from app.db import session_scope
from app.models import Cluster, ClusterMember, Image, MiningRun, Patch
from app.run_files import crop_path, save_crop
from app.services.runs import load_run
from worker.context import JobContext
from worker.handlers.run_views import mine_label_scores, mine_map
from worker.models import load_trained, run_view

STAGES = ("patches", "settle", "features", "clusters", "crops", "trends", "label_scores", "map")
FEATURE_BATCH = 16


class RunInfo:
    """What every stage needs to know about the run, read once."""

    def __init__(self, context: JobContext, run_id: int):
        from worker.engine.patches import default_patch_size

        with session_scope(context.settings) as session:
            record = load_run(session, context.settings, run_id)
        mine = record.params.mine
        self.run_id, self.params, self.seed = run_id, record.params, record.params.seed
        self.labels, self.ordinal = list(record.labels), record.ordinal
        self.stages_done = set(record.stages_done)
        self.model_id, self.weights = record.model_id, record.weights
        # How the score job saw each image (docs/method.md): its shorter side, whole or cropped.
        self.view = run_view(record)
        self.dir = context.settings.runs_dir / str(run_id)
        self.patch_size = mine.patch_size or default_patch_size(self.view.size)
        self.per_label, self.per_image, self.clusters = mine.per_label, mine.per_image, mine.clusters
        # "typical" is the method; "least" (-T) and "random" are its baselines, same pipeline.
        self.selection, self.merge_threshold = mine.selection, mine.merge_threshold
        self.support_share = mine.support_share
        self.lookalike_threshold = mine.lookalike_threshold
        self.trend_members, self.trend_draws = mine.trend_members, mine.trend_draws


def run_mine(context: JobContext) -> dict:
    info = RunInfo(context, context.job.run_id)
    if "score" not in info.stages_done:
        raise ValueError(f"run {info.run_id} is not scored yet; run: diffmine score")
    stage_functions = {"patches": mine_patches, "settle": mine_settle, "features": mine_features,
                       "clusters": mine_clusters, "crops": mine_crops, "trends": mine_trends,
                       "label_scores": mine_label_scores, "map": mine_map}
    skipped = {"trends": not info.ordinal, "label_scores": not info.params.all_labels}
    for stage in STAGES:
        if stage in info.stages_done or skipped.get(stage):
            continue
        set_run_status(context, info.run_id, "mining")
        context.progress(0, None, stage, stage=stage, force=True)  # shown from its start
        stage_functions[stage](context, info)
        mark_stage_done(context, info.run_id, stage)
        info.stages_done.add(stage)
        context.check()
    with session_scope(context.settings) as session:
        run = session.get(MiningRun, info.run_id)
        run.status = "ready"
        patches = session.query(Patch).filter(Patch.run_id == info.run_id).count()
        clusters = session.query(Cluster).filter(Cluster.run_id == info.run_id,
                                                 Cluster.is_artifact.is_(False)).count()
        artifacts = session.query(Cluster).filter(Cluster.run_id == info.run_id,
                                                  Cluster.is_artifact.is_(True)).count()
    return {"run": info.run_id, "patches": patches, "clusters": clusters,
            "artifact_clusters": artifacts}


def set_run_status(context, run_id: int, status: str) -> None:
    with session_scope(context.settings) as session:
        session.get(MiningRun, run_id).status = status


def mark_stage_done(context, run_id: int, stage: str) -> None:
    with session_scope(context.settings) as session:
        run = session.get(MiningRun, run_id)
        run.stages_done = sorted(set(run.stages_done or []) | {stage})


# --- patches -----------------------------------------------------------------------------------
def map_shards(info: RunInfo) -> list[Path]:
    """The score job's map files: maps under each image's own labels. Not `.all.npz` (an
    all_labels run's maps under the other labels) nor a `.tmp.npz` a kill left mid-write."""
    return sorted(p for p in (info.dir / "maps").glob("shard-*.npz")
                  if not p.name.endswith((".all.npz", ".tmp.npz")))


def mine_patches(context: JobContext, info: RunInfo) -> None:
    """Top boxes of every image's map, then the best `per_label` of each label."""
    import torch

    from worker.engine import patches as P

    # The features stage resumes from the parts it finds; parts of an earlier mining hold the
    # features (and ids) of patches about to be replaced, so they go first.
    shutil.rmtree(info.dir / "features", ignore_errors=True)
    shards = map_shards(info)

    def candidates():
        for number, shard in enumerate(shards, 1):
            with np.load(shard) as data:
                maps = {key: torch.from_numpy(data[key].astype(np.float32)) for key in data.files}
            for keys, stacked in same_shape_groups(maps):
                scores = P.patch_scores(stacked, P.image_shape_of(stacked.shape[-2:], info.view.size),
                                        info.patch_size)
                for key, boxes in zip(keys, select_boxes(scores)):
                    image_id, label_id = map(int, key.split("_"))
                    for box in boxes:
                        yield label_id, box.score, (image_id, tuple(box[:4]))
            context.progress(number, len(shards), "best boxes per image", stage="patches")
            context.check()

    def select_boxes(scores):
        if info.selection == "least":
            return P.least_typical_boxes(scores, info.patch_size, info.per_image)
        if info.selection == "random":
            return P.random_boxes(scores, info.patch_size, info.per_image, seed=info.seed)
        return P.top_boxes(scores, info.patch_size, info.per_image)

    # One more than kept: the best candidate left out marks where the label's top K is cut.
    if info.selection == "least":
        best = P.least_per_label(candidates(), info.per_label + 1)
    elif info.selection == "random":
        best = P.random_per_label(candidates(), info.per_label + 1, seed=info.seed)
    else:
        best = P.top_per_label(candidates(), info.per_label + 1)
    cuts = {str(label_id): kept.pop()[0] for label_id, kept in best.items() if len(kept) > info.per_label}
    image_ids = sorted({image_id for kept in best.values() for _, (image_id, _) in kept})
    with session_scope(context.settings) as session:
        sizes = dict(((i, (w, h)) for i, w, h in session.execute(
            select(Image.id, Image.width, Image.height).where(Image.id.in_(image_ids)))))
        session.execute(delete(Patch).where(Patch.run_id == info.run_id))
        session.get(MiningRun, info.run_id).top_k_cuts = cuts if info.selection != "random" else None
        rows = []
        for label_id, kept in best.items():
            for score, (image_id, box) in kept:
                x0, y0, x1, y1 = P.box_to_original(box, info.view.size, sizes[image_id], whole=info.view.whole,
                                                    multiple=info.view.multiple)
                rows.append(dict(run_id=info.run_id, image_id=image_id, label_id=label_id,
                                 x0=math.floor(x0), y0=math.floor(y0), x1=math.ceil(x1),
                                 y1=math.ceil(y1), score=score))
        if rows:
            session.execute(insert(Patch), rows)


def mine_settle(context: JobContext, info: RunInfo) -> None:
    """Each patch's standard error, and its chance to stay in its label's top K (worker/handlers/settle.py)."""
    from worker.handlers.settle import settle_patches

    settle_patches(context, info, patch_groups(context, info))


# --- features ----------------------------------------------------------------------------------
def patch_groups(context, info: RunInfo) -> list[tuple[int, int, list[tuple[int, tuple]]]]:
    """(image, label, [(patch id, original box)]) in image order: DIFT runs once per group."""
    with session_scope(context.settings) as session:
        rows = session.execute(select(Patch.image_id, Patch.label_id, Patch.id, Patch.x0, Patch.y0,
                                      Patch.x1, Patch.y1).where(Patch.run_id == info.run_id)
                               .order_by(Patch.image_id, Patch.label_id, Patch.id)).all()
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for image_id, label_id, patch_id, *box in rows:
        groups[(image_id, label_id)].append((patch_id, tuple(box)))
    return [(image_id, label_id, members) for (image_id, label_id), members in groups.items()]


@dataclass
class FeaturePart:
    """One resumable piece of the features stage: up to FEATURE_BATCH (image, label) groups."""

    paths: list[str]
    label_indices: list[int]
    #: per group: its patches' boxes in model pixels, and the patches' ids in the same order
    boxes: list[list[tuple[float, float, float, float]]]
    patch_ids: list[list[int]]


def mine_features(context: JobContext, info: RunInfo) -> None:
    """DIFT features, one feature map per (image, label), every patch cropped from it.

    A part is computed by `compute_feature_part` and written by `write_feature_part`: here, or,
    with DIFFMINE_RAY_ADDRESS set, on Ray actors (worker/ray_backend.py) and written here."""
    from worker.executors import executor
    from worker.pieces import run_pieces

    parts = feature_parts(context, info)
    options = dict(num_labels=len(info.labels), view=info.view, seed=info.seed)
    run_pieces(context, parts, executor(context, model_id=info.model_id, weights=info.weights,
                                        compute=compute_feature_part, options=options,
                                        name="features"),
               write_feature_part, stage="features", message="DIFT features",
               size=lambda part: len(part.paths), total=sum(len(part.paths) for _, part in parts))
    write_index(context, info, [path for path, _ in parts])


def feature_parts(context, info: RunInfo) -> list[tuple[Path, FeaturePart]]:
    """Every part of the run's features with the file it is written to, in patch-group order."""
    from worker.engine.patches import box_to_model

    label_index = {label_id: i for i, (label_id, _) in enumerate(info.labels)}
    groups = patch_groups(context, info)
    parts_dir = info.dir / "features"
    parts_dir.mkdir(parents=True, exist_ok=True)
    with session_scope(context.settings) as session:
        images = {i: (str(context.settings.home_dir / p), (w, h)) for i, p, w, h in session.execute(
            select(Image.id, Image.stored_path, Image.width, Image.height)
            .where(Image.id.in_({g[0] for g in groups})))}
    parts = []
    for start in range(0, len(groups), FEATURE_BATCH):
        batch = groups[start:start + FEATURE_BATCH]
        parts.append((parts_dir / f"part-{start:09d}.npz", FeaturePart(
            paths=[images[image_id][0] for image_id, _, _ in batch],
            label_indices=[label_index[label_id] for _, label_id, _ in batch],
            boxes=[[clip_box(box_to_model(box, info.view.size, images[image_id][1], whole=info.view.whole,
                                           multiple=info.view.multiple),
                             info.view.shape_of(images[image_id][1])) for _, box in members]
                   for image_id, _, members in batch],
            patch_ids=[[patch_id for patch_id, _ in members] for _, _, members in batch])))
    return parts


def compute_feature_part(denoiser, part: FeaturePart, *, num_labels: int, view, seed: int) -> np.ndarray:
    """[patches, C] float32 DIFT features of a part's patches, in `patch_ids` order: one DIFT
    map per image over the whole view, images of one shape in one batch."""
    import torch

    from worker.engine.data import load_view_groups, multi_hot
    from worker.engine.dift import patch_features

    conditions = multi_hot(part.label_indices, num_labels)
    per_image: list = [None] * len(part.paths)
    for indices, pixels in load_view_groups(part.paths, view):
        features = patch_features(denoiser, pixels, conditions[indices], [part.boxes[i] for i in indices],
                                  seed=seed)
        for i, rows in zip(indices, features):
            per_image[i] = rows
    return torch.cat(per_image).cpu().numpy().astype(np.float32)


def write_feature_part(path: Path, part: FeaturePart, features: np.ndarray) -> None:
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, ids=np.array([i for ids in part.patch_ids for i in ids]), features=features)
    os.replace(temporary, path)


def clip_box(box, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Original-pixel boxes are rounded outward; clip them back inside the model's (H, W) view."""
    x0, y0, x1, y1 = box[:4]
    height, width = shape
    return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


def same_shape_groups(maps: dict) -> list[tuple[list, object]]:
    """{key: [h, w] map} -> [(keys, [B, h, w])], one stack per map shape (whole views of photos
    come in a few aspect ratios; a square view in one)."""
    import torch

    groups: dict[tuple, list] = defaultdict(list)
    for key, value in maps.items():
        groups[tuple(value.shape)].append(key)
    return [(keys, torch.stack([maps[k] for k in keys])) for keys in groups.values()]


def write_index(context, info: RunInfo, parts: list[Path]) -> None:
    """All features into one memory-mapped array and a FAISS index; rows linked to patches."""
    from app.vector_index import build_index, save_index

    if not parts:
        return
    total = dim = 0
    for part in parts:
        with np.load(part) as data:
            total, dim = total + len(data["ids"]), data["features"].shape[1]
    matrix = np.lib.format.open_memmap(info.dir / "features.npy", mode="w+", dtype=np.float32,
                                       shape=(total, dim))
    row, mapping = 0, []
    for part in parts:
        with np.load(part) as data:
            matrix[row:row + len(data["ids"])] = data["features"]
            mapping += [{"id": int(pid), "feature_row": row + i} for i, pid in enumerate(data["ids"])]
            row += len(data["ids"])
    matrix.flush()
    index = build_index((matrix[i:i + 65536] for i in range(0, total, 65536)), dim,
                        expected_rows=total)
    save_index(index, info.dir / "index.faiss")
    with session_scope(context.settings) as session:
        session.execute(update(Patch), mapping)


# --- clusters ----------------------------------------------------------------------------------
def mine_clusters(context: JobContext, info: RunInfo) -> None:
    """k-means per label; near-duplicate clusters merged; ranked by median typicality.

    Clusters marked as artifacts are kept as they are, ranked after the others, and their
    members' look-alikes are left out of the new clusters. Everything is computed first and
    written in one short transaction at the end: a write transaction held across the
    computation would block the job's own progress reports."""
    features = np.load(info.dir / "features.npy", mmap_mode="r")
    run_mean = column_mean(features)
    artifacts = artifact_features(context, info, features) - run_mean
    clusters = []
    for number, (label_id, _) in enumerate(info.labels, 1):
        with session_scope(context.settings) as session:
            rows = session.execute(select(Patch.id, Patch.feature_row, Patch.score, Patch.stay)
                                   .where(Patch.run_id == info.run_id, Patch.label_id == label_id,
                                          Patch.feature_row.is_not(None))
                                   .order_by(Patch.id)).all()
        if rows:
            clusters += cluster_label(info, label_id, rows, features, run_mean, artifacts)
        context.progress(number, len(info.labels), "clusters", stage="clusters")
        context.check()
    with session_scope(context.settings) as session:
        session.execute(delete(Cluster).where(Cluster.run_id == info.run_id,
                                              Cluster.is_artifact.is_(False)))
        for cluster, members in clusters:
            session.add(cluster)
            session.flush()
            session.execute(insert(ClusterMember), [dict(m, cluster_id=cluster.id) for m in members])
        rank_artifacts_last(session, info.run_id)


def artifact_features(context, info: RunInfo, features: np.ndarray) -> np.ndarray:
    """Features of the members of the run's artifact clusters, [n, d] (n may be 0)."""
    with session_scope(context.settings) as session:
        rows = session.scalars(select(Patch.feature_row)
                               .join(ClusterMember, ClusterMember.patch_id == Patch.id)
                               .join(Cluster, Cluster.id == ClusterMember.cluster_id)
                               .where(Cluster.run_id == info.run_id, Cluster.is_artifact.is_(True),
                                      Patch.feature_row.is_not(None))
                               .order_by(Patch.feature_row)).all()
    return np.asarray(features[list(rows)], dtype=np.float32).reshape(len(rows), features.shape[1])


def rank_artifacts_last(session, run_id: int) -> None:
    """Artifact clusters keep their members but move behind each label's new clusters; one
    whose members are gone (the run was mined again with new patches) goes too."""
    kept = session.scalars(select(Cluster).where(Cluster.run_id == run_id,
                                                 Cluster.is_artifact.is_(True))
                           .order_by(Cluster.label_id, Cluster.rank)).all()
    counts = dict(session.execute(select(Cluster.label_id, func.count())
                                  .where(Cluster.run_id == run_id, Cluster.is_artifact.is_(False))
                                  .group_by(Cluster.label_id)).all())
    with_members = set(session.scalars(select(ClusterMember.cluster_id).distinct().where(
        ClusterMember.cluster_id.in_([c.id for c in kept]))))
    for cluster in kept:
        if cluster.id not in with_members:
            session.delete(cluster)
            continue
        cluster.rank = counts.get(cluster.label_id, 0)
        counts[cluster.label_id] = cluster.rank + 1


def column_mean(matrix: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Mean row of a memory-mapped matrix, read a chunk at a time."""
    total = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, len(matrix), chunk):
        total += matrix[start:start + chunk].sum(axis=0)
    return (total / max(len(matrix), 1)).astype(np.float32)


def cluster_label(info: RunInfo, label_id: int, rows, features, run_mean: np.ndarray,
                  artifacts: np.ndarray) -> list[tuple[Cluster, list[dict]]]:
    from worker.engine.clustering import (
        cluster_features,
        coherence,
        distances_to_centroids,
        exclude_lookalikes,
        merge_near_duplicates,
        order_clusters,
    )
    from worker.engine.settled import cluster_stability

    patch_ids = np.array([r[0] for r in rows])
    label_features = np.asarray(features[[r[1] for r in rows]])
    scores = np.array([r[2] for r in rows])
    stay = np.array([np.nan if r[3] is None else r[3] for r in rows])  # None: not settled (random)
    keep = ~exclude_lookalikes(label_features - run_mean, artifacts, info.lookalike_threshold)
    if not keep.any():
        return []
    patch_ids, label_features, scores, stay = patch_ids[keep], label_features[keep], scores[keep], stay[keep]
    clustering = cluster_features(label_features, k=info.clusters, seed=info.seed)
    # DIFT features share a large common component (raw centroid cosines are ~0.99 even for
    # visibly different clusters), so near-duplicates are judged on centroids centred on the
    # run's mean feature; merged centroids are then the means of their members.
    _, assignments, _ = merge_near_duplicates(clustering.centroids - run_mean,
                                              clustering.assignments, info.merge_threshold)
    centroids = np.stack([label_features[assignments == c].mean(axis=0)
                          for c in range(assignments.max() + 1)])
    distances = distances_to_centroids(label_features, centroids, assignments)
    # Centred for the same reason: on raw DIFT features every cluster's coherence is ~0.99.
    coherences = coherence(label_features - run_mean, assignments)
    stabilities = cluster_stability(assignments, stay)
    out = []
    for rank, ranked in enumerate(order_clusters(assignments, distances, scores,
                                                 prior_size=info.support_share * len(scores))):
        stability = float(stabilities[ranked.cluster])
        cluster = Cluster(run_id=info.run_id, label_id=label_id, rank=rank, size=len(ranked.members),
                          median_typicality=ranked.median_typicality,
                          ranking_typicality=ranked.ranking_typicality,
                          stability=None if math.isnan(stability) else stability,
                          coherence=float(coherences[ranked.cluster]))
        members = [dict(patch_id=int(patch_ids[m]), position=p, distance=float(distances[m]))
                   for p, m in enumerate(ranked.members)]
        out.append((cluster, members))
    return out


# --- crops -------------------------------------------------------------------------------------
def mine_crops(context: JobContext, info: RunInfo) -> None:
    """Each patch's region cut from its original image once, for fast galleries."""
    from PIL import Image as PILImage

    from app.ingest.images import to_rgb

    with session_scope(context.settings) as session:
        rows = session.execute(select(Patch.id, Patch.x0, Patch.y0, Patch.x1, Patch.y1,
                                      Image.stored_path, Image.sha256).join(Image, Image.id == Patch.image_id)
                               .where(Patch.run_id == info.run_id).order_by(Patch.image_id)).all()
    updates, current, image = [], None, None
    for number, (patch_id, x0, y0, x1, y1, stored, sha256) in enumerate(rows, 1):
        if stored != current:
            current = stored
            image = to_rgb(PILImage.open(context.settings.home_dir / stored))
        relative = crop_path(info.run_id, sha256, (x0, y0, x1, y1))
        save_crop(image, (x0, y0, x1, y1), context.settings.home_dir / relative)
        updates.append({"id": patch_id, "crop_path": relative})
        if number % 500 == 0:
            context.progress(number, len(rows), "gallery crops", stage="crops")
    with session_scope(context.settings) as session:
        if updates:
            session.execute(update(Patch), updates)


# --- trends (ordered labels) -------------------------------------------------------------------
def mine_trends(context: JobContext, info: RunInfo) -> None:
    """Each cluster's typicality under every label: how an element rises and fades over time.

    The first `trend_members` members of each cluster are scored under every label with shared
    draws (one all-label typicality map per member image), each member's box read from those
    maps as in patch selection, and the median over members stored as `Cluster.trend`."""

    from worker.engine.data import load_view_groups
    from worker.engine.patches import scores_at_boxes
    from worker.engine.tiles import label_scores_as_trained
    from worker.handlers.score import preset_for

    with session_scope(context.settings) as session:
        rows = session.execute(
            select(ClusterMember.cluster_id, Patch.image_id, Patch.x0, Patch.y0, Patch.x1, Patch.y1,
                   Image.stored_path, Image.width, Image.height)
            .join(Patch, Patch.id == ClusterMember.patch_id).join(Image, Image.id == Patch.image_id)
            .join(Cluster, Cluster.id == ClusterMember.cluster_id)
            .where(Cluster.run_id == info.run_id, ClusterMember.position < info.trend_members)
            .order_by(Patch.image_id)).all()
    by_image: dict[int, list] = defaultdict(list)
    for row in rows:
        by_image[row.image_id].append(row)
    images = list(by_image.values())
    denoiser = load_trained(context, info.model_id, info.weights)
    params = info.params.model_copy(update={"draws": info.trend_draws}) if info.trend_draws else info.params
    preset = preset_for(params, denoiser)
    per_cluster: dict[int, list[np.ndarray]] = defaultdict(list)
    for start in range(0, len(images), FEATURE_BATCH):
        batch = images[start:start + FEATURE_BATCH]
        paths = [context.settings.home_dir / members[0].stored_path for members in batch]
        for indices, pixels in load_view_groups(paths, info.view):
            scores = label_scores_as_trained(denoiser, pixels, preset, seed=info.seed, maps=True,
                                             tile_stride=info.params.tile_stride)
            for members, maps in zip([batch[i] for i in indices], scores.maps):
                values = scores_at_boxes(maps, [(m.x0, m.y0, m.x1, m.y1) for m in members],
                                         [(m.width, m.height) for m in members], view_size=info.view.size,
                                         patch_size=info.patch_size, whole=info.view.whole,
                                         multiple=info.view.multiple)
                for m, value in zip(members, values):
                    per_cluster[m.cluster_id].append(value.numpy())
        context.progress(min(start + FEATURE_BATCH, len(images)), len(images),
                         "typicality of cluster members under every label", stage="trends")
        context.check()
    names = [name for _, name in info.labels]
    with session_scope(context.settings) as session:
        session.execute(update(Cluster), [
            {"id": cluster_id, "trend": dict(zip(names, map(float, np.median(values, axis=0))))}
            for cluster_id, values in per_cluster.items()])
