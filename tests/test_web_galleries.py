"""Run pages and label galleries over a real mined run: clusters in rank order with their
members, pages that load more, label switching by fragment, comparison, JSON twins, escaping,
and reads that go through indexes."""
import pytest
from sqlalchemy import text

from app.db import engine_for
from tests.web_helpers import captured_sql, full_scans

EVIL = '<img src=x onerror="alert(1)">'


def test_run_page_shows_every_label_with_its_top_cluster(client):
    data = client.get("/runs/1.json").json()
    assert data["status"] == "ready" and data["dataset"]["name"] == "animals"
    assert len(data["labels"]) == 10
    assert all(label["top"] and label["top"]["members"] for label in data["labels"])
    page = client.get("/runs/1")
    assert page.status_code == 200
    for label in data["labels"]:
        assert f'/runs/1/labels/{label["id"]}' in page.text


def test_gallery_lists_clusters_in_rank_order_with_members(client):
    data = client.get("/runs/1/labels/1.json").json()
    ranks = [c["rank"] for c in data["clusters"]]
    assert ranks == sorted(ranks) and ranks[0] == 0
    for cluster in data["clusters"]:
        assert 0 < len(cluster["members"]) <= 10
        assert cluster["median_typicality"] is not None
        assert all(m["crop"].startswith("runs/1/crops/") for m in cluster["members"])
    html = client.get("/runs/1/labels/1").text
    first = data["clusters"][0]["members"][0]
    assert f'href="/patches/{first["id"]}"' in html and f'src="/files/{first["crop"]}"' in html
    assert client.get(f"/files/{first['crop']}").headers["cache-control"].endswith("immutable")


def test_gallery_pages_through_clusters(client):
    one = client.get("/runs/1/labels/1.json?per_page=1&members=2").json()
    assert len(one["clusters"]) == 1 and one["next_offset"] == 1
    assert all(len(c["members"]) <= 2 for c in one["clusters"])
    html = client.get("/runs/1/labels/1?per_page=1&members=2").text
    assert 'hx-trigger="revealed"' in html and "offset=1" in html
    rest = client.get("/runs/1/labels/1?offset=1&per_page=1&members=2",
                      headers={"HX-Request": "true"})
    assert rest.status_code == 200 and "<html" not in rest.text and 'class="cluster' in rest.text
    everything = client.get("/runs/1/labels/1.json?per_page=50").json()
    assert everything["next_offset"] is None


def test_switching_labels_returns_only_the_gallery(client):
    fragment = client.get("/runs/1/labels/2", headers={"HX-Request": "true", "HX-Target": "gallery"})
    assert fragment.status_code == 200
    assert 'id="gallery"' in fragment.text and "<html" not in fragment.text
    assert "<title>Bird" in fragment.text


def test_compare_two_labels_side_by_side(client):
    data = client.get("/runs/1/compare.json?a=1&b=3").json()
    assert [s["label"]["name"] for s in data["sides"]] == ["Bear", "Cat"]
    assert all(s["clusters"] for s in data["sides"])
    html = client.get("/runs/1/compare?a=1&b=3").text
    assert html.count('class="compare-side"') == 2


def test_unknown_run_or_label_is_a_page_with_a_way_on(client):
    page = client.get("/runs/9", headers={"Accept": "text/html"})
    assert page.status_code == 404 and "There is no run 9" in page.text and 'href="/"' in page.text
    assert client.get("/runs/1/labels/999.json").status_code == 404


def test_label_names_are_escaped_in_galleries(mined_settings, client):
    with engine_for(mined_settings.db_url).begin() as conn:
        conn.execute(text("UPDATE labels SET name = :n WHERE id = 1"), {"n": EVIL})
    for url in ("/runs/1", "/runs/1/labels/1", "/runs/1/labels/2", "/runs/1/compare?a=1&b=2",
                "/clusters/1", "/images/1", "/patches/1"):
        html = client.get(url).text
        assert EVIL not in html, url
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in client.get("/runs/1/labels/1").text


def test_dataset_and_file_names_are_escaped_everywhere(mined_settings, client):
    with engine_for(mined_settings.db_url).begin() as conn:
        conn.execute(text("UPDATE datasets SET name = :n"), {"n": EVIL})
        conn.execute(text("UPDATE images SET original_path = :n"), {"n": EVIL + ".png"})
    for url in ("/", "/datasets/1", "/runs/1", "/runs/1/labels/1", "/runs/1/compare?a=1&b=2",
                "/clusters/1", "/images/1", "/patches/1", "/jobs"):
        html = client.get(url).text
        assert EVIL not in html, url
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;.png" in client.get("/images/1").text


@pytest.mark.parametrize("url", ["/runs/1/labels/1", "/runs/1", "/clusters/1", "/images/5",
                                 "/patches/1", "/patches/1/similar?label=1", "/", "/datasets/1"])
def test_pages_read_through_indexes_not_whole_tables(mined_settings, client, url):
    client.get(url)  # warm up: the first request may read the schema
    with captured_sql(mined_settings) as statements:
        assert client.get(url).status_code == 200
    assert statements
    assert full_scans(mined_settings, statements) == []


def test_cached_gallery_pages_follow_a_re_mined_run(mined_settings, client):
    """Pages of a ready run are cached per process; a new mining (a rewritten index) or a run
    that is not ready is read afresh."""
    import os

    first = client.get("/runs/1/labels/1.json").json()["clusters"][0]
    with engine_for(mined_settings.db_url).begin() as conn:
        conn.execute(text("UPDATE clusters SET median_typicality = 42 WHERE id = :id"),
                     {"id": first["id"]})
        conn.execute(text("UPDATE mining_runs SET status = 'mining' WHERE id = 1"))
    assert client.get("/runs/1/labels/1.json").json()["clusters"][0]["median_typicality"] == 42
    with engine_for(mined_settings.db_url).begin() as conn:
        conn.execute(text("UPDATE clusters SET median_typicality = 43 WHERE id = :id"),
                     {"id": first["id"]})
        conn.execute(text("UPDATE mining_runs SET status = 'ready' WHERE id = 1"))
    index = mined_settings.runs_dir / "1" / "index.faiss"
    os.utime(index, ns=(index.stat().st_atime_ns, index.stat().st_mtime_ns + 10**9))
    assert client.get("/runs/1/labels/1.json").json()["clusters"][0]["median_typicality"] == 43
    assert "43" in client.get("/runs/1/labels/1").text
