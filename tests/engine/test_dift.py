"""DIFT-161 features: one map per image equals the reference's map per patch, at fewer passes."""
from __future__ import annotations

import pytest
import torch

from worker.engine.dift import crop_features, dift_feature_map, dift_timestep, patch_features, patch_features_per_patch
from worker.engine.patches import patch_scores, top_boxes
from worker.engine.registry import create_pixel_denoiser

RESOLUTION = 32


@pytest.fixture(scope="module")
def denoiser():
    # Built here rather than taken from conftest so these tests do not depend on its fixtures.
    return create_pixel_denoiser(["marked", "plain"], resolution=RESOLUTION, seed=0, size="tiny").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=g) * 2 - 1
    conditions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = patch_scores(torch.randn(2, 8, 8, generator=g), RESOLUTION, 6)
    return images, conditions, top_boxes(scores, 6, per_image=3)  # 3, not 5: keeps the test fast


class PassCounter:
    """Counts UNet forward calls and the images (batch rows) they process."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = self.rows = 0
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, _module, inputs):
        self.calls += 1
        self.rows += inputs[0].shape[0]


def test_feature_map_is_up_blocks_1_averaged_over_draws(denoiser, batch):
    images, conditions, _ = batch
    maps = dift_feature_map(denoiser, images, conditions, seed=0)
    channels = denoiser.unet.up_blocks[1].resnets[-1].out_channels
    assert maps.shape == (2, channels, RESOLUTION, RESOLUTION) and maps.dtype == torch.float32
    one_draw = [dift_feature_map(denoiser, images, conditions, seed=0, draws=1)]
    assert not torch.allclose(maps, one_draw[0])  # averaging 8 draws is not one draw


def test_per_image_once_equals_per_patch_with_fewer_passes(denoiser, batch):
    images, conditions, boxes = batch
    assert sum(map(len, boxes)) == 6
    draws = 4  # fewer than the paper's 8 to keep the per-patch way cheap here; the identity is the same
    counter = PassCounter(denoiser.unet)
    try:
        once = patch_features(denoiser, images, conditions, boxes, seed=3, draws=draws)
        once_rows = counter.rows
        per_patch = patch_features_per_patch(denoiser, images, conditions, boxes, seed=3, draws=draws)
        per_patch_rows = counter.rows - once_rows
    finally:
        counter.handle.remove()
    assert once_rows == 2 * draws  # images x draws
    assert per_patch_rows == 6 * draws  # patches x draws: the reference's cost
    for a, b in zip(once, per_patch):
        assert a.shape == (3, 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.norm(dim=1), torch.ones(3))


def test_features_are_seeded_and_independent_of_the_batch(denoiser, batch):
    images, conditions, _ = batch
    options = dict(seed=5, draws=2)
    maps = dift_feature_map(denoiser, images, conditions, forward_batch=4, **options)  # chunks across images
    torch.testing.assert_close(maps, dift_feature_map(denoiser, images, conditions, **options),
                               atol=1e-5, rtol=1e-4)
    alone = dift_feature_map(denoiser, images[1:], conditions[1:], **options)
    torch.testing.assert_close(maps[1:], alone, atol=1e-5, rtol=1e-4)
    assert torch.equal(alone, dift_feature_map(denoiser, images[1:], conditions[1:], **options))  # repeatable
    assert not torch.allclose(maps, dift_feature_map(denoiser, images, conditions, seed=6, draws=2))


def test_feature_map_restores_training_mode(denoiser, batch):
    images, conditions, _ = batch
    denoiser.train()
    try:
        dift_feature_map(denoiser, images[:1], conditions[:1], draws=1)
        assert denoiser.training
    finally:
        denoiser.eval()


def test_feature_map_rejects_mismatched_conditions(denoiser, batch):
    images, _, _ = batch
    with pytest.raises(ValueError):
        dift_feature_map(denoiser, images, torch.zeros(2, 3))


def test_timestep_scales_to_the_model_schedule(denoiser):
    assert dift_timestep(denoiser) == 161

    class Longer:
        num_train_timesteps = 2000

    assert dift_timestep(Longer()) == 322
    with pytest.raises(ValueError):
        dift_timestep(denoiser, 1000)


def test_crop_features_pools_the_box_cells():
    # A [2, 4, 4] map of an 8 px image: each cell is 2x2 pixels; channel 0 = column, 1 = row.
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    feature_map = torch.stack([cols + 1, rows + 1])
    features = crop_features(feature_map, [(0, 0, 4, 4), (4, 2, 8, 6, 0.5), (5, 5, 6, 6)], 8)
    expected = torch.tensor([[1.5, 1.5], [3.5, 2.5], [3.0, 3.0]])  # cells [0,2)x[0,2), [2,4)x[1,3), one cell (2,2)
    torch.testing.assert_close(features, torch.nn.functional.normalize(expected, dim=1))
    assert crop_features(feature_map, [], 8).shape == (0, 2)
    with pytest.raises(ValueError):
        crop_features(feature_map, [(4, 4, 9, 8)], 8)  # outside the image
