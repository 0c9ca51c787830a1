"""Tiled typicality: tiles of the training size cover the image, and one tile is the image."""
import pytest
import torch
from conftest import blobs, planted_dataset

from worker.engine.data import multi_hot
from worker.engine.presets import FAST
from worker.engine.tiles import Tiling, stride_of, tile_origins, tiled_typicality, typicality_as_trained
from worker.engine.typicality import typicality

QUICK = FAST.with_(draws=4)


def test_tiles_cover_the_image_up_to_its_far_edge():
    assert tile_origins(32, 32, 16) == [0]
    assert tile_origins(64, 32, 16) == [0, 16, 32]
    assert tile_origins(70, 32, 16) == [0, 16, 32, 38]


def test_one_tile_is_the_whole_image(tiny_denoiser):
    images = blobs(2, 32, torch.Generator().manual_seed(0))
    conditions = multi_hot([0, 1], len(tiny_denoiser.labels))
    whole = typicality(tiny_denoiser, images, conditions, QUICK, seed=1)
    tiled = tiled_typicality(tiny_denoiser, images, conditions, QUICK, seed=1, tile=32)
    assert torch.allclose(tiled.maps, whole.maps.cpu(), atol=1e-6)
    assert torch.allclose(tiled.scores, whole.scores.cpu(), atol=1e-6)
    assert torch.allclose(tiled.stderr, whole.stderr.cpu(), atol=1e-6)


def test_a_mark_at_the_right_edge_is_found_through_tiles(planted_model):
    marked, _, masks = planted_dataset(2, seed=5)
    wide = torch.cat([blobs(1, 32, torch.Generator().manual_seed(6)), marked[:1]], dim=-1)
    mask = torch.cat([torch.zeros(32, 32, dtype=torch.bool), masks[0]], dim=-1)
    result = tiled_typicality(planted_model, wide, multi_hot([0], 2), FAST, seed=0, tile=32)
    assert result.maps.shape == (1, 32, 64)
    assert torch.allclose(result.scores, result.maps.mean(dim=(1, 2)), atol=1e-6)
    assert result.maps[0][mask].mean() > 3 * result.maps[0][~mask].mean()


def test_label_scores_through_tiles_agree_with_typicality_through_tiles(tiny_denoiser):
    from worker.engine.tiles import tiled_label_scores

    images = blobs(2, 48, torch.Generator().manual_seed(2))
    labels = len(tiny_denoiser.labels)
    every = tiled_label_scores(tiny_denoiser, images, QUICK, seed=1, tile=32, maps=True)
    own = tiled_typicality(tiny_denoiser, images, multi_hot([0, 1], labels), QUICK, seed=1, tile=32)
    assert every.maps.shape == (2, labels, 48, 48)
    assert torch.allclose(every.maps[0, 0], own.maps[0], atol=1e-5)
    assert torch.allclose(every.maps[1, 1], own.maps[1], atol=1e-5)
    # image-level values are the tiles' weighted by their share of the map: close to its mean
    assert torch.allclose(every.typicality[0, 0], own.scores[0], atol=1e-3)


def test_at_the_full_stride_each_pixel_is_its_own_tiles_value(tiny_denoiser):
    """Tiles side by side: four tiles for a 64 px image, each quarter of the map that tile
    scored alone, where the default stride (half) blends nine overlapping tiles."""
    images = blobs(1, 64, torch.Generator().manual_seed(3))
    conditions = multi_hot([1], len(tiny_denoiser.labels))
    full = typicality_as_trained(tiny_denoiser, images, conditions, QUICK, seed=1, tile_stride="full")
    for y in (0, 32):
        for x in (0, 32):
            alone = typicality(tiny_denoiser, images[..., y:y + 32, x:x + 32], conditions, QUICK, seed=1)
            assert torch.allclose(full.maps[0, y:y + 32, x:x + 32], alone.maps[0].cpu(), atol=1e-5)
    half = typicality_as_trained(tiny_denoiser, images, conditions, QUICK, seed=1)
    assert half.maps.shape == full.maps.shape == (1, 64, 64)
    assert not torch.allclose(half.maps, full.maps, atol=1e-3)
    assert len(Tiling(64, 64, 32, stride_of(32, "full")).origins) == 4
    assert len(Tiling(64, 64, 32, stride_of(32, "half")).origins) == 9


def test_a_stride_that_leaves_gaps_or_has_no_name_is_refused():
    with pytest.raises(ValueError, match="tile stride must be 1 to 32 px"):
        Tiling(96, 96, 32, stride=40)
    with pytest.raises(ValueError, match="unknown tile stride 'quarter'"):
        stride_of(32, "quarter")
