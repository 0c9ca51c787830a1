"""Translation jobs on a real mined run (tests/mined.py: animals, tiny pixel model, run 1):
the CLI in the foreground, the web's request through the worker, the click cache, and the
consistent-change (parallel dataset) job with its resume."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import func, select

from app.cli import main as diffmine
from app.db import session_scope
from app.jobs import PRIORITY_INTERACTIVE
from app.models import Image, Job, Label, Patch, Translation
from app.params import TranslationOptions
from app.services.translations import request_translation
from tests.cli_helpers import diffmine_in_process
from worker.runner import Worker

#: few DDIM steps: these tests check the plumbing; the engine tests check the numbers
QUICK = ["--invert-steps", "8", "--sample-steps", "4", "--guidance", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def first_patch(settings) -> Patch:
    with session_scope(settings) as session:
        patch = session.scalar(select(Patch).order_by(Patch.id).limit(1))
        session.expunge(patch)
        return patch


def test_translate_a_patch_from_the_cli_then_from_the_cache(mined_settings, capsys):
    home, patch = mined_settings.home_dir, first_patch(mined_settings)
    result = diffmine_in_process(capsys, "translate", "--patch", str(patch.id), *QUICK, home=home)
    with session_scope(mined_settings) as session:
        labels = session.scalars(select(Label.name).order_by(Label.position)).all()
        row = session.get(Translation, result["translation"])
        assert row.status == "ready" and row.patch_id == patch.id
        assert row.box == [patch.x0, patch.y0, patch.x1, patch.y1]
        assert row.params["invert_steps"] == 8 and "reconstruction_error" in row.params
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.kind == "translate"))
    assert result["labels"] == labels and not result["cached"]
    assert result["result_dir"] == f"runs/{patch.run_id}/translations/{result['translation']}"
    entries = result["results"]
    assert [e["is_source"] for e in entries] == [e["label_id"] == patch.label_id for e in entries]
    source = next(e for e in entries if e["is_source"])
    assert 0 <= source["reconstruction_error"] < 1 and source["reconstruction_error"] == result["reconstruction_error"]
    for entry in entries:
        x0, y0, x1, y1 = entry["window_box"]  # where the patch lies in the 32 px window
        assert entry["window"] == 32 and 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        crop = PILImage.open(home / entry["crop"])
        full = PILImage.open(home / entry["image"])
        assert full.size == (32, 32) and 1 <= crop.size[0] <= 32 and 1 <= crop.size[1] <= 32
        assert isinstance(entry["typicality"], float) and isinstance(entry["source_typicality"], float)
    assert (home / result["result_dir"] / "source.png").exists()

    # the same click again: the row is reused, nothing runs
    again = diffmine_in_process(capsys, "translate", "--patch", str(patch.id), *QUICK, home=home)
    assert again["translation"] == result["translation"] and again["cached"]
    with session_scope(mined_settings) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.kind == "translate")) == jobs
    # other settings are another translation
    other = diffmine_in_process(capsys, "translate", "--patch", str(patch.id), *QUICK, "--seed", "1", "--queue",
                                home=home)
    assert other["translation"] != result["translation"] and other["job"] and other["labels"] == labels


def test_the_web_request_runs_on_the_worker_and_is_cached(mined_settings):
    patch = first_patch(mined_settings)
    options = {"invert_steps": 6, "sample_steps": 3}
    with session_scope(mined_settings) as session:
        row, job_id = request_translation(session, patch_id=patch.id, options=TranslationOptions(**options))
        translation_id = row.id
        assert session.get(Job, job_id).priority == PRIORITY_INTERACTIVE
        assert request_translation(session, patch_id=patch.id, options=TranslationOptions(**options)) == (row, job_id)
    assert Worker(mined_settings).run_one()
    with session_scope(mined_settings) as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded", job.error
        row = session.get(Translation, translation_id)
        assert row.status == "ready" and len(row.results) == session.scalar(select(func.count()).select_from(Label))
        assert request_translation(session, patch_id=patch.id, options=TranslationOptions(**options)) == (row, None)


def test_an_image_region_with_a_context_window_and_a_failure(mined_settings, capsys):
    home = mined_settings.home_dir
    with session_scope(mined_settings) as session:
        image = session.scalar(select(Image).order_by(Image.id).limit(1))
        image_id, width, height = image.id, image.width, image.height
    box = f"{width // 4},{height // 4},{width // 2},{height // 2}"
    whole = diffmine_in_process(capsys, "translate", "--run", "1", "--image", str(image_id), *QUICK, home=home)
    region = diffmine_in_process(capsys, "translate", "--run", "1", "--image", str(image_id), "--box", box,
                                 "--context", "1.5", *QUICK, home=home)
    assert whole["translation"] != region["translation"]
    assert whole["result_dir"] == f"models/1/translations/{whole['translation']}"
    whole_crop = PILImage.open(home / whole["results"][0]["crop"])
    region_crop = PILImage.open(home / region["results"][0]["crop"])
    assert whole_crop.size == (32, 32) and region_crop.size[0] < 32

    capsys.readouterr()
    assert diffmine(["translate", "--run", "1", "--image", str(image_id), "--box", f"0,0,{width + 5},4",
                     "--home", str(home), "--json"]) == 1
    assert "not inside" in capsys.readouterr().err


def test_parallel_dataset_is_mined_clustered_and_resumable(mined_settings, capsys):
    home = mined_settings.home_dir
    result = diffmine_in_process(capsys, "translate", "--run", "1", "--parallel", "5", "--clusters", "2", *QUICK,
                                 home=home)
    summary_path = home / result["summary"]
    summary = json.loads(summary_path.read_text())
    labels = [label["name"] for label in summary["labels"]]
    assert result["images"] == len(summary["images"]) == 5 and result["labels"] == labels
    assert 1 <= result["clusters"] <= 2 and result["patches"] == 25  # 5 boxes per image
    medians = [c["median_cotypicality"] for c in summary["clusters"]]
    assert medians == sorted(medians, reverse=True)
    for cluster in summary["clusters"]:
        for member in cluster["members"]:
            assert [v["label"] for v in member["versions"]] == labels
            assert (home / member["source_crop"]).exists()
            assert all((home / v["crop"]).exists() for v in member["versions"])
    folder = summary_path.parent
    chunk = sorted((folder / "chunks").glob("chunk-*.npz"))[0]
    kept = chunk.stat().st_mtime_ns
    # interrupted after its first chunk: the rerun keeps the chunk, redoes the rest, same result
    for path in [summary_path, folder / "patches.json", *sorted((folder / "chunks").glob("*.npz"))[1:],
                 *(folder / "features").glob("*.npy")]:
        path.unlink()
    again = diffmine_in_process(capsys, "translate", "--run", "1", "--parallel", "5", "--clusters", "2", *QUICK,
                                home=home)
    assert chunk.stat().st_mtime_ns == kept
    assert json.loads(summary_path.read_text())["clusters"] == summary["clusters"]
    assert {k: v for k, v in again.items() if k != "job"} == {k: v for k, v in result.items() if k != "job"}


def test_default_guidance_depends_on_backend_and_preset():
    from app.params import PIXEL_GUIDANCE, TranslationOptions

    def resolve_params(params, backend):
        return TranslationOptions.model_validate(params).resolved(backend)

    def canonical_params(params, backend):
        return TranslationOptions.model_validate(params).canonical(backend)

    assert resolve_params({}, "pixel")["guidance"] == PIXEL_GUIDANCE == 3.0
    assert resolve_params({}, "stable-diffusion")["guidance"] == 7.5
    assert resolve_params({"preset": "reference"}, "pixel")["guidance"] == 7.5  # the paper, exactly
    assert resolve_params({"guidance": 5}, "pixel")["guidance"] == 5.0
    # one cache key for the default however it is spelled
    assert canonical_params({"guidance": 3}, "pixel") == canonical_params({}, "pixel") == {}


def test_the_translation_window_is_an_r_crop_of_the_image_at_its_scoring_size(tmp_path):
    """A model scoring whole images at N translates the R x R window of the image at N around
    the patch: the patch keeps the detail it was mined at, no enlarged blob."""
    import numpy as np

    from worker.engine.data import View
    from worker.handlers.translate import model_view

    path = tmp_path / "wide.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(path)
    box = [180, 40, 196, 56]  # 16 px at the right edge, in original pixels (8 px at N = 50)
    window, in_window = model_view(path, (200, 100), box, 32, scored_at=50)
    assert window.shape == (3, 32, 32)
    x0, y0, x1, y1 = in_window
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 and round(x1 - x0) == 8 and round(y1 - y0) == 8
    whole = View(50).load(path)  # [3, 50, 100]: the window is a piece of it, flush right
    assert torch.equal(window, whole[:, 8:40, 68:100])  # centred on the box as far as it fits


def test_the_stable_diffusion_window_is_an_r_crop_of_the_image_as_scoring_rounded_it(tmp_path):
    """Stable Diffusion's whole view rounds both sides to 64 px; its translation window is the
    R x R piece of that same view around the patch, and the box lands where scoring saw it."""
    import numpy as np

    from worker.engine.patches import box_to_model
    from worker.engine.registry import scoring_view
    from worker.handlers.translate import model_view

    path = tmp_path / "wide.png"
    PILImage.fromarray(np.random.default_rng(1).integers(0, 255, (100, 230, 3), dtype=np.uint8)).save(path)
    view = scoring_view("stable-diffusion", 64)
    whole = view.load(path)
    assert whole.shape == (3, 64, 128)  # 230 x 100 at 64 px is 147 x 64: rounded to 128 x 64
    box = [200, 30, 225, 55]  # at the right edge, in original pixels
    window, in_window = model_view(path, (230, 100), box, 64, scored_at=64, multiple=64)
    assert window.shape == (3, 64, 64)
    assert torch.equal(window, whole[:, :, 64:128])  # flush right
    expected = box_to_model(box, 64, (230, 100), whole=True, multiple=64)
    assert np.allclose(in_window, (expected[0] - 64, expected[1], expected[2] - 64, expected[3]))
    x0, _, x1, _ = in_window
    assert 0 <= x0 < x1 <= 64 and x1 - x0 == pytest.approx(25 * 128 / 230)  # the rounded x scale


def test_a_patch_is_translated_at_the_size_its_run_scored_at_not_the_models(mined_settings):
    """`score --image-size` may score at another size than the model's: the window is cut from
    the image at the run's size, where the patch was found."""
    from app.models import MiningRun, TrainedModel
    from app.params import TrainConfig
    from worker.handlers.translate import scoring_size

    with session_scope(mined_settings) as session:
        recipe = TrainConfig.model_validate(session.get(TrainedModel, 1).config)
        assert scoring_size(session, mined_settings, 1, recipe) == recipe.scoring_size == 32
        run = session.get(MiningRun, 1)
        run.params = {**run.params, "image_size": 64}
    with session_scope(mined_settings) as session:
        assert scoring_size(session, mined_settings, 1, recipe) == 64
        assert scoring_size(session, mined_settings, None, recipe) == 32  # an image region: the model's
