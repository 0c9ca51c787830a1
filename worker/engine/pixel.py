"""A small class-conditional pixel-space denoiser: the backend that trains on a laptop CPU.

`PixelDenoiser` wraps a diffusers `UNet2DModel` that denoises 32 or 64 px RGB images directly
(`encode`/`decode` are the identity, so typicality maps are per pixel).

How a multi-hot condition reaches the UNet
------------------------------------------
The UNet is built with `class_embed_type="identity"`: it adds whatever vector it receives as
`class_labels` to its timestep embedding, and every ResNet block reads that sum. We compute the
vector ourselves from a learned table with one row per label plus one learned null row:

    embedding(c) = c @ label_embedding     if c has any non-zero entry (sum of its labels' rows)
                 = null_embedding          if c is all zeros (the unconditional model)

A sum (rather than a mean) keeps a one-hot condition equal to its label's row and lets a
multi-label image (two diseases) carry both signals; the null condition gets its own row
instead of the zero vector so that "no label" is something the model learns, not a special
case of "a label with zero weight". Fractional multi-hot rows work too (a weighted sum).

Saved as a diffusers-style folder::

    folder/diffmine.json                      {"backend": "pixel", "labels": [...], "resolution": 32, ...}
    folder/unet/config.json                   UNet2DModel.save_pretrained (safetensors)
    folder/unet/diffusion_pytorch_model.safetensors
    folder/condition_embedding.safetensors    label_embedding [L, D], null_embedding [D]
    folder/scheduler/scheduler_config.json    the DDPM noise schedule used in training
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from .denoiser import ConditionalDenoiser

CONFIG_NAME = "diffmine.json"
EMBEDDING_NAME = "condition_embedding.safetensors"

#: UNet widths per size name. "small" is the reference CPU model (~1.1M parameters at 32 px,
#: ~0.5 s per training step at batch 32 on 2 cores); "tiny" is for tests.
SIZES: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=16),
    "small": dict(block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=32),
    "base": dict(block_out_channels=(64, 128, 128), norm_num_groups=32, attention_head_dim=32),
}
RESOLUTIONS = (32, 64)


def unet_config(resolution: int, size: str = "small", attention: bool = True) -> dict:
    """UNet2DModel kwargs for a size name: down-sample to 8x8 and attend only there.

    Attention is quadratic in the number of pixels, so it is kept at the coarsest level (64
    tokens); 64 px models get one more level than 32 px ones instead of attention at 16x16.
    `attention=False` makes the UNet purely convolutional: what it learns from a crop holds at
    every position and every image size (bench/bench_image_size.py measures the difference).
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"pixel backend supports resolutions {RESOLUTIONS}, got {resolution}")
    if size not in SIZES:
        raise ValueError(f"unknown pixel model size {size!r}; choose from {sorted(SIZES)}")
    widths = SIZES[size]["block_out_channels"]
    levels = int(math.log2(resolution // 8)) + 1  # 32 px -> 3 levels, 64 px -> 4
    widths = widths + (widths[-1],) * (levels - len(widths))
    return dict(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D" if attention else "DownBlock2D",),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        norm_num_groups=SIZES[size]["norm_num_groups"],
        attention_head_dim=SIZES[size]["attention_head_dim"],
        class_embed_type="identity",
    )


class PixelDenoiser(ConditionalDenoiser):
    """eps_theta(x_t, t, c) in pixel space; see the module docstring for the conditioning."""

    backend = "pixel"

    def __init__(self, labels: list[str], unet: UNet2DModel, scheduler: DDPMScheduler | None = None,
                 size: str | None = None):
        super().__init__()
        if unet.config.class_embed_type != "identity":
            raise ValueError("PixelDenoiser needs a UNet2DModel built with class_embed_type='identity'")
        if len(labels) == 0:
            raise ValueError("a conditional denoiser needs at least one label")
        self.labels = list(labels)
        self.size = size
        self._unet = unet
        self.scheduler = scheduler or DDPMScheduler(num_train_timesteps=self.num_train_timesteps)
        dim = self.embedding_dim
        # Unit-scale rows: the timestep embedding they are added to is O(1), so the label signal
        # is visible to every ResNet block from the first step.
        self.label_embedding = torch.nn.Parameter(torch.randn(len(labels), dim))
        self.null_embedding = torch.nn.Parameter(torch.zeros(dim))

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, labels: list[str], resolution: int = 32, size: str = "small",
               seed: int = 0, attention: bool = True) -> PixelDenoiser:
        """A freshly initialised model; the same seed gives the same weights."""
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            unet = UNet2DModel(**unet_config(resolution, size, attention))
            return cls(labels, unet, size=size)

    @property
    def unet(self) -> UNet2DModel:
        return self._unet

    @property
    def resolution(self) -> int:
        return int(self._unet.config.sample_size)

    @property
    def embedding_dim(self) -> int:
        # UNet2DModel's time embedding width, which the identity class embedding must match.
        return self._unet.time_embedding.linear_2.out_features

    @property
    def device(self) -> torch.device:
        return self.null_embedding.device

    # --- the model ------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def condition_embedding(self, conditions: torch.Tensor) -> torch.Tensor:
        """[B, n_labels] multi-hot -> [B, D]: sum of label rows, or the null row for all-zero rows."""
        if conditions.ndim != 2 or conditions.shape[1] != self.num_labels:
            raise ValueError(f"conditions must be [B, {self.num_labels}], got {tuple(conditions.shape)}")
        conditions = conditions.to(self.label_embedding.dtype)
        summed = conditions @ self.label_embedding
        is_null = (conditions == 0).all(dim=1, keepdim=True)
        return torch.where(is_null, self.null_embedding.expand_as(summed), summed)

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                      conditions: torch.Tensor) -> torch.Tensor:
        if noisy.shape[0] != conditions.shape[0]:
            raise ValueError(f"{noisy.shape[0]} images but {conditions.shape[0]} conditions")
        return self._unet(noisy, timesteps, class_labels=self.condition_embedding(conditions)).sample

    # --- persistence ----------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        save_file({"label_embedding": self.label_embedding.detach().contiguous().cpu(),
                   "null_embedding": self.null_embedding.detach().contiguous().cpu()},
                  folder / EMBEDDING_NAME)
        config = {"backend": self.backend, "labels": self.labels, "resolution": self.resolution,
                  "size": self.size, "num_train_timesteps": self.num_train_timesteps,
                  "prediction_type": "epsilon", "parameters": sum(p.numel() for p in self.parameters())}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> PixelDenoiser:
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        if config.get("backend") != cls.backend:
            raise ValueError(f"{folder} holds a {config.get('backend')!r} model, not a pixel one")
        unet = UNet2DModel.from_pretrained(folder / "unet")
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        model = cls(config["labels"], unet, scheduler, size=config.get("size"))
        weights = load_file(folder / EMBEDDING_NAME)
        with torch.no_grad():
            model.label_embedding.copy_(weights["label_embedding"])
            model.null_embedding.copy_(weights["null_embedding"])
        return model.to(device).eval()
