"""Patch pages and "more like this": nearest patches from the run's FAISS index, read by the web
process with faiss and numpy only (no torch)."""
import subprocess
import sys

import numpy as np


def test_patch_page_shows_its_image_clusters_and_actions(client):
    data = client.get("/patches/1.json").json()
    assert data["label_name"] and data["clusters"] and data["image"]["id"] == data["image"]["id"]
    html = client.get("/patches/1").text
    assert "Translate across labels" in html and 'hx-get="/patches/1/similar"' in html
    assert f'href="/clusters/{data["clusters"][0]["id"]}"' in html


def test_similar_patches_are_nearest_neighbours_by_feature(mined_settings, client):
    data = client.get("/patches/1/similar.json?k=8").json()["similar"]
    assert len(data) == 8 and 1 not in [p["id"] for p in data]
    similarities = [p["similarity"] for p in data]
    assert similarities == sorted(similarities, reverse=True)
    # The same answer as a brute-force cosine search over the run's features.
    features = np.load(mined_settings.runs_dir / "1" / "features.npy")
    row = client.get("/patches/1.json").json()["feature_row"]
    cosine = features @ features[row]
    order = [r for r in np.argsort(-cosine) if r != row][:8]
    assert np.allclose(sorted(similarities, reverse=True), cosine[order], atol=1e-4)


def test_similar_patches_of_one_label(client):
    data = client.get("/patches/1/similar.json?k=5&label=2").json()["similar"]
    assert data and all(p["label"] == 2 for p in data)
    html = client.get("/patches/1/similar?label=2").text
    assert html.count('class="member"') == len(client.get("/patches/1/similar.json?label=2").json()["similar"])


def first_crop(client) -> str:
    """Patch 1's crop, home-relative (crops are named by image and box, not by patch id)."""
    return client.get("/patches/1.json").json()["crop"]


def test_crop_route_makes_a_missing_crop_once(mined_settings, client):
    crop = mined_settings.home_dir / first_crop(client)
    crop.unlink()
    response = client.get("/patches/1/crop.png")
    assert response.status_code == 200 and crop.is_file()
    assert "immutable" in response.headers["cache-control"]


def test_runs_folder_serves_pictures_only(mined_settings, client):
    relative = first_crop(client)
    # Named by image and box, so a patch id reused by a later mining can't bring back a cached crop
    box = client.get("/patches/1.json").json()["box"]
    assert relative.endswith("-" + "-".join(map(str, box)) + ".png")
    # written aside and renamed (app/run_files.save_crop): nothing half-written is left behind
    crops = list((mined_settings.home_dir / relative).parent.iterdir())
    assert crops and all(p.suffix == ".png" for p in crops)
    crop = client.get(f"/files/{relative}")
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/png"
    assert crop.content == (mined_settings.home_dir / relative).read_bytes()
    assert "immutable" in crop.headers["cache-control"]
    again = client.get(f"/files/{relative}", headers={"If-None-Match": crop.headers["etag"]})
    assert again.status_code == 304
    assert client.get("/files/runs/1/crops/99999.png").status_code == 404
    assert client.get("/files/runs/../../etc/passwd.png").status_code == 404
    for path in ("runs/1/features.npy", "runs/1/index.faiss", "web-secret", "diffmine.sqlite",
                 "models/1/weights/diffmine.json", "staging/x.png"):
        assert client.get(f"/files/{path}").status_code == 404


def test_the_web_never_imports_torch(mined_settings):
    script = f"""
import sys
from fastapi.testclient import TestClient
from app.settings import Settings
from app.web import create_app
client = TestClient(create_app(Settings(home={str(mined_settings.home_dir)!r})))
for url in ("/", "/runs/1/labels/1", "/patches/1/similar", "/images/1", "/clusters/1"):
    assert client.get(url).status_code == 200, url
assert "torch" not in sys.modules, "the web process imported torch"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
