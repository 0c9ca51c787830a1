"""Fine-tune (or train) a conditional denoiser on a dataset's label set.

In the worker's own process by default. With `processes` (or `accelerate_config`) in the model's
config, under `accelerate launch` on several GPUs or machines (worker/launched_training.py),
which builds the same denoiser and dataset from the same spec and calls the same `train`.
"""
from __future__ import annotations

from pathlib import Path

from app.db import session_scope
from app.models import TrainedModel
from app.services.runs import examples, labels_of
from worker.context import JobContext
from worker.handlers.evaluate import holdout_accuracy
from worker.handlers.models import build_denoiser, device_of


def run_train(context: JobContext) -> dict:
    spec = training_spec(context.settings, context.params["model_id"])
    if spec["config"]["steps"] == 0:
        denoiser, result = before_fine_tuning(context, spec)
    elif is_launched(spec["config"]):
        from worker.engine.registry import load_denoiser
        from worker.launched_training import launch_and_follow

        result = launch_and_follow(context, spec)
        denoiser = load_denoiser(spec["model_dir"], device=device_of(context.settings))
    else:
        denoiser, result = train_here(context, spec)
    return finish(context, spec, denoiser, result)


def is_launched(config: dict) -> bool:
    return bool(config.get("processes") or config.get("accelerate_config"))


def training_spec(settings, model_id: int) -> dict:
    """Everything training needs as plain JSON: what launched processes read instead of the
    database (on other machines they may not reach it)."""
    with session_scope(settings) as session:
        model = session.get(TrainedModel, model_id)
        model.status = "training"
        train_set = examples(session, settings, label_set_id=model.label_set_id, split="train")
        model_dir = settings.home_dir / model.weights_dir
        return {"model_id": model_id, "backend": model.backend, "config": dict(model.config),
                "label_set_id": model.label_set_id,
                "labels": [label.name for label in labels_of(session, model.label_set_id)],
                "paths": [e.path for e in train_set],
                "label_indices": [e.label_indices for e in train_set],
                "model_dir": str(model_dir), "checkpoint_dir": str(model_dir.parent / "checkpoints")}


def build_training(spec: dict, device: str):
    """The denoiser to train and its dataset, identical in the worker and in launched processes."""
    from worker.engine.data import ImageDataset, multi_hot

    denoiser = build_denoiser(spec["backend"], spec["labels"], spec["config"], device)
    dataset = ImageDataset(spec["paths"], multi_hot(spec["label_indices"], len(spec["labels"])),
                           resolution=spec["config"]["resolution"], train=True)
    return denoiser, dataset


def train_options(spec: dict) -> dict:
    """`train`'s keyword arguments from the model's config: one recipe for both paths."""
    config = spec["config"]
    return dict(steps=config["steps"], batch_size=config["batch_size"], seed=config["seed"],
                null_dropout=config.get("null_dropout", 0.1), lr=config.get("lr", 1e-4),
                checkpoint_dir=Path(spec["checkpoint_dir"]),
                checkpoint_every=config.get("checkpoint_every", 100))


def train_here(context: JobContext, spec: dict):
    from worker.engine.training import train

    denoiser, dataset = build_training(spec, device_of(context.settings))

    def progress(done: int, total: int, loss: float) -> None:
        context.progress(done, total, f"loss {loss:.4f}", stage="train")
        context.check()  # cancel or yield here; the last checkpoint makes the resume exact

    result = train(denoiser, dataset, **train_options(spec), progress=progress)
    denoiser.save(spec["model_dir"])
    return denoiser, result


def before_fine_tuning(context: JobContext, spec: dict):
    """`--steps 0`: the model as it starts (its `--base` weights, or a fresh initialisation),
    scored and mined like any other: the paper's "before fine-tuning" baseline."""
    from worker.engine.training import TrainResult

    denoiser, _ = build_training(spec, device_of(context.settings))
    denoiser.save(spec["model_dir"])
    return denoiser, TrainResult(steps=0, final_loss=None)


def finish(context: JobContext, spec: dict, denoiser, result) -> dict:
    """Holdout accuracy and metrics of the trained model; the model becomes ready."""
    config, model_id = spec["config"], spec["model_id"]
    context.progress(0, None, "holdout accuracy", stage="evaluate", force=True)
    accuracy = holdout_accuracy(context, denoiser, label_set_id=spec["label_set_id"],
                                draws=config.get("eval_draws", 16),
                                max_images=config.get("eval_images", 200), seed=config["seed"])
    metrics = {"final_loss": result.final_loss, "steps": result.steps,
               "loss_curve": result.losses[:: max(1, len(result.losses) // 200)], **accuracy}
    with session_scope(context.settings) as session:
        model = session.get(TrainedModel, model_id)
        model.metrics, model.status = metrics, "ready"
    return {"model": model_id, "steps": result.steps, "final_loss": result.final_loss,
            "classifier_accuracy": accuracy.get("classifier_accuracy")}
