"""Find the backend that can read a saved model folder, and build new pixel models."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import View
from .denoiser import ConditionalDenoiser
from .pixel import CONFIG_NAME, PixelDenoiser

BACKENDS = ("pixel", "stable-diffusion")
#: A whole view rounds both sides of an image to a multiple of this (data.resized_size). Stable
#: Diffusion 1.x/2.x: the VAE encodes at 1/8 and the UNet halves the latents three times, 8 x 8 =
#: 64 px (`StableDiffusionDenoiser.side_multiple`). Pixel models take any size: scoring pads to
#: their UNet's multiple by reflection and cuts the padding out again (typicality.py).
SIDE_MULTIPLES = {"pixel": 1, "stable-diffusion": 64}


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


def scoring_view(backend: str, size: int, whole: bool = True) -> View:
    """How a `backend` model scores an image at shorter side `size`: whole or the centre crop."""
    if backend not in SIDE_MULTIPLES:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    return View(size, whole=whole, multiple=SIDE_MULTIPLES[backend])


def create_pixel_denoiser(labels: list[str], resolution: int = 32, seed: int = 0,
                          size: str = "small", attention: bool = True) -> PixelDenoiser:
    """A freshly initialised pixel denoiser (sizes: see `pixel.SIZES`)."""
    return PixelDenoiser.create(labels, resolution=resolution, size=size, seed=seed, attention=attention)
