"""Fine-tune (or train) a conditional denoiser on a dataset's label set.

In the worker's own process by default. With `processes` (or `accelerate_config`) in the model's
config, under `accelerate launch` on several GPUs or machines (worker/launched_training.py),
which builds the same denoiser and dataset from the same spec and calls the same `train`.
"""
from __future__ import annotations

from app.db import session_scope
from app.models import TrainedModel
from app.params import TrainConfig
from worker.context import JobContext
from worker.handlers.evaluate import holdout_accuracy
from worker.models import device_of
from worker.training_spec import build_training, train_options, training_spec


def run_train(context: JobContext) -> dict:
    spec = training_spec(context.settings, context.job.model_id)
    config = TrainConfig.model_validate(spec["config"])
    if config.steps == 0:
        denoiser, result = before_fine_tuning(context, spec)
    elif config.launched:
        from worker.engine.registry import load_denoiser
        from worker.launched_training import launch_and_follow

        result = launch_and_follow(context, spec)
        denoiser = load_denoiser(spec["model_dir"], device=device_of(context.settings))
    else:
        denoiser, result = train_here(context, spec)
    return finish(context, spec, denoiser, result)


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
    config, model_id = TrainConfig.model_validate(spec["config"]), spec["model_id"]
    context.progress(0, None, "holdout accuracy", stage="evaluate", force=True)
    accuracy = holdout_accuracy(context, denoiser, label_set_id=spec["label_set_id"],
                                draws=config.eval_draws, max_images=config.eval_images,
                                seed=config.seed)
    metrics = {"final_loss": result.final_loss, "steps": result.steps,
               "loss_curve": result.losses[:: max(1, len(result.losses) // 200)], **accuracy}
    with session_scope(context.settings) as session:
        model = session.get(TrainedModel, model_id)
        model.metrics, model.status = metrics, "ready"
    return {"model": model_id, "steps": result.steps, "final_loss": result.final_loss,
            "classifier_accuracy": accuracy.get("classifier_accuracy")}
