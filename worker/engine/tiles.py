"""Typicality of large images through overlapping tiles of the model's training size.

A pixel model trained on R x R crops has only seen R x R inputs. Scored whole, a large image puts
most pixels in contexts the model never saw: farther than R/2 from any border, and, for a UNet
that attends at its coarsest level, attention over many more tokens than in training. Tiles
show it exactly what it learnt from: R x R windows at a stride (R/2 by default), each scored
with the same draws as a whole image would be (`typicality.typicality`), and every pixel's value
the mean over the tiles that cover it. The cost is about (R / stride)^2 times the whole image's.

Named strides (`TILE_STRIDES`, the score job's `tile_stride`): "half", R/2, the default, every
pixel away from the borders seen in 4 contexts; "full", R, tiles side by side, about 4x fewer
(bench/bench_planted_product.py measures both on a planted mark, docs/benchmarks.md).

The image-level score is the mean of the assembled map, exactly. Its standard error is
approximate: each draw's image-level difference is taken as the tiles' per-draw means weighted
by the share of the map each tile makes up.
"""
from __future__ import annotations

import torch

from .denoiser import ConditionalDenoiser
from .presets import PAPER, TypicalityPreset
from .typicality import LabelScores, TypicalityResult, label_scores, standard_error, typicality

#: stride name -> stride as a fraction of the tile side (app/catalog.py has the same names)
TILE_STRIDES = {"half": 0.5, "full": 1.0}


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of side `tile` covering [0, length): every `stride`, and one flush
    with the far edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


class Tiling:
    """Where the tiles of an image of (height, width) lie, and how their maps come back."""

    def __init__(self, height: int, width: int, tile: int, stride: int | None = None):
        if min(height, width) < tile:
            raise ValueError(f"images of {height}x{width} are smaller than the {tile} px tiles")
        stride = stride or max(1, tile // 2)
        if not 1 <= stride <= tile:
            # A stride beyond the tile would leave pixels no tile covers.
            raise ValueError(f"a tile stride must be 1 to {tile} px (the tile side), got {stride}")
        self.height, self.width, self.tile = height, width, tile
        self.origins = [(y, x) for y in tile_origins(height, tile, stride) for x in tile_origins(width, tile, stride)]
        self.cover = torch.zeros(height, width)
        for y, x in self.origins:
            self.cover[y:y + tile, x:x + tile] += 1
        #: each tile's share of the assembled mean: the sum over its pixels of 1 / cover
        self.shares = torch.stack([(1 / self.cover[y:y + tile, x:x + tile]).sum()
                                   for y, x in self.origins]) / (height * width)

    def cut(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B * T, C, tile, tile], the T tiles of each image together."""
        t = self.tile
        return torch.stack([images[..., y:y + t, x:x + t] for y, x in self.origins], dim=1).flatten(0, 1)

    def assemble(self, tile_maps: torch.Tensor, batch: int) -> torch.Tensor:
        """[B * T, ..., tile, tile] -> [B, ..., H, W]: each pixel the mean over its tiles."""
        t = self.tile
        tile_maps = tile_maps.cpu().view(batch, len(self.origins), *tile_maps.shape[1:])
        sums = torch.zeros(batch, *tile_maps.shape[2:-2], self.height, self.width)
        for index, (y, x) in enumerate(self.origins):
            sums[..., y:y + t, x:x + t] += tile_maps[:, index]
        return sums / self.cover

    def combine(self, per_tile: torch.Tensor, batch: int) -> torch.Tensor:
        """Image-level values from per-tile ones, weighted by the tiles' shares: [B * T, ...] -> [B, ...]."""
        values = per_tile.cpu().view(batch, len(self.origins), *per_tile.shape[1:])
        return (values * self.shares.view(1, -1, *[1] * (values.ndim - 2))).sum(dim=1)


def tiled_typicality(denoiser: ConditionalDenoiser, images: torch.Tensor, conditions: torch.Tensor,
                     preset: TypicalityPreset = PAPER, *, seed: int = 0, tile: int,
                     stride: int | None = None, draw_maps: bool = False) -> TypicalityResult:
    """`typicality` of images [B, 3, H, W] (H, W >= tile) assembled from tile x tile windows."""
    batch = len(images)
    tiling = Tiling(*images.shape[-2:], tile, stride)
    count = len(tiling.origins)
    tiles = typicality(denoiser, tiling.cut(images), conditions.repeat_interleave(count, dim=0), preset, seed=seed,
                       draw_maps=draw_maps)
    maps = tiling.assemble(tiles.maps, batch)
    differences = tiling.combine(tiles.differences, batch)
    return TypicalityResult(maps=maps, scores=maps.mean(dim=(1, 2)),
                            stderr=standard_error(differences, preset.timesteps, preset.round_size),
                            draws=tiles.draws.cpu().view(batch, count).min(dim=1).values, differences=differences,
                            draw_maps=tiling.assemble(tiles.draw_maps, batch) if draw_maps else None)


def tiled_label_scores(denoiser: ConditionalDenoiser, images: torch.Tensor, preset: TypicalityPreset = PAPER,
                       *, seed: int = 0, tile: int, stride: int | None = None, maps: bool = False) -> LabelScores:
    """`label_scores` of images [B, 3, H, W] assembled from tile x tile windows."""
    batch = len(images)
    tiling = Tiling(*images.shape[-2:], tile, stride)
    tiles = label_scores(denoiser, tiling.cut(images), preset, seed=seed, maps=maps)
    per_draw = tiling.combine(tiles.per_draw, batch)
    return LabelScores(null_loss=tiling.combine(tiles.null_loss, batch),
                       label_losses=tiling.combine(tiles.label_losses, batch), per_draw=per_draw,
                       stderr=standard_error(per_draw[:, :1] - per_draw[:, 1:], preset.timesteps, preset.round_size),
                       maps=tiling.assemble(tiles.maps, batch) if maps else None,
                       timesteps=preset.timesteps, round_size=preset.round_size)


# --- what the score job calls ----------------------------------------------------------------------
def stride_of(tile: int, name: str) -> int:
    """The stride in pixels of a named stride (`TILE_STRIDES`) for tiles of side `tile`."""
    if name not in TILE_STRIDES:
        raise ValueError(f"unknown tile stride {name!r}; choose one of {tuple(TILE_STRIDES)}")
    return max(1, round(tile * TILE_STRIDES[name]))


def training_tile(denoiser: ConditionalDenoiser, images: torch.Tensor) -> int | None:
    """The tile side to score `images` with: a pixel model's training crop side when the images
    are larger than its crops, else None (the whole image, which is what it trained on).

    Measured on an 8 px mark planted in 128 px images, models trained on 32 px crops
    (bench/bench_image_size.py, docs/benchmarks.md): the best box lay on the mark for 81-100%
    of the images through tiles, 21-40% through the whole image."""
    side = getattr(denoiser, "resolution", None)
    if getattr(denoiser, "backend", None) != "pixel" or not side or max(images.shape[-2:]) <= side:
        return None
    return side


def typicality_as_trained(denoiser: ConditionalDenoiser, images: torch.Tensor, conditions: torch.Tensor,
                          preset: TypicalityPreset = PAPER, *, seed: int = 0,
                          draw_maps: bool = False, tile_stride: str = "half") -> TypicalityResult:
    """`typicality`, through tiles of the training size at the named stride when the images
    are larger than it."""
    tile = training_tile(denoiser, images)
    if tile is None:
        return typicality(denoiser, images, conditions, preset, seed=seed, draw_maps=draw_maps)
    return tiled_typicality(denoiser, images, conditions, preset, seed=seed, tile=tile, draw_maps=draw_maps,
                            stride=stride_of(tile, tile_stride))


def passes_per_draw(denoiser: ConditionalDenoiser, images: torch.Tensor, tile_stride: str = "half") -> int:
    """Denoiser inputs one draw of one image costs per condition: its tiles, or 1."""
    tile = training_tile(denoiser, images)
    return 1 if tile is None else len(Tiling(*images.shape[-2:], tile, stride_of(tile, tile_stride)).origins)


def label_scores_as_trained(denoiser: ConditionalDenoiser, images: torch.Tensor,
                            preset: TypicalityPreset = PAPER, *, seed: int = 0, maps: bool = False,
                            tile_stride: str = "half") -> LabelScores:
    """`label_scores`, through tiles of the training size at the named stride when the images
    are larger than it."""
    tile = training_tile(denoiser, images)
    if tile is None:
        return label_scores(denoiser, images, preset, seed=seed, maps=maps)
    return tiled_label_scores(denoiser, images, preset, seed=seed, maps=maps, tile=tile,
                              stride=stride_of(tile, tile_stride))
