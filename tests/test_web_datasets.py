"""Dataset pages over a real database: HTML, JSON twins, escaping, file serving."""
import pytest
from fastapi.testclient import TestClient

from app.ingest import TWEMOJI_CREDIT, ingest_dataset
from app.web import create_app
from tests.conftest import png_bytes, write_zip

EVIL = '<img src=x onerror="alert(1)">'


@pytest.fixture
def client(settings, tmp_path):
    """Over one small dataset with a manifest (overrides conftest's client over the mined one)."""
    files = {f"{i}.png": png_bytes(i) for i in range(6)}
    rows = "".join(f'{i}.png,"{EVIL.replace(chr(34), chr(34) * 2)}"\n' if i < 3 else f"{i}.png,calm\n"
                   for i in range(6))
    files["manifest.csv"] = ("path,mood\n" + rows).encode()
    ingest_dataset(settings, source=str(write_zip(tmp_path / "d.zip", files)), name="moods")
    return TestClient(create_app(settings))


def test_home_lists_datasets_with_thumbnails(client):
    page = client.get("/")
    assert page.status_code == 200
    assert "moods" in page.text and "6 images" in page.text
    assert page.text.count('src="/files/') >= 6


def test_label_names_are_escaped(client):
    for url in ("/", "/datasets/1"):
        html = client.get(url).text
        assert EVIL not in html
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


def test_json_twins(client):
    assert client.get("/index.json").json()["datasets"][0]["name"] == "moods"
    data = client.get("/datasets/1.json").json()
    assert data == client.get("/datasets/1", headers={"Accept": "application/json"}).json()
    labels = {label["name"]: label["images"] for label in data["label_sets"][0]["labels"]}
    assert labels == {"calm": 3, EVIL: 3}


def test_files_are_served_with_cache_headers_and_the_database_is_not(client):
    thumb = client.get("/datasets/1.json").json()["samples"]["1"][0]["thumb"]
    response = client.get(f"/files/{thumb}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert "immutable" in response.headers["cache-control"]
    assert client.get("/files/diffmine.sqlite").status_code == 404
    assert client.get("/files/../diffmine.sqlite").status_code == 404


def test_unknown_dataset_is_404(client):
    assert client.get("/datasets/99").status_code == 404


def test_twemoji_credit_on_the_home_and_dataset_pages(settings):
    # Twemoji's CC-BY licence asks for the credit wherever its images are shown.
    ingest_dataset(settings, source="builtin:twemoji", name="emoji", limit_per_label=5,
                   min_images_per_label=1)  # a 5-per-category sample leaves years with fewer
    client = TestClient(create_app(settings))
    for url in ("/", "/datasets/1"):
        page = client.get(url)
        assert page.status_code == 200
        assert f'<p class="credit">{TWEMOJI_CREDIT}</p>' in page.text


def test_no_twemoji_credit_for_other_datasets(client):
    assert TWEMOJI_CREDIT not in client.get("/").text
    assert TWEMOJI_CREDIT not in client.get("/datasets/1").text
