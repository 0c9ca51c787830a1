"""Consistent changes across labels: the parallel dataset (docs/method.md section 5).

Job params: {"run_id": R, "images": N, "translation": {options, as for a translation},
"mine": {"clusters", "per_image", "patch_size", "patches"}}. Stages, each resumable:

1. sample   - a seeded sample of N labeled images of the run's label set (sample.json);
2. translate - chunk by chunk: every image translated into every label (`translate_batch`), each
   version scored under its target label (typicality maps, a few draws), co-typicality = the
   per-location median over labels of those maps (chunks/chunk-XXXXX.npz; a chunk is done when
   its file exists);
3. mine     - the best non-overlapping boxes of every image's co-typicality map, then the top
   `patches` of the whole parallel set (patches.json);
4. features - per patch, the DIFT feature of each of its versions (under its label), concatenated
   over labels and L2-normalised (features/chunk-XXXXX.npy, resumable the same way);
5. clusters - k-means on those features, clusters ordered by median co-typicality, members by
   distance to the centroid; a crop of every version of every member (crops/) and summary.json:

    {"run", "labels": [{"id", "name"}], "images": [...], "params": {...},
     "reconstruction_error": {"mean", "max"},
     "clusters": [{"rank", "size", "median_cotypicality",
                   "members": [{"image_id", "box" (model pixels), "original_box", "cotypicality",
                                "source_crop", "versions": [{"label", "label_id", "crop",
                                                             "typicality"}]}]}]}

Everything lives in runs/<run>/parallel/<key>/, key = a hash of the params, so different sizes
or settings never mix and a repeated request finds its finished folder.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.db import session_scope
from app.models import Image, MiningRun, TrainedModel
from app.params import ParallelJob, ParallelMine
from app.services.runs import examples, labels_of
from app.services.translations import translation_key
from worker.context import JobContext
from worker.handlers.translate import crop_box, save_png
from worker.models import load_trained

CHUNK_IMAGES = 4
MAX_MEMBERS_SHOWN = 16


def parallel_folder(settings, run_id: int, job: ParallelJob) -> tuple[str, Path]:
    key = translation_key(None, {"images": job.images, "translation": job.translation.canonical(),
                                 "mine": job.mine.given()})[:16]
    relative = f"runs/{run_id}/parallel/{key}"
    return relative, settings.home_dir / relative


def run_parallel(context: JobContext) -> dict:
    settings, job = context.settings, context.job
    run_id = job.run_id
    with session_scope(settings) as session:
        run = session.get(MiningRun, run_id)
        if run is None:
            raise ValueError(f"no run {run_id}")
        model = session.get(TrainedModel, run.model_id)
        labels = [(label.id, label.name) for label in labels_of(session, model.label_set_id)]
        model_id, weights, label_set_id = model.id, settings.home_dir / model.weights_dir, model.label_set_id
        backend = model.backend
        configured = (model.config or {}).get("resolution")
    relative, folder = parallel_folder(settings, run_id, job)
    folder.mkdir(parents=True, exist_ok=True)
    summary_file = folder / "summary.json"
    if summary_file.exists():
        return finished(relative, json.loads(summary_file.read_text()))
    options = job.translation.resolved(backend)
    denoiser = load_trained(context, model_id, weights)
    from worker.handlers.translate import model_resolution

    resolution = int(configured or model_resolution(denoiser))
    sample = sample_images(context, folder, label_set_id, job.images, options["seed"])
    chunks = [sample[i:i + CHUNK_IMAGES] for i in range(0, len(sample), CHUNK_IMAGES)]
    translate_chunks(context, denoiser, folder, chunks, len(labels), resolution, options)
    patches = mine_parallel(context, folder, chunks, resolution, job.mine)
    features = patch_features(context, denoiser, folder, chunks, patches, len(labels), options["seed"])
    summary = cluster_and_write(context, folder, relative, run_id, labels, chunks, patches, features,
                                resolution, options, job)
    return finished(relative, summary)


def finished(relative: str, summary: dict) -> dict:
    return {"run": summary["run"], "summary": f"{relative}/summary.json", "images": len(summary["images"]),
            "labels": [label["name"] for label in summary["labels"]],
            "patches": sum(c["size"] for c in summary["clusters"]), "clusters": len(summary["clusters"]),
            "reconstruction_error": summary["reconstruction_error"]["mean"]}


# --- 1. sample ------------------------------------------------------------------------------------
def sample_images(context, folder: Path, label_set_id: int, count: int, seed: int) -> list[dict]:
    """[{"image_id", "path", "labels": [indices]}], seeded, written once (a resumed job reuses it)."""
    path = folder / "sample.json"
    if path.exists():
        return json.loads(path.read_text())
    with session_scope(context.settings) as session:
        everything = examples(session, context.settings, label_set_id=label_set_id)
        sizes = dict((i, (w, h)) for i, w, h in session.execute(
            select(Image.id, Image.width, Image.height).where(Image.id.in_([e.image_id for e in everything]))))
    chosen = sorted(random.Random(seed).sample(range(len(everything)), min(count, len(everything))))
    sample = [{"image_id": everything[i].image_id, "path": everything[i].path,
               "labels": everything[i].label_indices, "size": sizes[everything[i].image_id]} for i in chosen]
    write_json(path, sample)
    return sample


# --- 2. translate and score -----------------------------------------------------------------------
def chunk_file(folder: Path, number: int) -> Path:
    return folder / "chunks" / f"chunk-{number:05d}.npz"


def translate_chunks(context, denoiser, folder: Path, chunks, num_labels: int, resolution: int,
                     options: dict) -> None:
    import torch

    from worker.engine.data import load_views, multi_hot
    from worker.engine.presets import FAST
    from worker.engine.translation import translate_batch
    from worker.engine.typicality import typicality

    (folder / "chunks").mkdir(exist_ok=True)
    preset = FAST.with_(name=f"parallel-{options['draws']}", draws=options["draws"])
    eye = torch.eye(num_labels)
    for number, chunk in enumerate(chunks):
        target = chunk_file(folder, number)
        if not target.exists():
            images = load_views([e["path"] for e in chunk], resolution)
            conditions = multi_hot([e["labels"] for e in chunk], num_labels)
            results = translate_batch(denoiser, images, conditions, eye,
                                      invert_steps=options["invert_steps"], sample_steps=options["sample_steps"],
                                      guidance=options["guidance"], sdedit_strength=options["sdedit_strength"],
                                      seed=options["seed"], pnp=options["pnp"],
                                      invert_guidance=options["invert_guidance"])
            versions = torch.cat([r.images for r in results])  # [B * L, 3, R, R], label fastest
            maps = typicality(denoiser, versions, eye.repeat(len(chunk), 1), preset, seed=options["seed"]).maps
            maps = maps.reshape(len(chunk), num_labels, *maps.shape[1:]).float()
            cotypicality = maps.quantile(0.5, dim=1)  # the median over labels, per location
            temporary = target.with_suffix(".tmp.npz")
            np.savez(temporary, image_ids=np.array([e["image_id"] for e in chunk]),
                     versions=to_uint8(versions).reshape(len(chunk), num_labels, resolution, resolution, 3),
                     sources=to_uint8(images), maps=maps.numpy().astype(np.float16),
                     cotypicality=cotypicality.numpy().astype(np.float32),
                     reconstruction_error=np.array([r.reconstruction_error for r in results]))
            os.replace(temporary, target)
        done = sum(len(c) for c in chunks[:number + 1])
        context.progress(number + 1, len(chunks), f"translated {done} images into every label", stage="translate")
        context.check()


def to_uint8(images) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# --- 3. mine ------------------------------------------------------------------------------------
def mine_parallel(context, folder: Path, chunks, resolution: int, mine: ParallelMine) -> list[dict]:
    """Top boxes of every co-typicality map, then the best `patches` of the whole set."""
    import torch

    from worker.engine.patches import default_patch_size, patch_scores, top_boxes

    path = folder / "patches.json"
    if path.exists():
        return json.loads(path.read_text())
    patch_size = mine.patch_size or default_patch_size(resolution)
    per_image = mine.per_image
    candidates = []
    for number in range(len(chunks)):
        with np.load(chunk_file(folder, number)) as data:
            maps, ids = torch.from_numpy(data["cotypicality"]), data["image_ids"].tolist()
        scores = patch_scores(maps, resolution, patch_size)
        for index, (image_id, boxes) in enumerate(zip(ids, top_boxes(scores, patch_size, per_image))):
            for box in boxes:
                candidates.append({"image_id": image_id, "chunk": number, "index": index,
                                   "box": [float(v) for v in box[:4]], "cotypicality": float(box.score)})
    candidates.sort(key=lambda c: -c["cotypicality"])
    kept = candidates[: mine.patches]
    kept.sort(key=lambda c: (c["chunk"], c["index"], c["box"]))
    write_json(path, kept)
    context.progress(1, 1, f"{len(kept)} patches", stage="mine", force=True)
    return kept


# --- 4. features ----------------------------------------------------------------------------------
def patch_features(context, denoiser, folder: Path, chunks, patches: list[dict], num_labels: int,
                   seed: int) -> np.ndarray:
    """[n_patches, L * C]: each version's DIFT feature of the box, concatenated over labels."""
    import torch

    from worker.engine.dift import crop_features, dift_feature_map

    (folder / "features").mkdir(exist_ok=True)
    eye = torch.eye(num_labels)
    parts = []
    for number in range(len(chunks)):
        mine = [p for p in patches if p["chunk"] == number]
        target = folder / "features" / f"chunk-{number:05d}.npy"
        if mine and not target.exists():
            with np.load(chunk_file(folder, number)) as data:
                versions = data["versions"]
            rows = []
            for index in sorted({p["index"] for p in mine}):
                pixels = torch.from_numpy(versions[index]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
                maps = dift_feature_map(denoiser, pixels, eye, seed=seed)  # [L, C, h, w]
                boxes = [p["box"] for p in mine if p["index"] == index]
                per_label = [crop_features(maps[m], boxes, pixels.shape[-1]) for m in range(num_labels)]
                rows.append(torch.nn.functional.normalize(torch.cat(per_label, dim=1), dim=1))
            temporary = target.with_suffix(".tmp.npy")
            np.save(temporary, torch.cat(rows).numpy().astype(np.float32))
            os.replace(temporary, target)
        if mine:
            parts.append(np.load(target))
        context.progress(number + 1, len(chunks), "DIFT features of every version", stage="features")
        context.check()
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


# --- 5. clusters, crops, summary ----------------------------------------------------------------
def cluster_and_write(context, folder: Path, relative: str, run_id: int, labels, chunks, patches, features,
                      resolution: int, options: dict, job: ParallelJob) -> dict:
    import warnings

    from worker.engine.clustering import cluster_features, order_clusters

    sample = [e for chunk in chunks for e in chunk]
    errors = []
    for number in range(len(chunks)):
        with np.load(chunk_file(folder, number)) as data:
            errors += data["reconstruction_error"].tolist()
    clusters = []
    if len(patches):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer patches than clusters: fewer clusters
            clustering = cluster_features(features, k=job.mine.clusters,
                                          seed=options["seed"])
        scores = np.array([p["cotypicality"] for p in patches])
        ranked = order_clusters(clustering.assignments, clustering.distances, scores)
        (folder / "crops").mkdir(exist_ok=True)
        loaded: dict[int, dict] = {}  # the last chunk read
        for rank, cluster in enumerate(ranked):
            members = []
            for row in cluster.members[:MAX_MEMBERS_SHOWN].tolist():
                patch = patches[row]
                if patch["chunk"] not in loaded:
                    with np.load(chunk_file(folder, patch["chunk"])) as data:
                        loaded = {patch["chunk"]: {k: data[k] for k in ("versions", "sources", "maps")}}
                data = loaded[patch["chunk"]]
                members.append(member_entry(folder, relative, patch, data, labels, sample, resolution,
                                            float(clustering.distances[row])))
            clusters.append({"rank": rank, "size": len(cluster.members),
                             "median_cotypicality": cluster.median_typicality, "members": members})
    summary = {"run": run_id, "labels": [{"id": i, "name": n} for i, n in labels],
               "images": [e["image_id"] for e in sample], "params": job.model_dump(exclude_defaults=True),
               "resolution": resolution,
               "options": options,
               "reconstruction_error": {"mean": float(np.mean(errors)) if errors else None,
                                        "max": float(np.max(errors)) if errors else None},
               "clusters": clusters}
    write_json(folder / "summary.json", summary)
    context.progress(1, 1, f"{len(clusters)} clusters", stage="clusters", force=True)
    return summary


def member_entry(folder: Path, relative: str, patch: dict, data: dict, labels, sample, resolution: int,
                 distance: float) -> dict:
    """One cluster member: its source crop and one crop per label, each with its typicality."""
    import torch

    from worker.engine.patches import box_to_original
    from worker.handlers.translate import box_mean

    index, box = patch["index"], patch["box"]
    x0, y0, x1, y1 = crop_box(box, resolution)
    stem = f"{patch['image_id']}_{x0}_{y0}"
    source = torch.from_numpy(data["sources"][index]).permute(2, 0, 1).float().div(127.5).sub(1)
    save_png(source[:, y0:y1, x0:x1], folder / "crops" / f"{stem}_source.png")
    scores = box_mean(torch.from_numpy(data["maps"][index].astype(np.float32)), box, resolution)
    versions = []
    for m, (label_id, name) in enumerate(labels):
        pixels = torch.from_numpy(data["versions"][index, m]).permute(2, 0, 1).float().div(127.5).sub(1)
        save_png(pixels[:, y0:y1, x0:x1], folder / "crops" / f"{stem}_{label_id}.png")
        versions.append({"label": name, "label_id": label_id, "crop": f"{relative}/crops/{stem}_{label_id}.png",
                         "typicality": scores[m]})
    size = next(e["size"] for e in sample if e["image_id"] == patch["image_id"])
    return {"image_id": patch["image_id"], "box": box,
            "original_box": [round(v, 1) for v in box_to_original(box, resolution, size)[:4]],
            "cotypicality": patch["cotypicality"], "distance": distance,
            "source_crop": f"{relative}/crops/{stem}_source.png", "versions": versions}


def write_json(path: Path, value) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1, default=float))
    os.replace(temporary, path)
