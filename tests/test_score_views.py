"""The score job's views: a non-square image is scored whole (a full-width map); a model from
before image sizes is still scored through its centre square, with the numbers it always got."""
import numpy as np
import torch
from PIL import Image

from app.params import RunParams
from app.services.runs import Example
from worker.engine.data import View, load_views, multi_hot
from worker.engine.registry import create_pixel_denoiser
from worker.engine.typicality import typicality
from worker.handlers.score import compute_shard

PARAMS = RunParams(preset="fast", draws=4, seed=0)


def shard(tmp_path) -> list[Example]:
    rng = np.random.default_rng(0)
    sizes = [(64, 32), (32, 32), (48, 32)]  # (W, H): 2:1, square, 3:2
    examples = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        examples.append(Example(image_id=i + 1, path=str(path), label_indices=[i % 2]))
    return examples


def test_a_non_square_image_gets_a_full_width_map(tmp_path):
    model = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="tiny")
    examples = shard(tmp_path)
    scores = compute_shard(model, examples, [10, 20], PARAMS, view=View(32))
    shapes = {key: value.shape for key, value in scores.maps.items()}
    assert shapes == {"1_10": (32, 64), "2_20": (32, 32), "3_10": (32, 48)}
    for record in scores.records:
        full = scores.maps[record["map_key"]].astype(np.float32)
        assert abs(record["typicality"] - float(full.mean())) < 1e-3


def test_the_centre_crop_view_scores_as_before(tmp_path):
    model = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="tiny")
    examples = shard(tmp_path)
    scores = compute_shard(model, examples, [10, 20], PARAMS, view=View(32, whole=False))
    # the old path: centre crops at the model's resolution, one batch
    from worker.handlers.score import preset_for

    before = typicality(model, load_views([e.path for e in examples], 32),
                        multi_hot([e.label_indices for e in examples], 2), preset_for(PARAMS, model), seed=0)
    by_image = {r["image_id"]: r["typicality"] for r in scores.records}
    assert torch.allclose(torch.tensor([by_image[i] for i in (1, 2, 3)]), before.scores, atol=1e-6)
    assert all(value.shape == (32, 32) for value in scores.maps.values())


def test_images_larger_than_the_training_crops_are_scored_through_tiles(tmp_path):
    from worker.engine.tiles import tiled_typicality
    from worker.handlers.score import preset_for

    model = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="tiny")
    examples = shard(tmp_path)
    scores = compute_shard(model, examples, [10, 20], PARAMS, view=View(32))
    wide = View(32).load(examples[0].path)[None]
    tiled = tiled_typicality(model, wide, multi_hot([0], 2), preset_for(PARAMS, model), seed=0, tile=32)
    assert np.allclose(scores.maps["1_10"].astype(np.float32), tiled.maps[0].numpy(), atol=2e-3)
