"""Fine-tune (or train) a conditional denoiser on a dataset's label set."""
from __future__ import annotations

from app.db import session_scope
from app.models import TrainedModel
from app.services.runs import examples, labels_of
from worker.context import JobContext
from worker.handlers.evaluate import holdout_accuracy
from worker.handlers.models import build_denoiser


def run_train(context: JobContext) -> dict:
    from worker.engine.data import ImageDataset, multi_hot
    from worker.engine.training import train

    settings, model_id = context.settings, context.params["model_id"]
    with session_scope(settings) as session:
        model = session.get(TrainedModel, model_id)
        model.status = "training"
        labels = [l.name for l in labels_of(session, model.label_set_id)]
        train_set = examples(session, settings, label_set_id=model.label_set_id, split="train")
        config, backend, weights_dir = dict(model.config), model.backend, model.weights_dir
        label_set_id = model.label_set_id
    model_dir = settings.home_dir / weights_dir
    denoiser = build_denoiser(backend, labels, config, settings)
    dataset = ImageDataset([e.path for e in train_set],
                           multi_hot([e.label_indices for e in train_set], len(labels)),
                           resolution=config["resolution"], train=True)

    def progress(done: int, total: int, loss: float) -> None:
        context.progress(done, total, f"loss {loss:.4f}", stage="train")
        context.check()  # cancel or yield here; the last checkpoint makes the resume exact

    result = train(denoiser, dataset, steps=config["steps"], batch_size=config["batch_size"],
                   seed=config["seed"], null_dropout=config.get("null_dropout", 0.1),
                   lr=config.get("lr", 1e-4),
                   checkpoint_dir=model_dir.parent / "checkpoints",
                   checkpoint_every=config.get("checkpoint_every", 100), progress=progress)
    denoiser.save(model_dir)
    context.progress(0, None, "holdout accuracy", stage="evaluate", force=True)
    accuracy = holdout_accuracy(context, denoiser, label_set_id=label_set_id,
                                draws=config.get("eval_draws", 16),
                                max_images=config.get("eval_images", 200), seed=config["seed"])
    metrics = {"final_loss": result.final_loss, "steps": result.steps,
               "loss_curve": result.losses[:: max(1, len(result.losses) // 200)], **accuracy}
    with session_scope(settings) as session:
        model = session.get(TrainedModel, model_id)
        model.metrics, model.status = metrics, "ready"
    return {"model": model_id, "steps": result.steps, "final_loss": result.final_loss,
            "classifier_accuracy": accuracy.get("classifier_accuracy")}
