"""The patch map and the label contrast of a real mined run (tests/mined.py: tiny pixel model,
scored under every label): what the mining job stores, and the pages' JSON twins."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from app import run_files
from app.db import session_scope
from app.models import Image, ImageScore, MiningRun, Patch
from tests.web_helpers import captured_sql, full_scans


def patch_rows(settings) -> list:
    with session_scope(settings) as session:
        return session.execute(select(Patch.id, Patch.label_id, Patch.feature_row, Patch.score, Patch.crop_path,
                                      Patch.image_id, Patch.x0, Patch.y0, Patch.x1, Patch.y1)).all()


def test_mining_lays_out_every_patch_with_its_thumbnail(mined_settings):
    from worker.handlers.run_views import thumbnail

    run_dir = mined_settings.runs_dir / "1"
    meta = run_files.read_map_meta(run_dir)
    points = run_files.read_points(run_dir, meta)
    patches = {p.id: p for p in patch_rows(mined_settings)}
    assert meta["count"] == len(points) == len(patches) > 100
    assert sorted(points["patch"].tolist()) == sorted(patches)
    assert all(patches[int(p["patch"])].label_id == p["label"] for p in points)
    assert np.isfinite(points["x"]).all() and points["x"].min() >= 0 and points["y"].max() <= 1
    assert meta["version"] == run_files.map_version(points)
    # Cell i of the atlas is point i's crop, fitted by the mining job.
    atlas = PILImage.open(run_dir / "map" / meta["version"] / run_files.atlas_name(0)).convert("RGBA")
    assert meta["atlases"] == 1 and atlas.size == (32 * 32, 32 * -(-len(points) // 32))
    for cell in (0, 1, len(points) - 1):
        patch = patches[int(points[cell]["patch"])]
        with PILImage.open(mined_settings.home_dir / patch.crop_path) as crop:
            expected = thumbnail(crop.convert("RGBA"))
        left, top = cell % 32 * 32 + (32 - expected.width) // 2, cell // 32 * 32 + (32 - expected.height) // 2
        got = atlas.crop((left, top, left + expected.width, top + expected.height))
        assert np.array_equal(np.asarray(got), np.asarray(expected)), cell


def test_the_map_keeps_feature_neighbours_near(mined_settings):
    """A patch's nearest neighbour by DIFT features is much nearer on the map than a random
    patch is: the layout follows the features."""
    run_dir = mined_settings.runs_dir / "1"
    features = np.load(run_dir / "features.npy")
    points = run_files.read_points(run_dir, run_files.read_map_meta(run_dir))
    by_row = {p.id: p.feature_row for p in patch_rows(mined_settings)}
    position = np.zeros((len(features), 2))
    for p in points:
        position[by_row[int(p["patch"])]] = (p["x"], p["y"])
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    neighbour_distance = np.linalg.norm(position - position[nearest], axis=1).mean()
    random_distance = np.linalg.norm(position - position[np.random.default_rng(0).permutation(len(position))],
                                     axis=1).mean()
    assert neighbour_distance < 0.3 * random_distance


def test_label_scores_hold_every_patch_under_every_label(mined_settings):
    """Column of the patch's own label = its mined score; another label's column = its box read
    from the map the score job kept under that label."""
    import torch

    from app.services.runs import load_run
    from worker.engine.patches import default_patch_size, image_shape_of, model_top_left, patch_scores, score_boxes

    scores, labels = run_files.read_label_scores(mined_settings.runs_dir / "1")
    rows = patch_rows(mined_settings)
    assert scores.shape == (len(rows), 10) and np.isfinite(scores).all()
    own = np.array([scores[p.feature_row, labels.index(p.label_id)] for p in rows])
    assert np.allclose(own, [p.score for p in rows], atol=1e-6)
    patch = rows[7]
    other = next(label for label in labels if label != patch.label_id)
    with session_scope(mined_settings) as session:
        map_path = session.scalar(select(ImageScore.map_path).where(
            ImageScore.run_id == 1, ImageScore.image_id == patch.image_id, ImageScore.label_id == other))
        image = session.get(Image, patch.image_id)
        record = load_run(session, mined_settings, 1)
    view, size = record.view_size, record.params.mine.patch_size or default_patch_size(record.view_size)
    file, key = map_path.rsplit(":", 1)
    with np.load(mined_settings.home_dir / file) as stored:
        grid = patch_scores(torch.from_numpy(stored[key].astype(np.float32)), image_shape_of(stored[key].shape, view),
                            size)
    top_left = model_top_left((patch.x0, patch.y0, patch.x1, patch.y1), view, (image.width, image.height), size,
                              whole=record.whole_view)
    assert scores[patch.feature_row, labels.index(other)] == pytest.approx(score_boxes(grid, [top_left])[0], abs=1e-6)
    assert not np.allclose(scores[:, 0], scores[:, 1])


def test_map_json_pages_through_every_point(mined_settings, client):
    first = client.get("/runs/1/map.json?limit=64").json()
    assert first["available"] and first["count"] == len(patch_rows(mined_settings))
    assert [label["patches"] for label in first["labels"]] == [20] * 10
    assert len({label["colour"] for label in first["labels"]}) == 10
    seen, page = [], first
    while True:
        seen += page["points"]
        if page["next_offset"] is None:
            break
        page = client.get(f"/runs/1/map.json?limit=64&offset={page['next_offset']}").json()
    assert len(seen) == first["count"] and len({p["patch"] for p in seen}) == first["count"]
    point = seen[5]
    assert set(point) == {"patch", "label", "x", "y", "url", "thumbnail", "atlas"}
    assert point["atlas"]["cell"] == 5 and point["url"] == f"/patches/{point['patch']}"
    thumbnail = client.get(point["thumbnail"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
    atlas = client.get(point["atlas"]["url"])
    assert atlas.status_code == 200 and PILImage.open(io.BytesIO(atlas.content)).width == 1024
    # The binary file the page draws from holds the same points, in the same order.
    binary = client.get(first["points_url"])
    assert binary.status_code == 200 and "immutable" in binary.headers["cache-control"]
    records = np.frombuffer(binary.content, dtype=run_files.POINT)
    assert records["patch"].tolist() == [p["patch"] for p in seen]
    assert np.allclose(records["x"], [p["x"] for p in seen], atol=1e-5)
    assert "no-cache" in client.get("/runs/1/map/points.bin").headers["cache-control"]


def test_map_json_filters_by_label(mined_settings, client):
    rows = patch_rows(mined_settings)
    page = client.get("/runs/1/map.json?label=3&limit=15").json()
    assert len(page["points"]) == 15 and page["next_offset"] == 15
    rest = client.get("/runs/1/map.json?label=3&limit=15&offset=15").json()
    ids = [p["patch"] for p in page["points"] + rest["points"]]
    assert sorted(ids) == sorted(p.id for p in rows if p.label_id == 3) and rest["next_offset"] is None
    assert client.get("/runs/1/map.json?label=999").status_code == 404
    assert client.get("/runs/1/map.json?limit=100000").status_code == 422


def test_map_page_and_its_reads(mined_settings, client):
    html = client.get("/runs/1/map").text
    assert 'class="patch-map"' in html and 'src="/static/patch_map.js"' in html
    assert html.count('class="swatch"') == 10
    assert 'href="/runs/1/map"' in client.get("/runs/1").text
    for url in ("/runs/1/map.json", "/runs/1/map.json?label=2", "/runs/1/compare.json?a=1&b=2"):
        client.get(url)
        with captured_sql(mined_settings) as statements:
            assert client.get(url).status_code == 200
        assert full_scans(mined_settings, statements) == [], url


def test_a_run_without_a_map_says_why(mined_settings, client):
    with session_scope(mined_settings) as session:
        run = session.get(MiningRun, 1)
        run.stages_done = [s for s in run.stages_done if s != "map"]
    data = client.get("/runs/1/map.json").json()
    assert not data["available"] and "mine it again" in data["reason"] and "points" not in data
    assert "mine it again" in client.get("/runs/1/map").text
    assert client.get("/runs/1/map/points.bin").status_code == 404


def contrast_of(client, a: int, b: int) -> list[dict]:
    sides = client.get(f"/runs/1/compare.json?a={a}&b={b}").json()["sides"]
    assert [s["label"]["id"] for s in sides] == [a, b]
    assert [(s["contrast"]["label"], s["contrast"]["against"]) for s in sides] == [(a, b), (b, a)]
    return sides


def test_compare_ranks_a_labels_patches_by_contrast(mined_settings, client):
    scores, labels = run_files.read_label_scores(mined_settings.runs_dir / "1")
    rows = {p.id: p for p in patch_rows(mined_settings)}
    for side, (label, against) in zip(contrast_of(client, 2, 7), ((2, 7), (7, 2))):
        contrast = side["contrast"]
        assert contrast["available"] and len(contrast["patches"]) == 14 and contrast["next_offset"] == 14
        values = [p["contrast"] for p in contrast["patches"]]
        assert values == sorted(values, reverse=True)
        for p in contrast["patches"]:
            row = rows[p["id"]].feature_row
            assert rows[p["id"]].label_id == label
            assert p["under_label"] == pytest.approx(rows[p["id"]].score, abs=1e-6)
            assert p["under_against"] == pytest.approx(float(scores[row, labels.index(against)]))
            assert p["contrast"] == pytest.approx(p["under_label"] - p["under_against"])
        # The first is the best of all the label's patches, not of a page.
        column, other = labels.index(label), labels.index(against)
        best = max((float(scores[r.feature_row, column] - scores[r.feature_row, other]), r.id)
                   for r in rows.values() if r.label_id == label)
        assert contrast["patches"][0]["id"] == best[1]
    html = client.get("/runs/1/compare?a=2&b=7").text
    assert html.count('class="contrast"') == 2 and "Typical of Bird, not of Giraffe" in html


def test_contrast_needs_scores_under_every_label(mined_settings, client):
    with session_scope(mined_settings) as session:
        run = session.get(MiningRun, 1)
        run.stages_done = [s for s in run.stages_done if s != "label_scores"]
    side = contrast_of(client, 1, 2)[0]
    assert not side["contrast"]["available"] and "mine it again" in side["contrast"]["reason"]
    with session_scope(mined_settings) as session:
        run = session.get(MiningRun, 1)
        run.params = dict(run.params, all_labels=False)
    side = contrast_of(client, 1, 2)[0]
    assert not side["contrast"]["available"] and "--all-labels" in side["contrast"]["reason"]
    assert "--all-labels" in client.get("/runs/1/compare").text


def test_label_scores_meta_names_the_columns(mined_settings):
    meta = json.loads((mined_settings.runs_dir / "1" / run_files.LABEL_SCORES_META).read_text())
    assert meta["labels"] == list(range(1, 11))
