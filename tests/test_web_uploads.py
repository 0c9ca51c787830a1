"""Uploads from the browser: a zip streamed to disk and ingested (inline errors naming the bad
file, nothing written), a size limit answered with a plain 413, larger uploads and server
folders ingested by a worker job, manifests for server folders."""

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from app.web import create_app
from tests.conftest import label_files, snapshot, write_folder, zip_bytes
from tests.web_helpers import form_token


@pytest.fixture
def client(settings):
    """Over an empty data directory (overrides conftest's client over the mined one)."""
    return TestClient(create_app(settings))


def upload(client, content: bytes, filename="pets.zip", **fields):
    token = form_token(client)
    return client.post("/upload", data=dict(csrf_token=token, **fields),
                       files={"file": (filename, content, "application/zip")})


def test_a_small_zip_is_ingested_at_once(settings, client):
    response = upload(client, zip_bytes(label_files({"cat": 4, "dog": 3})), name="pets",
                      holdout="0.2")
    assert response.status_code == 200 and response.url.path == "/datasets/1"
    data = client.get("/datasets/1.json").json()
    assert data["name"] == "pets" and data["images"] == 7 and data["source"] == "upload:pets.zip"
    assert not list((settings.staging_dir / "uploads").glob("*/*"))  # the upload is gone


def test_a_bad_file_is_named_inline_and_nothing_is_written(settings, client):
    files = label_files({"cat": 4, "dog": 3})
    files["dog/broken.png"] = b"\x89PNG\r\n\x1a\n not really"
    before = snapshot(settings)
    response = upload(client, zip_bytes(files), name="pets")
    assert response.status_code == 400
    assert '<code class="bad-file">dog/broken.png</code>' in response.text
    assert snapshot(settings)[0] == before[0]
    assert not [p for p in settings.home_dir.rglob("*") if p.is_file()
                and p.relative_to(settings.home_dir).parts[0] in ("images", "thumbs")]
    # htmx gets the form back (2xx, so it is swapped in) with the message in it.
    token = form_token(client)
    fragment = client.post("/upload", data={"csrf_token": token, "name": "pets"},
                           files={"file": ("pets.zip", zip_bytes(files), "application/zip")},
                           headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert "dog/broken.png" in fragment.text and 'value="pets"' in fragment.text


def test_not_a_zip_and_missing_inputs_are_explained(client):
    response = upload(client, b"hello", filename="notes.txt", name="x")
    assert response.status_code == 400 and "notes.txt" in response.text and "not a zip" in response.text
    token = form_token(client)
    nothing = client.post("/upload", data={"csrf_token": token, "name": "x"})
    assert nothing.status_code == 400 and "Choose a zip file" in nothing.text
    json = client.post("/upload.json", data={"csrf_token": token, "name": "x", "holdout": "2"})
    assert json.status_code == 400 and "holdout" in json.json()["detail"]


def test_an_upload_over_the_limit_is_refused_with_413(tmp_path):
    settings = Settings(home=tmp_path / "home", max_upload_bytes=2000)
    from app.db import upgrade

    upgrade(settings)
    client = TestClient(create_app(settings))
    response = upload(client, zip_bytes(label_files({"cat": 40, "dog": 40})), name="big")
    assert response.status_code == 413 and "larger than the limit" in response.text
    assert not [p for p in (settings.staging_dir / "uploads").rglob("*") if p.is_file()]


def test_a_larger_upload_becomes_an_ingest_job(settings, client):
    from worker.runner import Worker

    client.app.state.sync_ingest_bytes = 0
    response = upload(client, zip_bytes(label_files({"cat": 4, "dog": 3})), name="pets")
    assert response.status_code == 200 and response.url.path == "/jobs/1"
    assert "Waiting for a worker" in response.text
    assert list((settings.staging_dir / "uploads").glob("*/pets.zip"))
    assert Worker(settings).run_one()
    job = client.get("/jobs/1.json").json()
    assert job["status"] == "succeeded"
    assert {"url": "/datasets/1", "text": "Open dataset pets"} in job["links"]
    dataset = client.get("/datasets/1.json").json()
    assert dataset["images"] == 7 and dataset["source"] == "upload:pets.zip"
    assert not list((settings.staging_dir / "uploads").glob("*/pets.zip"))


def test_a_server_folder_with_an_uploaded_manifest(settings, client, tmp_path):
    from worker.runner import Worker

    folder = write_folder(tmp_path / "photos", label_files({"a": 3, "b": 3}))
    manifest = "path,era\n" + "".join(f"{label}/{i}.png,{1950 + 10 * (label == 'b') + i}\n"
                                      for label in "ab" for i in range(3))
    response = upload(client, manifest.encode(), filename="labels.csv", name="eras",
                      server_path=str(folder), bin="10")
    assert response.url.path == "/jobs/1"
    assert Worker(settings).run_one()
    data = client.get("/datasets/1.json").json()
    assert {label["name"] for label in data["label_sets"][0]["labels"]} == {"1950s", "1960s"}
    # A manifest needs its folder; a missing folder is named.
    alone = upload(client, manifest.encode(), filename="labels.csv", name="x")
    assert alone.status_code == 400 and "labels.csv" in alone.text
    missing = client.post("/upload", data={"csrf_token": form_token(client), "name": "y",
                                           "server_path": str(tmp_path / "nowhere")})
    assert missing.status_code == 400 and "nowhere" in missing.text


def test_duplicate_name_is_refused_before_any_work(client):
    assert upload(client, zip_bytes(label_files({"cat": 4, "dog": 3})), name="pets").status_code == 200
    again = upload(client, zip_bytes(label_files({"cat": 4, "dog": 3}, start=50)), name="pets")
    assert again.status_code == 400 and "already exists" in again.text



def two_column_zip(start: int = 0) -> bytes:
    """Six images with a manifest of two label columns: letter (a/b) and parity (odd/even)."""
    files = label_files({"a": 3, "b": 3}, start=start)
    rows = "".join(f"{path},{path[0]},{'odd' if i % 2 else 'even'}\n" for i, path in enumerate(sorted(files)))
    return zip_bytes(files | {"manifest.csv": ("path,letter,parity\n" + rows).encode()})


def test_the_label_column_option_picks_the_manifests_label_sets(client):
    assert upload(client, two_column_zip(), name="one", label_column="parity").status_code == 200
    label_sets = client.get("/datasets/1.json").json()["label_sets"]
    assert [s["name"] for s in label_sets] == ["parity"]
    assert {label["name"] for label in label_sets[0]["labels"]} == {"odd", "even"}
    assert upload(client, two_column_zip(50), name="two", label_column="letter, parity").status_code == 200
    assert [s["name"] for s in client.get("/datasets/2.json").json()["label_sets"]] == ["letter", "parity"]
