"""Find the backend that can read a saved model folder, and build new pixel models."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .denoiser import ConditionalDenoiser
from .pixel import CONFIG_NAME, PixelDenoiser

BACKENDS = ("pixel", "stable-diffusion")


def read_model_config(folder: str | Path) -> dict:
    """The folder's diffmine.json, with a clear error when the folder is not a saved model."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a diffmine model folder (no {CONFIG_NAME})")
    return json.loads(path.read_text())


def load_denoiser(folder: str | Path, device: str | torch.device = "cpu") -> ConditionalDenoiser:
    """Load a saved denoiser, whatever its backend, in eval mode on `device`."""
    backend = read_model_config(folder).get("backend")
    if backend == "pixel":
        return PixelDenoiser.load(folder, device)
    if backend == "stable-diffusion":
        # Imported lazily: the SD backend pulls in transformers, which pixel-only users skip.
        from .stable_diffusion import StableDiffusionDenoiser
        return StableDiffusionDenoiser.load(folder, device)
    raise ValueError(f"{folder}: unknown backend {backend!r}; known: {BACKENDS}")


def create_pixel_denoiser(labels: list[str], resolution: int = 32, seed: int = 0,
                          size: str = "small", attention: bool = True) -> PixelDenoiser:
    """A freshly initialised pixel denoiser (sizes: see `pixel.SIZES`)."""
    return PixelDenoiser.create(labels, resolution=resolution, size=size, seed=seed, attention=attention)
