"""Loading and building denoisers for jobs, keeping the last ones loaded between jobs."""
from __future__ import annotations

from pathlib import Path

from app.settings import Settings
from worker.context import JobContext

MODELS_KEPT = 2


def device_of(settings: Settings) -> str:
    """The torch device of `settings.device`: "auto" is cuda, then mps, then cpu."""
    if settings.device != "auto":
        return settings.device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_trained(context: JobContext, model_id: int, weights_dir: Path):
    """The trained denoiser of a model row, reused across jobs while the worker runs."""
    from worker.engine.registry import load_denoiser

    cache = context.models
    if model_id not in cache:
        while len(cache) >= MODELS_KEPT:
            cache.pop(next(iter(cache)))
        cache[model_id] = load_denoiser(weights_dir, device=device_of(context.settings))
    return cache[model_id]


def run_view(record):
    """How a run's images are scored (`data.View`), from its `RunRecord`: the shorter side, whole
    or the old centre crop, and the model's backend's side multiple (registry.scoring_view)."""
    from worker.engine.registry import scoring_view

    return scoring_view(record.backend, record.view_size, whole=record.whole_view)
