"""What training needs, as plain JSON and built from it: the same in the worker's own process
and in processes started by `accelerate launch` (worker/launched_training.py), which read the
spec instead of the database (on other machines they may not reach it)."""
from __future__ import annotations

from pathlib import Path

from app.db import session_scope
from app.models import TrainedModel
from app.params import TrainConfig
from app.services.runs import examples, labels_of


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

    config = TrainConfig.model_validate(spec["config"])
    denoiser = build_denoiser(spec["backend"], spec["labels"], config, device)
    dataset = ImageDataset(spec["paths"], multi_hot(spec["label_indices"], len(spec["labels"])),
                           resolution=config.resolution, image_size=config.image_size, train=True)
    return denoiser, dataset


def train_options(spec: dict) -> dict:
    """`train`'s keyword arguments from the model's config: one recipe for both paths."""
    config = TrainConfig.model_validate(spec["config"])
    return dict(steps=config.steps, batch_size=config.batch_size, seed=config.seed,
                null_dropout=config.null_dropout, lr=config.learning_rate,
                checkpoint_dir=Path(spec["checkpoint_dir"]), checkpoint_every=config.checkpoint_every)


def build_denoiser(backend: str, labels: list[str], config: TrainConfig, device: str):
    """A denoiser to train, on `device`: from `config.base` weights if given, else freshly
    initialised."""
    from worker.engine.registry import create_pixel_denoiser, load_denoiser

    base = config.base
    if backend == "pixel":
        if base:
            denoiser = load_denoiser(base, device="cpu")
            if list(denoiser.labels) != list(labels):
                raise ValueError(f"base model {base} was trained on labels {denoiser.labels}, "
                                 f"not this label set's {labels}")
            return denoiser.to(device)
        return create_pixel_denoiser(labels, resolution=config.resolution, seed=config.seed,
                                     size=config.size or "small").to(device)
    from worker.engine.stable_diffusion import StableDiffusionDenoiser

    if not base:
        raise ValueError("the stable-diffusion backend needs --base: a local diffusers folder "
                         "(or a hub id on a machine with hub access)")
    return StableDiffusionDenoiser.from_pretrained(
        base, labels=labels, prompt_template=config.prompt_template,
        null_prompt=config.null_prompt, lora_rank=config.lora_rank,
        device=device)
