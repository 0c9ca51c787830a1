"""Stable Diffusion's whole view through the real pipeline (tiny random SD components, real
ingest, training, score, mine and translate jobs in process): images of three aspect ratios are
scored over their whole latent grid, with sides rounded to 64 px, and every patch maps between
the model's pixels and the original's through that rounding."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from app.db import session_scope
from app.models import Image, Patch, TrainedModel
from app.settings import Settings
from tests.cli_helpers import diffmine_in_process

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

#: (W, H) -> the latent map of the whole view at 64 px: 150 x 75 is 128 x 64 px, 97 x 64 is
#: 97 px wide rounded to 128, 80 x 120 is 64 x 96 rounded to 64 x 128
SIZES = {(150, 75): (8, 16), (97, 64): (8, 16), (80, 120): (16, 8)}


def test_stable_diffusion_scores_and_mines_whole_images_of_any_shape(tmp_path, capsys):
    from tests.engine.sd_tiny import build_tiny_sd_folder
    from worker.engine.patches import box_to_original, model_top_left
    from worker.engine.registry import scoring_view

    base = build_tiny_sd_folder(tmp_path / "sd", seed=0)
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i, (width, height) in enumerate(SIZES):
            pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            PILImage.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    home = tmp_path / "home"
    diffmine_in_process(capsys, "ingest", str(tmp_path / "data"), "--name", "shapes", "--holdout", "0",
                        "--min-per-label", "3", home=home)
    result = diffmine_in_process(capsys, "run", "shapes", "--backend", "stable-diffusion", "--base", str(base),
                                 "--resolution", "64", "--steps", "1", "--batch-size", "2", "--preset", "fast",
                                 "--draws", "2", "--clusters", "1", "--per-label", "10", home=home)
    assert result, "run printed nothing"
    settings = Settings(home=home)
    with session_scope(settings) as session:
        model = session.scalars(select(TrainedModel)).one()
        assert model.backend == "stable-diffusion" and model.config["view"] == "whole"
        sizes = {i: (w, h) for i, w, h in session.execute(select(Image.id, Image.width, Image.height))}
        patches = session.execute(select(Patch.image_id, Patch.x0, Patch.y0, Patch.x1, Patch.y1,
                                         Patch.crop_path)).all()
    # every map covers its image's whole rounded view
    maps = {}
    for shard in (home / "runs" / "1" / "maps").glob("shard-*.npz"):
        with np.load(shard) as data:
            maps.update({key: data[key].shape for key in data.files})
    assert len(maps) == len(sizes) == 6
    for key, shape in maps.items():
        assert shape == SIZES[sizes[int(key.split("_")[0])]], key
    # every patch: inside its image, its gallery crop cut from the original at that box, and its
    # model-pixel box recovered through the 64 px rounding
    view = scoring_view("stable-diffusion", 64)
    patch_size = 13  # default_patch_size(64)
    assert patches
    for image_id, x0, y0, x1, y1, crop_path in patches:
        original = sizes[image_id]
        assert 0 <= x0 < x1 <= original[0] and 0 <= y0 < y1 <= original[1]
        x, y = model_top_left((x0, y0, x1, y1), 64, original, patch_size, whole=True, multiple=64)
        height, width = view.shape_of(original)
        assert 0 <= x <= width - patch_size and 0 <= y <= height - patch_size
        back = box_to_original((x, y, x + patch_size, y + patch_size), 64, original, whole=True, multiple=64)
        assert (math.floor(back[0]), math.floor(back[1]), math.ceil(back[2]), math.ceil(back[3])) == (x0, y0, x1, y1)
        assert PILImage.open(home / crop_path).size == (x1 - x0, y1 - y0)
    # translating the right-most patch: the R x R window of that rounded view, box inside it
    with session_scope(settings) as session:
        patch = session.scalars(select(Patch).order_by(Patch.x1.desc(), Patch.id)).first()
        patch_id, box, original = patch.id, (patch.x0, patch.y0, patch.x1, patch.y1), sizes[patch.image_id]
    translated = diffmine_in_process(capsys, "translate", "--patch", str(patch_id), "--invert-steps", "4",
                                     "--sample-steps", "2", home=home)
    for entry in translated["results"]:
        assert entry["window"] == 64 and PILImage.open(home / entry["image"]).size == (64, 64)
        wx0, wy0, wx1, wy1 = entry["window_box"]
        assert 0 <= wx0 < wx1 <= 64 and 0 <= wy0 < wy1 <= 64
        # the box keeps its size in the rounded view's pixels (per-axis scales W'/W, H'/H)
        height, width = view.shape_of(original)
        assert wx1 - wx0 == pytest.approx((box[2] - box[0]) * width / original[0], abs=0.02)
        assert wy1 - wy0 == pytest.approx((box[3] - box[1]) * height / original[1], abs=0.02)
