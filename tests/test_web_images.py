"""Image pages: scores under every label (the diffusion classifier's pick), mined patches
outlined, and typicality heatmaps rendered once per (image, label) into PNG files."""
import io

import numpy as np
from PIL import Image
from sqlalchemy import select, update

from app.db import session_scope
from app.models import ImageScore, MiningRun, TrainedModel
from app.services.runs import examples, labels_of


def image_with_patches(client) -> int:
    return client.get("/patches/1.json").json()["image"]["id"]


def test_image_page_scores_every_label_and_names_the_classifiers_pick(client):
    data = client.get("/images/1.json").json()
    assert data["run"]["id"] == 1 and len(data["scores"]) == 10
    losses = {s["label_id"]: s["loss"] for s in data["scores"]}
    assert data["predicted"] == min(losses, key=losses.get)
    assert {s["draws"] for s in data["scores"]} == {4}  # the draws each score's map had (the fixture's)
    own = data["image"]["labels"][0]["id"]
    assert data["label"]["id"] == own  # the page opens on the image's own label's map
    html = client.get("/images/1").text
    assert 'class="heat-opacity"' in html and 'class="heat-threshold"' in html
    assert f'data-src="/heatmaps/1/1/{own}.png"' in html


def test_mined_patches_are_outlined_and_link_to_their_page(client):
    image_id = image_with_patches(client)
    data = client.get(f"/images/{image_id}.json").json()
    assert 1 in [p["id"] for p in data["patches"]]
    html = client.get(f"/images/{image_id}").text
    assert 'class="box' in html and 'href="/patches/1"' in html


def test_heatmap_is_rendered_once_then_served_from_its_file(mined_settings, client):
    data = client.get("/images/1.json").json()
    label = data["label"]["id"]
    response = client.get(f"/heatmaps/1/1/{label}.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert "immutable" in response.headers["cache-control"]
    path = mined_settings.runs_dir / "1" / "heatmaps" / f"1_{label}.png"
    assert path.is_file()
    rgba = np.asarray(Image.open(io.BytesIO(response.content)))
    assert rgba.shape[2] == 4 and rgba.shape[:2] == (32, 32)  # the model's resolution
    assert (rgba[..., 3] == 0).any() and (rgba[..., 3] > 0).any()  # transparent where low
    stamp = path.stat().st_mtime_ns
    again = client.get(f"/heatmaps/1/1/{label}.png")
    assert again.content == response.content and path.stat().st_mtime_ns == stamp


def test_a_label_the_image_does_not_have_has_its_typicality_heatmap(mined_settings, client):
    # The shared run is scored with --all-labels: every label's map is kept, not just its own.
    data = client.get("/images/1.json").json()
    other = not_own_label(data)
    assert all(s["has_map"] for s in data["scores"])
    page = client.get(f"/images/1?label={other}")
    assert f'data-src="/heatmaps/1/1/{other}.png"' in page.text
    assert "no map kept" not in page.text
    response = client.get(f"/heatmaps/1/1/{other}.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(response.content))).shape == (32, 32, 4)
    kept = stored_map(mined_settings, 1, other)
    recomputed = typicality_map_under_every_label(mined_settings, 1)
    np.testing.assert_allclose(kept, recomputed[other], rtol=1e-2, atol=2e-3)  # stored as float16
    own = data["image"]["labels"][0]["id"]
    assert not np.allclose(kept, recomputed[own], rtol=1e-2, atol=2e-3)  # not just any map
    np.testing.assert_allclose(stored_map(mined_settings, 1, own), recomputed[own], rtol=1e-2, atol=2e-3)


def test_a_label_without_a_map_says_so(mined_settings, client):
    # A run that kept maps for the image's own labels only (as runs scored before every label's
    # map was kept did): its other labels have scores but no map.
    data = client.get("/images/1.json").json()
    other = not_own_label(data)
    with session_scope(mined_settings) as session:
        session.execute(update(ImageScore).where(ImageScore.run_id == 1, ImageScore.image_id == 1,
                                                 ImageScore.label_id == other).values(map_path=None))
    page = client.get(f"/images/1?label={other}")
    assert page.status_code == 200 and "no map kept for this label" in page.text
    assert client.get(f"/heatmaps/1/1/{other}.png").status_code == 404


def not_own_label(data: dict) -> int:
    own = {label["id"] for label in data["image"]["labels"]}
    return next(s["label_id"] for s in data["scores"] if s["label_id"] not in own)


def stored_map(settings, image_id: int, label_id: int) -> np.ndarray:
    with session_scope(settings) as session:
        map_path = session.scalar(select(ImageScore.map_path).where(
            ImageScore.run_id == 1, ImageScore.image_id == image_id, ImageScore.label_id == label_id))
    file, key = map_path.rsplit(":", 1)
    with np.load(settings.home_dir / file) as maps:
        return maps[key].astype(np.float32)


def typicality_map_under_every_label(settings, image_id: int) -> dict[int, np.ndarray]:
    """label id -> the image's typicality map, recomputed with run 1's model, preset and seed."""
    from app.params import RunParams
    from worker.engine.data import load_views
    from worker.engine.registry import load_denoiser
    from worker.engine.typicality import label_scores
    from worker.handlers.evaluate import denoiser_resolution
    from worker.handlers.score import preset_for

    with session_scope(settings) as session:
        run = session.get(MiningRun, 1)
        model = session.get(TrainedModel, run.model_id)
        label_ids = [label.id for label in labels_of(session, model.label_set_id)]
        example = next(e for e in examples(session, settings, label_set_id=model.label_set_id)
                       if e.image_id == image_id)
        params, weights = RunParams.model_validate(run.params), settings.home_dir / model.weights_dir
    denoiser = load_denoiser(weights, device="cpu")
    images = load_views([example.path], denoiser_resolution(denoiser))
    maps = label_scores(denoiser, images, preset_for(params, denoiser), seed=params.seed,
                        maps=True).maps[0]
    return {label_id: maps[m].numpy() for m, label_id in enumerate(label_ids)}


def test_image_file_is_served(client):
    url = client.get("/images/1.json").json()["image"]["url"]
    assert client.get(url).status_code == 200
    assert client.get("/images/1/original").status_code == 200
    assert client.get("/images/999.json").status_code == 404
