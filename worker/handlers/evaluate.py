"""The diffusion classifier on the holdout split: how well the model learned the labels."""
from __future__ import annotations

from app.db import session_scope
from app.services.runs import examples
from worker.context import JobContext

BATCH = 32


def holdout_accuracy(context: JobContext, denoiser, *, label_set_id: int, draws: int,
                     max_images: int, seed: int) -> dict:
    """Top-1 accuracy of argmin-loss over labels (correct if it is one of the image's labels)."""
    import torch

    from worker.engine.data import ImageDataset, multi_hot
    from worker.engine.presets import FAST
    from worker.engine.typicality import label_scores

    with session_scope(context.settings) as session:
        holdout = examples(session, context.settings, label_set_id=label_set_id, split="holdout")
    holdout = spread_sample(holdout, max_images)
    if not holdout:
        return {}
    preset = FAST.with_(name=f"classifier-{draws}", draws=draws)
    dataset = ImageDataset([e.path for e in holdout],
                           multi_hot([e.label_indices for e in holdout], denoiser.num_labels),
                           resolution=denoiser_resolution(denoiser), train=False)
    correct = 0
    for start in range(0, len(holdout), BATCH):
        chunk = range(start, min(start + BATCH, len(holdout)))
        images = torch.stack([dataset[i][0] for i in chunk])
        predicted = label_scores(denoiser, images, preset, seed=seed).predicted.tolist()
        correct += sum(p in holdout[i].label_indices for i, p in zip(chunk, predicted))
        context.progress(chunk.stop, len(holdout), "holdout classifier", stage="evaluate")
        context.check()
    return {"classifier_accuracy": correct / len(holdout), "chance": 1 / denoiser.num_labels,
            "classifier_images": len(holdout), "classifier_draws": draws}


def spread_sample(items: list, count: int) -> list:
    """At most `count` of `items`, evenly spaced through them (deterministic, no seed needed)."""
    return items[:: max(1, len(items) // count)][:count]


def denoiser_resolution(denoiser) -> int:
    return int(getattr(denoiser, "resolution", 512))


def run_evaluate(context: JobContext) -> dict:
    """Holdout diffusion-classifier accuracy, AUC-PR of typicality maps against annotated boxes,
    and how much of each label's top cluster lies on a planted mark."""
    from app.models import MiningRun
    from app.services.runs import load_run
    from worker.models import load_trained

    job = context.job
    run_id = job.run_id
    with session_scope(context.settings) as session:
        record = load_run(session, context.settings, run_id)
    denoiser = load_trained(context, record.model_id, record.weights)
    result = holdout_accuracy(context, denoiser, label_set_id=record.label_set_id, draws=job.draws,
                              max_images=job.max_images, seed=record.params.seed)
    from worker.models import run_view

    view = run_view(record)
    result.update(box_metrics(context, run_id, record.label_set_id, view))
    result.update(mark_overlap(context, run_id))
    with session_scope(context.settings) as session:
        run = session.get(MiningRun, run_id)
        run.params = {**run.params, "evaluation": result}
    return {"run": run_id, **result}


def box_metrics(context: JobContext, run_id: int, label_set_id: int, view) -> dict:
    """AUC-PR of the per-pixel typicality map against region boxes (the paper's X-ray metric).

    A box labeled with one of the label set's names is scored against that label's map; an
    unnamed box or a planted "mark" against the image's own label's map."""
    import numpy as np
    from sklearn.metrics import average_precision_score
    from sqlalchemy import select

    from app.models import Image, ImageLabel, ImageScore, Label
    from worker.engine.patches import box_to_model

    with session_scope(context.settings) as session:
        names = dict(session.execute(select(Label.name, Label.id).where(Label.label_set_id == label_set_id)).all())
        # Own labels' maps only: all_labels runs keep a map under every label too, and a box
        # shows where the image's label is, not where another label would be.
        rows = session.execute(
            select(Image.width, Image.height, Image.extra, ImageScore.label_id, ImageScore.map_path)
            .join(ImageScore, ImageScore.image_id == Image.id)
            .join(ImageLabel, (ImageLabel.image_id == ImageScore.image_id)
                  & (ImageLabel.label_id == ImageScore.label_id))
            .where(ImageScore.run_id == run_id, Image.extra.is_not(None),
                   ImageScore.map_path.is_not(None))).all()
    truths, scores = [], []
    for width, height, extra, label_id, map_path in rows:
        boxes = [b for b in (extra or {}).get("boxes", [])
                 if names.get(b[4] if len(b) > 4 else None, label_id) == label_id]
        if not boxes:
            continue
        heat = upsampled_map(context.settings, map_path, view.shape_of((width, height)))
        mask = np.zeros_like(heat, dtype=bool)
        for box in boxes:
            x0, y0, x1, y1 = (int(round(v)) for v in box_to_model(box[:4], view.size, (width, height),
                                                                  whole=view.whole, multiple=view.multiple))
            mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
        truths.append(mask.ravel())
        scores.append(heat.ravel())
    if not truths or not np.concatenate(truths).any():
        return {}
    truth, score = np.concatenate(truths), np.concatenate(scores)
    return {"box_auc_pr": float(average_precision_score(truth, score)),
            "box_positive_rate": float(truth.mean()), "box_images": len(truths)}


def upsampled_map(settings, map_path: str, shape: tuple[int, int]):
    """The stored map resized to the (H, W) view it was computed on."""
    import numpy as np
    from PIL import Image as PILImage

    file, key = map_path.rsplit(":", 1)
    with np.load(settings.home_dir / file) as data:
        small = data[key].astype(np.float32)
    height, width = shape
    return np.asarray(PILImage.fromarray(small, mode="F").resize((width, height), PILImage.Resampling.BILINEAR))


def mark_overlap(context: JobContext, run_id: int) -> dict:
    """Per label with planted marks: the fraction of its top cluster's members (and of all its
    mined patches) whose box overlaps a mark. Clusters marked as artifacts do not count."""
    from sqlalchemy import and_, func, select

    from app.models import Cluster, ClusterMember, Image, Label, Patch

    with session_scope(context.settings) as session:
        rows = session.execute(
            select(Label.name, Patch.id, Patch.x0, Patch.y0, Patch.x1, Patch.y1, Image.extra)
            .join(Patch, Patch.label_id == Label.id).join(Image, Image.id == Patch.image_id)
            .where(Patch.run_id == run_id)).all()
        kept = (Cluster.run_id == run_id, Cluster.is_artifact.is_(False))
        first = (select(Cluster.label_id, func.min(Cluster.rank).label("rank")).where(*kept)
                 .group_by(Cluster.label_id).subquery())
        top = set(session.scalars(
            select(ClusterMember.patch_id).join(Cluster, Cluster.id == ClusterMember.cluster_id)
            .join(first, and_(first.c.label_id == Cluster.label_id, first.c.rank == Cluster.rank))
            .where(*kept)))
    per_label: dict[str, dict] = {}
    for label, patch_id, x0, y0, x1, y1, extra in rows:
        marks = [b for b in (extra or {}).get("boxes", []) if len(b) > 4 and b[4] == "mark"]
        stats = per_label.setdefault(label, {"marked": False, "all": [0, 0], "top": [0, 0]})
        stats["marked"] |= bool(marks)
        hit = any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in marks)
        for key in ("all",) + (("top",) if patch_id in top else ()):
            stats[key][0] += hit
            stats[key][1] += 1
    overlap = {label: {"top_cluster": s["top"][0] / s["top"][1] if s["top"][1] else None,
                       "all_patches": s["all"][0] / s["all"][1]}
               for label, s in per_label.items() if s["marked"]}
    return {"mark_overlap": overlap} if overlap else {}
