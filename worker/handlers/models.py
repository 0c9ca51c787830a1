"""Loading and building denoisers for jobs, keeping the last ones loaded between jobs."""
from __future__ import annotations

from pathlib import Path

from app.settings import Settings
from worker.context import JobContext

MODELS_KEPT = 2


def device_of(settings: Settings) -> str:
    return settings.resolved_device()


def build_denoiser(backend: str, labels: list[str], config: dict, device: str):
    """A denoiser to train, on `device`: from `config["base"]` weights if given, else freshly
    initialised."""
    from worker.engine.registry import create_pixel_denoiser, load_denoiser

    base = config.get("base")
    if backend == "pixel":
        if base:
            denoiser = load_denoiser(base, device="cpu")
            if list(denoiser.labels) != list(labels):
                raise ValueError(f"base model {base} was trained on labels {denoiser.labels}, "
                                 f"not this label set's {labels}")
            return denoiser.to(device)
        return create_pixel_denoiser(labels, resolution=config["resolution"], seed=config["seed"],
                                     size=config.get("size", "small")).to(device)
    from worker.engine.stable_diffusion import StableDiffusionDenoiser

    if not base:
        raise ValueError("the stable-diffusion backend needs --base: a local diffusers folder "
                         "(or a hub id on a machine with hub access)")
    return StableDiffusionDenoiser.from_pretrained(
        base, labels=labels, prompt_template=config.get("prompt_template", "A photo of {label}."),
        null_prompt=config.get("null_prompt", "A photo."), lora_rank=config.get("lora_rank"),
        device=device)


def load_trained(context: JobContext, model_id: int, weights_dir: Path):
    """The trained denoiser of a model row, reused across jobs while the worker runs."""
    from worker.engine.registry import load_denoiser

    cache = context.models
    if model_id not in cache:
        while len(cache) >= MODELS_KEPT:
            cache.pop(next(iter(cache)))
        cache[model_id] = load_denoiser(weights_dir, device=device_of(context.settings))
    return cache[model_id]
