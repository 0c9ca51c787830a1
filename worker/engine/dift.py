"""DIFT-161 patch features (docs/method.md section 4; Tang et al. 2023, "Emergent Correspondence from
Image Diffusion").

A patch's feature is read from the fine-tuned denoiser itself: noise the whole image to t = 161
(of 1000 steps), run the UNet once with the image's label condition, take the output of its
second up-block (`up_blocks[1]`; 1/16 of the image for SD, 1/1 for the 32 px pixel model), average
over 8 noise draws, crop the patch's box from that map, mean-pool and L2-normalise.

The map does not depend on the box, so it is computed ONCE per image and every patch of the
image is cropped from it: `draws` forward passes per image instead of the reference code's
`draws` per patch (5x fewer with the paper's 5 patches per image).
`patch_features_per_patch` keeps the reference's way for checks and benchmarks.

Determinism: the noise draws are a function of `seed` only (the same draws for every image, as
the typicality draws are, from their own stream: worker/engine/streams.py), and the VAE posterior
sample of latent models is drawn with a generator re-seeded per image (the same latent the
typicality of that seed scores), so an image's features do not depend on its batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import pad_to_multiple
from .denoiser import ConditionalDenoiser
from .streams import generator

#: DIFT-161: the timestep on the 1000-step scale, the number of noise draws, the UNet block.
DIFT_T = 161
DIFT_DRAWS = 8
DIFT_MODULE = "up_blocks.1"


def dift_timestep(denoiser: ConditionalDenoiser, t: int = DIFT_T) -> int:
    """`t` on the 1000-step scale -> the model's schedule: round(t / 1000 * num_train_timesteps)."""
    if not 0 <= t < 1000:
        raise ValueError(f"t is on the 1000-step scale and must be in [0, 1000), got {t}")
    return min(round(t / 1000 * denoiser.num_train_timesteps), denoiser.num_train_timesteps - 1)


def dift_feature_map(denoiser: ConditionalDenoiser, images: torch.Tensor, conditions: torch.Tensor, *,
                     t: int = DIFT_T, draws: int = DIFT_DRAWS, module: str = DIFT_MODULE, seed: int = 0,
                     forward_batch: int = 64) -> torch.Tensor:
    """DIFT feature maps of whole images: [B, 3, H, W] in [-1, 1] + [B, n_labels] -> [B, C, h, w].

    All B x `draws` noisy copies run through the denoiser in chunks of `forward_batch`, under
    each image's own condition; `module`'s output is captured by a forward hook and averaged over
    the draws. Returns float32 on the denoiser's device. Runs in eval mode without autograd and
    restores the model's training flag.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if conditions.ndim != 2 or conditions.shape != (len(images), denoiser.num_labels):
        raise ValueError(f"conditions must be [{len(images)}, {denoiser.num_labels}], "
                         f"got shape {tuple(conditions.shape)}")
    if draws < 1 or forward_batch < 1:
        raise ValueError(f"need draws >= 1 and forward_batch >= 1, got {draws}, {forward_batch}")
    device = next(denoiser.parameters()).device
    timestep = dift_timestep(denoiser, t)

    with denoiser.inference():
        latents = _encode(denoiser, images.to(device), seed)
        noise = torch.randn((draws, *latents.shape[1:]), generator=generator(seed, "dift-noise"))
        noise = noise.to(device, latents.dtype)
        conditions = conditions.to(device)
        # Work items (image, draw), draws fastest; the map of image i sums rows i*draws..(i+1)*draws-1.
        items = torch.cartesian_prod(torch.arange(len(latents), device=device), torch.arange(draws, device=device))
        sums = None
        for part in items.split(forward_batch):
            image, draw = part.unbind(dim=1)
            timesteps = torch.full((len(part),), timestep, dtype=torch.long, device=device)
            noisy = denoiser.scheduler.add_noise(latents[image], noise[draw], timesteps)
            features = denoiser.block_output(module, noisy, timesteps, conditions[image]).float()
            if sums is None:
                sums = torch.zeros(len(latents), *features.shape[1:], device=device)
            sums.index_add_(0, image, features)
    return sums / draws


def crop_features(feature_map: torch.Tensor, boxes: Sequence[Sequence[float]],
                  image_size: int | Sequence[int]) -> torch.Tensor:
    """One image's patch features: [C, h, w] map + boxes in image pixels -> [n_boxes, C] unit rows.

    A box (x0, y0, x1, y1[, score]) in pixels of an `image_size` image (an int, or (H, W)) maps to
    grid cells [floor(x0 * w / W), floor(x1 * w / W)) as in the reference code, widened to at
    least one cell when it would be empty (a box smaller than a cell), then mean-pooled and
    L2-normalised.
    """
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be one image's [C, h, w], got shape {tuple(feature_map.shape)}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else map(int, image_size)
    channels, grid_h, grid_w = feature_map.shape
    rows = []
    for box in boxes:
        x0, y0, x1, y1 = box[:4]
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box {tuple(box[:4])} is not inside a {height}x{width} image")
        c0, c1 = _cells(x0, x1, width, grid_w)
        r0, r1 = _cells(y0, y1, height, grid_h)
        rows.append(feature_map[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    if not rows:
        return feature_map.new_zeros(0, channels)
    return F.normalize(torch.stack(rows).float(), dim=1)


def _cells(start: float, end: float, pixels: int, cells: int) -> tuple[int, int]:
    """Pixel interval -> grid cell interval, floor at both ends, at least one cell."""
    first = min(math.floor(start * cells / pixels), cells - 1)
    last = math.floor(end * cells / pixels)
    return first, max(last, first + 1)


def patch_features(denoiser: ConditionalDenoiser, images: torch.Tensor, conditions: torch.Tensor,
                   boxes: Sequence[Sequence[Sequence[float]]], **dift_options) -> list[torch.Tensor]:
    """Features of every image's boxes, one DIFT map per image: a list of [n_i, C] per image.

    `boxes[i]` are image i's boxes in model-resolution pixels; `dift_options` go to `dift_feature_map`.
    """
    if len(boxes) != len(images):
        raise ValueError(f"{len(images)} images but boxes for {len(boxes)}")
    # Any image size: padded to the UNet's multiple (boxes stay where they are), so the feature
    # grid covers the padded image.
    images = pad_to_multiple(images, denoiser.spatial_multiple * getattr(denoiser, "vae_scale_factor", 1))
    maps = dift_feature_map(denoiser, images, conditions, **dift_options)
    size = tuple(images.shape[-2:])
    return [crop_features(feature_map, image_boxes, size) for feature_map, image_boxes in zip(maps, boxes)]


def patch_features_per_patch(denoiser: ConditionalDenoiser, images: torch.Tensor, conditions: torch.Tensor,
                             boxes: Sequence[Sequence[Sequence[float]]], **dift_options) -> list[torch.Tensor]:
    """The reference code's way, for checks and benchmarks: a fresh DIFT map for every patch.

    Gives the same features as `patch_features` (same seed, same draws) at `draws` forward
    passes per patch instead of per image.
    """
    if len(boxes) != len(images):
        raise ValueError(f"{len(images)} images but boxes for {len(boxes)}")
    size = tuple(images.shape[-2:])
    features = []
    for image, condition, image_boxes in zip(images, conditions, boxes):
        rows = [crop_features(dift_feature_map(denoiser, image[None], condition[None], **dift_options)[0],
                              [box], size) for box in image_boxes]
        features.append(torch.cat(rows) if rows else torch.zeros(0, 0))
    return features


# --- helpers shared with nothing else: kept local so this module has no private imports --------
def _encode(denoiser: ConditionalDenoiser, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Encode one image at a time with a generator re-seeded per image, so a latent model's
    posterior sample does not depend on the batch (identity for pixel models)."""
    return torch.cat([denoiser.encode(image[None], generator=generator(seed, "vae-posterior"))
                      for image in images])


