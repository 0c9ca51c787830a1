"""The score job's views: a non-square image is scored whole (a full-width map); a model from
before image sizes is still scored through its centre square, with the numbers it always got.
The same for Stable Diffusion (tiny random components), whose whole views round to 64 px."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.params import RunParams, TrainConfig
from app.services.runs import Example, RunRecord
from worker.engine.data import View, load_views, multi_hot
from worker.engine.registry import create_pixel_denoiser
from worker.engine.typicality import typicality
from worker.handlers.score import compute_shard

PARAMS = RunParams(preset="fast", draws=4, seed=0)


def noise_shard(tmp_path, sizes, *, seed: int, prefix: str = "") -> list[Example]:
    """Random-noise images of the given (W, H) sizes, labelled 0, 1, 0..."""
    rng = np.random.default_rng(seed)
    examples = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        examples.append(Example(image_id=i + 1, path=str(path), label_indices=[i % 2]))
    return examples


def shard(tmp_path) -> list[Example]:
    return noise_shard(tmp_path, [(64, 32), (32, 32), (48, 32)], seed=0)  # 2:1, square, 3:2


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


# --- Stable Diffusion (tiny random components): the same job, latents at N/8 ---------------------
SD_SIZE = 64  # the tiny SD's native 64 px (8 x 8 latents); SD 1.5's is 512


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.engine.sd_tiny import build_tiny_sd_folder
    from worker.engine.stable_diffusion import StableDiffusionDenoiser

    folder = build_tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0)
    return StableDiffusionDenoiser.from_pretrained(folder, ["a", "b"])


def sd_shard(tmp_path) -> list[Example]:
    # 2:1, square, ~3:2 (rounds to 128 x 64)
    return noise_shard(tmp_path, [(150, 75), (64, 64), (97, 64)], seed=1, prefix="sd")


def test_stable_diffusion_maps_cover_the_whole_image(sd_model, tmp_path):
    from worker.engine.registry import scoring_view

    examples = sd_shard(tmp_path)
    scores = compute_shard(sd_model, examples, [10, 20], PARAMS, view=scoring_view("stable-diffusion", SD_SIZE))
    shapes = {key: value.shape for key, value in scores.maps.items()}
    assert shapes == {"1_10": (8, 16), "2_20": (8, 8), "3_10": (8, 16)}  # latents of 64 x 128, 64 x 64
    for record in scores.records:
        assert abs(record["typicality"] - float(scores.maps[record["map_key"]].astype(np.float32).mean())) < 1e-3


def test_stable_diffusion_models_from_before_score_their_centre_square_as_before(sd_model, tmp_path):
    """A model stored with view centre-crop (every SD model before this change) keeps it: the
    numbers of the old path, centre crops at the model size in one batch."""
    from worker.engine.registry import scoring_view
    from worker.handlers.score import preset_for
    from worker.models import run_view

    examples = sd_shard(tmp_path)
    # an SD model's config as stored before this change (migration 0003 wrote the view of older ones)
    stored = {"resolution": SD_SIZE, "steps": 5000, "batch_size": 8, "seed": 0, "view": "centre-crop",
              "base": "sd"}
    record = RunRecord(run_id=1, params=PARAMS, stages_done=frozenset(), model_id=1, backend="stable-diffusion",
                       config=TrainConfig.model_validate(stored), weights=Path("."), label_set_id=1,
                       labels=((10, "a"), (20, "b")), ordinal=False)
    view = run_view(record)
    assert view == scoring_view("stable-diffusion", SD_SIZE, whole=False)
    scores = compute_shard(sd_model, examples, [10, 20], PARAMS, view=view)
    before = typicality(sd_model, load_views([e.path for e in examples], SD_SIZE),
                        multi_hot([e.label_indices for e in examples], 2), preset_for(PARAMS, sd_model), seed=0)
    by_image = {r["image_id"]: r["typicality"] for r in scores.records}
    assert torch.allclose(torch.tensor([by_image[i] for i in (1, 2, 3)]), before.scores, atol=1e-6)
    assert all(value.shape == (8, 8) for value in scores.maps.values())


def test_a_stable_diffusion_run_off_64_px_is_refused_and_changes_nothing(mined_settings):
    from sqlalchemy import func, select

    from app.db import session_scope
    from app.models import MiningRun, TrainedModel
    from app.services.runs import new_model, new_run

    with session_scope(mined_settings) as session:
        model = new_model(session, mined_settings, dataset=1, label_set=None, backend="stable-diffusion",
                          base="sd", resolution=SD_SIZE)
        model_id, config = model.id, dict(model.config)
        runs = session.scalar(select(func.count(MiningRun.id)))
    assert config["view"] == "whole"  # new SD models score the whole image
    with pytest.raises(ValueError, match="image size 100 px: stable-diffusion needs image sides that are "
                                         "multiples of 64 px"):
        with session_scope(mined_settings) as session:
            new_run(session, model_id=model_id, params=RunParams(image_size=100))
    with session_scope(mined_settings) as session:
        assert session.scalar(select(func.count(MiningRun.id))) == runs
        assert session.get(TrainedModel, model_id) is not None
        run = new_run(session, model_id=model_id, params=RunParams(image_size=128))
        assert run.params["image_size"] == 128
