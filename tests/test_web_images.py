"""Image pages: scores under every label (the diffusion classifier's pick), mined patches
outlined, and typicality heatmaps rendered once per (image, label) into PNG files."""
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.web import create_app


@pytest.fixture
def client(mined_settings):
    return TestClient(create_app(mined_settings))


def image_with_patches(client) -> int:
    return client.get("/patches/1.json").json()["image"]["id"]


def test_image_page_scores_every_label_and_names_the_classifiers_pick(client):
    data = client.get("/images/1.json").json()
    assert data["run"]["id"] == 1 and len(data["scores"]) == 10
    losses = {s["label_id"]: s["loss"] for s in data["scores"]}
    assert data["predicted"] == min(losses, key=losses.get)
    own = [s for s in data["scores"] if s["has_map"]]
    assert [s["label_id"] for s in own] == [l["id"] for l in data["image"]["labels"]]
    assert data["label"]["id"] == own[0]["label_id"]
    html = client.get("/images/1").text
    assert 'class="heat-opacity"' in html and 'class="heat-threshold"' in html
    assert f'data-src="/heatmaps/1/1/{own[0]["label_id"]}.png"' in html


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


def test_a_label_without_a_map_says_so(client):
    data = client.get("/images/1.json").json()
    other = next(s["label_id"] for s in data["scores"] if not s["has_map"])
    page = client.get(f"/images/1?label={other}")
    assert page.status_code == 200 and "no map kept for this label" in page.text
    assert client.get(f"/heatmaps/1/1/{other}.png").status_code == 404


def test_image_file_is_served(client):
    url = client.get("/images/1.json").json()["image"]["url"]
    assert client.get(url).status_code == 200
    assert client.get("/images/1/original").status_code == 200
    assert client.get("/images/999.json").status_code == 404
