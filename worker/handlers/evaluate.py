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
    holdout = holdout[:: max(1, len(holdout) // max_images)][:max_images]
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


def denoiser_resolution(denoiser) -> int:
    return int(getattr(denoiser, "resolution", 512))
