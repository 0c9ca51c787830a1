"""Scoring whole images of any shape: full-size maps, padding cut out, the old square view kept."""
import pytest
import torch
from conftest import blobs, planted_dataset
from PIL import Image

from worker.engine.data import ImageDataset, View, load_view_groups, load_views, multi_hot
from worker.engine.presets import FAST
from worker.engine.typicality import label_scores, typicality

QUICK = FAST.with_(draws=4)


def save(path, array_hw3):
    Image.fromarray(array_hw3).save(path)
    return path


def test_a_non_square_image_gets_a_full_width_map(tiny_denoiser, tmp_path):
    import numpy as np

    wide = save(tmp_path / "wide.png", np.random.default_rng(0).integers(0, 255, (20, 50, 3), dtype=np.uint8))
    [(indices, images)] = load_view_groups([wide], View(size=32))
    assert indices == [0] and images.shape == (1, 3, 32, 80)
    result = typicality(tiny_denoiser, images, multi_hot([0], len(tiny_denoiser.labels)), QUICK, seed=0)
    assert result.maps.shape == (1, 32, 80)
    assert torch.allclose(result.scores, result.maps.mean(dim=(1, 2)), atol=1e-6)
    # the old square view: the centre 32 x 32 only
    assert load_views([wide], 32).shape == (1, 3, 32, 32)
    assert View(size=32, whole=False).shape_of((50, 20)) == (32, 32)
    assert View(size=32).shape_of((50, 20)) == (32, 80)


def test_padding_is_cut_out_of_maps_and_scores(tiny_denoiser):
    # 36 x 44 is not a multiple of the UNet's 4: the map keeps the image's own size, and the
    # score is the mean over the image's own pixels.
    assert tiny_denoiser.spatial_multiple == 4
    images = blobs(2, 36, torch.Generator().manual_seed(0))
    images = torch.cat([images, images[..., :8]], dim=-1)  # [2, 3, 36, 44]
    conditions = multi_hot([0, 1], len(tiny_denoiser.labels))
    result = typicality(tiny_denoiser, images, conditions, QUICK, seed=0)
    assert result.maps.shape == (2, 36, 44)
    assert torch.allclose(result.scores, result.maps.mean(dim=(1, 2)), atol=1e-6)
    scores = label_scores(tiny_denoiser, images, QUICK, seed=0, maps=True)
    assert scores.maps.shape == (2, len(tiny_denoiser.labels), 36, 44)


def test_an_aligned_image_scores_as_it_always_did(tiny_denoiser):
    images = blobs(3, 32, torch.Generator().manual_seed(1))
    conditions = multi_hot([0, 1, 0], len(tiny_denoiser.labels))
    whole = typicality(tiny_denoiser, images, conditions, QUICK, seed=3)
    one_by_one = [typicality(tiny_denoiser, images[i:i + 1], conditions[i:i + 1], QUICK, seed=3) for i in range(3)]
    assert torch.allclose(whole.maps, torch.cat([r.maps for r in one_by_one]), atol=1e-5)


def test_training_crops_come_from_the_image_at_its_own_size(tmp_path):
    import numpy as np

    path = save(tmp_path / "big.png", np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    dataset = ImageDataset([path], multi_hot([0], 1), 16, train=True, image_size=32)
    crops = {tuple(dataset[(0, seed)][0].flatten()[:8].tolist()) for seed in range(6)}
    assert dataset[(0, 0)][0].shape == (3, 16, 16) and len(crops) > 1
    with pytest.raises(ValueError, match="smaller than the crops"):
        ImageDataset([path], multi_hot([0], 1), 32, image_size=16)


def test_a_mark_at_the_right_edge_of_a_wide_image_is_found(planted_model):
    # A 2:1 image: a plain half on the left, a marked image on the right. The centre square of
    # the old view would have cut the mark away; the whole image keeps it, and the label's map
    # is highest on it.
    marked, _, masks = planted_dataset(2, seed=5)
    plain = blobs(1, 32, torch.Generator().manual_seed(6))
    wide = torch.cat([plain, marked[:1]], dim=-1)  # [1, 3, 32, 64]
    mask = torch.cat([torch.zeros(32, 32, dtype=torch.bool), masks[0]], dim=-1)
    result = typicality(planted_model, wide, multi_hot([0], 2), FAST, seed=0)
    assert result.maps.shape == (1, 32, 64)
    inside, outside = result.maps[0][mask].mean(), result.maps[0][~mask].mean()
    assert inside > 3 * outside, (inside, outside)
