"""Labeled images as a torch Dataset, read from disk one at a time.

Items are `(image, condition)`: image [3, R, R] float in [-1, 1], condition [n_labels] float
multi-hot (all zeros = unlabeled). Images are composited over white when they have alpha,
resized so the shorter side is R, then cropped to R x R: a random crop for training, the
center crop for scoring (so typicality maps align with a known region of the image).

Random crops are reproducible: index the dataset with `(index, crop_seed)` and the crop is a
pure function of that seed. `training.train` does this, deriving crop seeds from (seed, step),
which is what makes a resumed run identical to an uninterrupted one.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def multi_hot(label_indices: Sequence[Sequence[int] | int], num_labels: int) -> torch.Tensor:
    """[N, num_labels] float rows from label indices (an int or a list of ints per image)."""
    rows = torch.zeros(len(label_indices), num_labels)
    for row, indices in enumerate(label_indices):
        indices = [indices] if isinstance(indices, int) else list(indices)
        if any(not 0 <= i < num_labels for i in indices):
            raise ValueError(f"image {row}: label indices {indices} outside [0, {num_labels})")
        rows[row, indices] = 1.0
    return rows


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; transparent pixels become white rather than black."""
    with Image.open(path) as image:
        image.load()
        has_alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
        if not has_alpha:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def load_views(paths: Sequence[str | Path], resolution: int) -> torch.Tensor:
    """The images as the model scores them, [B, 3, R, R] in [-1, 1]: shorter side resized to R,
    centre crop (what `ImageDataset(train=False)` gives, without conditions)."""
    return torch.stack([to_tensor(ImageDataset.centre_crop(resize_shorter_side(load_rgb(p), resolution),
                                                          resolution)) for p in paths])


class ImageDataset(torch.utils.data.Dataset):
    """(image paths, multi-hot rows) -> (image [3, R, R] in [-1, 1], condition [L])."""

    #: `training.train` passes `(index, crop_seed)` keys to datasets that set this.
    accepts_seeded_keys = True

    def __init__(self, paths: Sequence[str | Path], conditions: torch.Tensor, resolution: int,
                 train: bool = True):
        conditions = torch.as_tensor(conditions, dtype=torch.float32)
        if conditions.ndim != 2 or conditions.shape[0] != len(paths):
            raise ValueError(f"need one condition row per path: {len(paths)} paths, "
                             f"conditions of shape {tuple(conditions.shape)}")
        self.paths = [Path(p) for p in paths]
        self.conditions = conditions
        self.resolution = resolution
        self.train = train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, crop_seed = key if isinstance(key, tuple) else (key, None)
        image = resize_shorter_side(load_rgb(self.paths[index]), self.resolution)
        return to_tensor(self.crop(image, crop_seed)), self.conditions[index]

    def crop(self, image: Image.Image, crop_seed: int | None) -> Image.Image:
        if not self.train:
            return self.centre_crop(image, self.resolution)
        width, height = image.size
        size = self.resolution
        # Without a seed, Python's global RNG: fine for ad-hoc loaders, not for exact resume.
        rng = random.Random(crop_seed) if crop_seed is not None else random
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
        return image.crop((left, top, left + size, top + size))

    @staticmethod
    def centre_crop(image: Image.Image, size: int) -> Image.Image:
        width, height = image.size
        left, top = (width - size) // 2, (height - size) // 2
        return image.crop((left, top, left + size, top + size))
