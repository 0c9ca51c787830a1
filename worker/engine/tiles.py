"""Typicality of large images through overlapping tiles of the model's training size.

A pixel model trained on R x R crops has only seen R x R inputs. Scored whole, a large image puts
most pixels in contexts the model never saw: farther than R/2 from any border, and, for a UNet
that attends at its coarsest level, attention over many more tokens than in training. Tiles
show it exactly what it learnt from: R x R windows at a stride (R/2 by default), each scored
with the same draws as a whole image would be (`typicality.typicality`), and every pixel's value
the mean over the tiles that cover it. The cost is about (R / stride)^2 times the whole image's.

The image-level score is the mean of the assembled map, exactly. Its standard error is
approximate: each draw's image-level difference is taken as the tiles' per-draw means weighted
by the share of the map each tile makes up.
"""
from __future__ import annotations

import torch

from .denoiser import ConditionalDenoiser
from .presets import PAPER, TypicalityPreset
from .typicality import TypicalityResult, standard_error, typicality


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of side `tile` covering [0, length): every `stride`, and one flush
    with the far edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tiled_typicality(denoiser: ConditionalDenoiser, images: torch.Tensor, conditions: torch.Tensor,
                     preset: TypicalityPreset = PAPER, *, seed: int = 0, tile: int,
                     stride: int | None = None) -> TypicalityResult:
    """`typicality` of images [B, 3, H, W] (H, W >= tile) assembled from tile x tile windows."""
    stride = stride or max(1, tile // 2)
    batch, _, height, width = images.shape
    if min(height, width) < tile:
        raise ValueError(f"images of {height}x{width} are smaller than the {tile} px tiles")
    origins = [(y, x) for y in tile_origins(height, tile, stride) for x in tile_origins(width, tile, stride)]
    windows = torch.stack([images[:, :, y:y + tile, x:x + tile] for y, x in origins], dim=1)  # [B, T, 3, t, t]
    tiles = typicality(denoiser, windows.flatten(0, 1), conditions.repeat_interleave(len(origins), dim=0),
                       preset, seed=seed)
    tile_maps = tiles.maps.view(batch, len(origins), tile, tile).cpu()
    sums = torch.zeros(batch, height, width)
    cover = torch.zeros(height, width)
    for t, (y, x) in enumerate(origins):
        sums[:, y:y + tile, x:x + tile] += tile_maps[:, t]
        cover[y:y + tile, x:x + tile] += 1
    maps = sums / cover
    # Each tile's share of the assembled mean: the sum over its pixels of 1 / cover.
    shares = torch.stack([(1 / cover[y:y + tile, x:x + tile]).sum() for y, x in origins]) / (height * width)
    differences = (tiles.differences.view(batch, len(origins), -1).cpu() * shares[None, :, None]).sum(dim=1)
    used = tiles.draws.view(batch, len(origins)).min(dim=1).values
    return TypicalityResult(maps=maps, scores=maps.mean(dim=(1, 2)),
                            stderr=standard_error(differences, preset.timesteps, preset.round_size),
                            draws=used, differences=differences)
