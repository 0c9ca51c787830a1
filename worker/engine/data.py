"""Labeled images as a torch Dataset, read from disk one at a time.

Items are `(image, condition)`: image [3, R, R] float in [-1, 1], condition [n_labels] float
multi-hot (all zeros = unlabeled). Images are composited over white when they have alpha,
resized so the shorter side is N (`image_size`, R unless given), then cropped to R x R: a random
crop for training, the center crop for the legacy square view.

Scoring sees the whole image (`View(size=N, whole=True)`): shorter side N, every pixel kept,
whatever the aspect ratio (for Stable Diffusion both sides rounded to multiples of 64 px,
`resized_size`); models from before image sizes existed score the centre crop
(`View(size=R, whole=False)`), as they always did.

Random crops are reproducible: index the dataset with `(index, crop_seed)` and the crop is a
pure function of that seed. `training.train` does this, deriving crop seeds from (seed, step),
which is what makes a resumed run identical to an uninterrupted one.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


def resized_size(original_size: Sequence[int], size: int, multiple: int = 1) -> tuple[int, int]:
    """(W', H') of an original (W, H) image resized so that its shorter side is `size`.

    The longer side is the nearest whole multiple of `multiple` px to its exact scaled length (at
    least `size`; `size` itself must be a multiple; Python's `round`, so a tie goes to the even
    multiple, as the pixel path always rounded). Stable Diffusion takes `multiple` = 64: its
    VAE works at 1/8 and its UNet halves the latents three times, so both sides must divide by 64.
    Rounding to the nearest multiple, rather than padding, keeps every latent cell on real image
    (padding would add up to 56 px of invented border) for an aspect error of at most 32 px on the
    longer side; and photos of nearby aspect ratios land on one shape, which keeps batches full
    (`load_view_groups`). The per-axis scales W'/W and H'/H carry the rounding, so boxes map back
    exactly (`patches.box_to_original`).
    """
    if multiple < 1 or size % multiple:
        raise ValueError(f"image size {size} is not a multiple of {multiple} px")
    width, height = original_size
    scale = size / min(width, height)
    return (max(size, round(width * scale / multiple) * multiple),
            max(size, round(height * scale / multiple) * multiple))


def resize_shorter_side(image: Image.Image, size: int, multiple: int = 1) -> Image.Image:
    """The image resized to `resized_size(image.size, size, multiple)`."""
    return image.resize(resized_size(image.size, size, multiple), Image.Resampling.BICUBIC, reducing_gap=3.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def pad_to_multiple(latents: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad [B, C, h, w] on the right and bottom, by reflection, up to multiples of `multiple`."""
    height, width = latents.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return latents
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(latents, (0, pad_w, 0, pad_h), mode=mode)


@dataclass(frozen=True)
class View:
    """How the model sees an image: shorter side resized to `size`, then the whole image, or
    (`whole=False`, the old square view) its centre `size` x `size` crop.

    `multiple`: the whole image's sides are rounded to multiples of it (`resized_size`; 64 for
    Stable Diffusion, 1 for pixel models, which pad instead). The centre crop ignores it: that
    view is kept exactly as models from before image sizes were scored."""

    size: int
    whole: bool = True
    multiple: int = 1

    def __post_init__(self):
        if self.whole:
            resized_size((self.size, self.size), self.size, self.multiple)  # refuses a size off the multiple

    @property
    def side_multiple(self) -> int:
        """The multiple the view's sides are rounded to (1 for the centre crop)."""
        return self.multiple if self.whole else 1

    def load(self, path: str | Path) -> torch.Tensor:
        """[3, H, W] in [-1, 1]: H, W >= size, the shorter one == size."""
        return self.load_pil(load_rgb(path))

    def load_pil(self, image: Image.Image) -> torch.Tensor:
        image = resize_shorter_side(image.convert("RGB"), self.size, self.side_multiple)
        return to_tensor(image if self.whole else ImageDataset.centre_crop(image, self.size))

    def shape_of(self, original_size: Sequence[int]) -> tuple[int, int]:
        """(H, W) of the view of an original (W, H) image, without loading it."""
        if not self.whole:
            return self.size, self.size
        width, height = resized_size(original_size, self.size, self.multiple)
        return height, width


def load_view_groups(paths: Sequence[str | Path], view: View) -> list[tuple[list[int], torch.Tensor]]:
    """The images as `view` shows them, stacked by shape: [(indices into paths, [B, 3, H, W])].
    Square views make one group; photos of a few aspect ratios a few."""
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for index, path in enumerate(paths):
        image = view.load(path)
        groups.setdefault(tuple(image.shape[1:]), []).append((index, image))
    return [([i for i, _ in members], torch.stack([image for _, image in members]))
            for members in groups.values()]


def load_views(paths: Sequence[str | Path], resolution: int) -> torch.Tensor:
    """The images as the model scores them, [B, 3, R, R] in [-1, 1]: shorter side resized to R,
    centre crop (what `ImageDataset(train=False)` gives, without conditions)."""
    return torch.stack([View(resolution, whole=False).load(p) for p in paths])


class ImageDataset(torch.utils.data.Dataset):
    """(image paths, multi-hot rows) -> (image [3, R, R] in [-1, 1], condition [L])."""

    #: `training.train` passes `(index, crop_seed)` keys to datasets that set this.
    accepts_seeded_keys = True

    def __init__(self, paths: Sequence[str | Path], conditions: torch.Tensor, resolution: int,
                 train: bool = True, image_size: int | None = None):
        conditions = torch.as_tensor(conditions, dtype=torch.float32)
        if conditions.ndim != 2 or conditions.shape[0] != len(paths):
            raise ValueError(f"need one condition row per path: {len(paths)} paths, "
                             f"conditions of shape {tuple(conditions.shape)}")
        self.paths = [Path(p) for p in paths]
        self.conditions = conditions
        self.resolution = resolution
        #: the shorter side the image is resized to before an R x R crop is taken
        self.image_size = image_size or resolution
        if self.image_size < resolution:
            raise ValueError(f"image size {self.image_size} is smaller than the crops ({resolution} px)")
        self.train = train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, crop_seed = key if isinstance(key, tuple) else (key, None)
        image = resize_shorter_side(load_rgb(self.paths[index]), self.image_size)
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
