"""Memory per request (docs/security.md, "Memory per request"): zips ingested within their
request are capped per server process and the rest are queued, the page cache is bounded by
bytes, and the gallery's page size is capped. Real servers, real concurrent requests."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import tracemalloc
import zipfile

import httpx
import numpy as np
import psutil
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import text

from app.db import engine_for, session_scope, upgrade
from app.services.galleries import clusters_page
from app.settings import Settings
from app.web import create_app
from app.web.page_cache import PageCache, approximate_size
from tests.cli_helpers import diffmine_json, run_diffmine
from tests.helpers import free_port, wait_for_server
from tests.web_helpers import csrf_from

MiB = 2**20


def noise_png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_zip(start: int, count: int) -> bytes:
    """`count` distinct images in two labels: a zip of about count KB, ingested in about
    count / 600 seconds here (slow enough for the uploads sent with it to overlap it)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"{'ab'[i % 2]}/{i}.png", noise_png(start + i))
    return buffer.getvalue()


def start_server(home, **environment) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--home", str(home),
                               "--port", str(port)], env=dict(os.environ, **environment),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_for_server(base, server)
    return server, base


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a connection it still waits on
        server.kill()
        server.wait(timeout=30)


# --- in-request ingests ------------------------------------------------------------------------
def test_concurrent_small_uploads_beyond_the_cap_are_queued_as_jobs(tmp_path):
    """Three small zips at once with DIFFMINE_MAX_INLINE_INGESTS=1: one is ingested within its
    request, the other two become ingest jobs, which a worker then completes. Before the cap,
    all three were ingested at once inside the server (1.9 GB for three large-pixel images)."""
    home = tmp_path / "home"
    count = 1200
    zips = {f"set{n}": noise_zip(n * count, count) for n in range(3)}
    assert all(len(z) < 4 * MiB for z in zips.values())  # each small enough to go inline
    server, base = start_server(home, DIFFMINE_MAX_INLINE_INGESTS="1",
                                DIFFMINE_MIN_IMAGES_PER_LABEL="3")
    answers: dict[str, httpx.Response] = {}
    barrier = threading.Barrier(len(zips))

    def send(name: str) -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            barrier.wait()
            answers[name] = client.post("/upload", data={"name": name},
                                        files={"file": (f"{name}.zip", zips[name], "application/zip")},
                                        headers={"Accept": "application/json"})
    try:
        threads = [threading.Thread(target=send, args=(name,)) for name in zips]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    finally:
        stop(server)
    assert sorted(answers) == sorted(zips)
    assert all(a.status_code == 200 for a in answers.values()), {n: a.text for n, a in answers.items()}
    inline = sorted(n for n, a in answers.items() if a.json()["url"].startswith("/datasets/"))
    queued = sorted(n for n, a in answers.items() if a.json()["url"].startswith("/jobs/"))
    assert len(inline) == 1 and len(queued) == 2, {n: a.json() for n, a in answers.items()}
    # The queued ones wait for a worker with their staged zips, and succeed once one runs.
    assert len(list((home / "staging" / "uploads").glob("*/*.zip"))) == 2
    worker = run_diffmine(home, "worker", "--exit-when-idle", "--poll", "0.2")
    assert worker.returncode == 0, worker.stderr
    listed = {d["name"]: d for d in diffmine_json(home, "datasets")["datasets"]}
    assert sorted(listed) == sorted(zips)
    assert all(d["images"] == count for d in listed.values()), listed
    assert not list((home / "staging" / "uploads").glob("*/*.zip"))


def test_with_no_inline_slots_every_upload_is_a_job(tmp_path):
    settings = Settings(home=tmp_path / "home", max_inline_ingests=0, min_images_per_label=3)
    upgrade(settings)
    client = TestClient(create_app(settings))
    response = client.post("/upload", data={"name": "pets"}, headers={"Accept": "application/json"},
                           files={"file": ("pets.zip", noise_zip(0, 8), "application/zip")})
    assert response.status_code == 200 and response.json()["url"] == "/jobs/1"


def test_a_negative_inline_cap_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="max_inline_ingests"):
        Settings(home=tmp_path, max_inline_ingests=-1)


# --- the page cache ----------------------------------------------------------------------------
def test_the_page_cache_is_bounded_by_bytes_and_keeps_the_recently_used():
    cache = PageCache(1 * MiB)
    page = "x" * (100 * 1024)  # about 100 KB each
    for n in range(40):
        assert cache.put(("page", n), page + str(n))
        assert cache.bytes <= cache.max_bytes
        cache.get(("page", 0))  # used again and again: stays
    assert 8 <= len(cache.items) <= 10
    assert cache.get(("page", 0)) is not None and cache.get(("page", 1)) is None
    assert cache.get(("page", 39)).endswith("39")
    # One value above a quarter of the bound is not kept, and pushes nothing out.
    held = dict(cache.items)
    assert not cache.put("huge", "y" * (300 * 1024))
    assert cache.get("huge") is None and dict(cache.items) == held
    # Replacing an entry counts it once.
    before = cache.bytes
    cache.put(("page", 39), page + "39")
    assert cache.bytes == before
    assert not PageCache(0).put("anything", "z")


def test_approximate_size_is_what_a_gallery_page_holds(mined_settings):
    """The size the cache counts is the memory the page takes (tracemalloc), within 20%."""
    grow_label(mined_settings, clusters=20, members=100)
    with session_scope(mined_settings) as session:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            page = clusters_page(session, run_id=1, label_id=1, offset=3, limit=20, members=100)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert sum(len(c["members"]) for c in page["clusters"]) == 20 * 100
    assert 0.8 * held <= approximate_size(page) <= 1.2 * held, (approximate_size(page), held)


def grow_label(settings: Settings, *, run_id: int = 1, label_id: int = 1, clusters: int,
               members: int) -> None:
    """Make a label of the mined run a large one: `clusters` more clusters (ranked after its
    own) of `members` patches each, so that its gallery pages are as large as the caps allow."""
    with engine_for(settings.db_url).begin() as conn:
        patch = conn.execute(text("SELECT image_id, x0, y0, x1, y1, crop_path FROM patches "
                                  "WHERE run_id = :r AND label_id = :l LIMIT 1"),
                             {"r": run_id, "l": label_id}).one()
        first = conn.execute(text("SELECT MAX(id) FROM patches")).scalar() + 1
        conn.execute(text("INSERT INTO patches (id, run_id, image_id, label_id, x0, y0, x1, y1, "
                          "score, crop_path) VALUES (:id, :r, :i, :l, :x0, :y0, :x1, :y1, :s, :c)"),
                     [{"id": first + k, "r": run_id, "i": patch.image_id, "l": label_id,
                       "x0": patch.x0, "y0": patch.y0, "x1": patch.x1, "y1": patch.y1,
                       "s": 0.5 - k * 1e-4, "c": patch.crop_path} for k in range(members)])
        rank = conn.execute(text("SELECT MAX(rank) FROM clusters WHERE run_id = :r AND "
                                 "label_id = :l"), {"r": run_id, "l": label_id}).scalar() + 1
        cluster = conn.execute(text("SELECT MAX(id) FROM clusters")).scalar() + 1
        conn.execute(text("INSERT INTO clusters (id, run_id, label_id, rank, size, "
                          "median_typicality, is_artifact) VALUES (:id, :r, :l, :rank, :n, 0.1, 0)"),
                     [{"id": cluster + c, "r": run_id, "l": label_id, "rank": rank + c,
                       "n": members} for c in range(clusters)])
        conn.execute(text("INSERT INTO cluster_members (cluster_id, patch_id, position, distance) "
                          "VALUES (:c, :p, :k, :d)"),
                     [{"c": cluster + c, "p": first + k, "k": k, "d": k * 1e-3}
                      for c in range(clusters) for k in range(members)])


def test_the_gallery_caps_its_page_size(client):
    assert client.get("/runs/1/labels/1.json?per_page=51").status_code == 422
    assert client.get("/runs/1/labels/1.json?members=201").status_code == 422
    assert client.get("/runs/1/labels/1.json?per_page=50&members=200").status_code == 200


def test_large_gallery_pages_keep_the_cache_under_its_bound(mined_settings):
    """Pages of 50 clusters x 200 members take about 8 MB each in the cache: many distinct
    ones leave it at its bound (read in-process), however many were asked for."""
    grow_label(mined_settings, clusters=60, members=200)
    client = TestClient(create_app(mined_settings.model_copy(update={"page_cache_bytes": 40 * MiB})))
    cache = client.app.state.page_cache
    for offset in range(12):
        assert client.get(f"/runs/1/labels/1?offset={offset}&per_page=50&members=200").status_code == 200
        assert cache.bytes <= 40 * MiB
    pages = [key for key in cache.items if isinstance(key[0], tuple)]  # (run version, ...)
    assert 3 <= len(pages) <= 5, cache.bytes  # the last pages asked for: 8 MB each, 40 MB in all
    assert (client.get("/runs/1/labels/1?offset=11&per_page=50&members=200").text
            == client.get("/runs/1/labels/1?offset=11&per_page=50&members=200").text)


def test_a_server_fetching_many_large_gallery_pages_stays_within_its_cache_bound(mined_settings):
    """The issue's case on a real server: 100 distinct offsets of 8 MB pages took it from 166 MB
    to 978 MB. With the cache bounded at 32 MB, 40 such pages grow it by less than 32 MB plus
    the slack of rendering one page and the allocator (96 MB); unbounded they took 300+ MB."""
    grow_label(mined_settings, clusters=90, members=200)
    server, base = start_server(mined_settings.home_dir, DIFFMINE_PAGE_CACHE_BYTES=str(32 * MiB))
    try:
        process = psutil.Process(server.pid)
        with httpx.Client(base_url=base, timeout=60) as client:
            def page(offset: int) -> None:
                response = client.get(f"/runs/1/labels/1?offset={offset}&per_page=50&members=200")
                assert response.status_code == 200 and len(response.content) > MiB  # a large page

            for offset in range(2):  # warm up: imports, templates, SQLite's page cache
                page(offset)
            before = process.memory_info().rss
            for offset in range(2, 42):
                page(offset)
            grown = process.memory_info().rss - before
    finally:
        stop(server)
    assert grown < (32 + 96) * MiB, f"the server grew by {grown / MiB:.0f} MB"


# --- form bodies -------------------------------------------------------------------------------
TOKEN = "a-token-long-enough-for-sharing"


def test_a_form_body_is_bounded_even_on_the_open_login_page(tmp_path):
    """Starlette parses a form in memory (up to 1,000 fields of 1 MB): one 300 MB POST to /login,
    open to anyone when the server is shared, grew the server by 290 MB. Now a form's body is
    refused with a 413 past 1 MB: at once by its Content-Length, else as it arrives."""
    import http.client

    server, base = start_server(tmp_path / "home", DIFFMINE_TOKEN=TOKEN)
    process = psutil.Process(server.pid)
    try:
        # A declared length too large: refused before a byte of the body is read.
        connection = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=10)
        connection.putrequest("POST", "/login")
        connection.putheader("Content-Type", "application/x-www-form-urlencoded")
        connection.putheader("Content-Length", str(300 * MiB))
        connection.endheaders()
        declared = connection.getresponse()
        assert declared.status == 413 and b"larger than the limit" in declared.read()
        connection.close()

        # A chunked body of 300 MB: refused once 1 MB has come, memory watched meanwhile.
        before, peak, watching = process.memory_info().rss, [0], threading.Event()

        def watch() -> None:
            while not watching.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                watching.wait(0.01)

        def body():
            for n in range(300):
                yield b"f%d=" % n + b"x" * 1_000_000 + b"&"

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with httpx.Client(base_url=base, timeout=120) as client:
                streamed = client.post("/login", content=body(), headers={
                    "Content-Type": "application/x-www-form-urlencoded"})
        finally:
            watching.set()
            watcher.join()
        assert peak[0] - before < 32 * MiB, f"the server grew by {(peak[0] - before) / MiB:.0f} MB"
        assert streamed.status_code == 413, streamed.text

        # A form of ordinary size still works: the login with the token.
        with httpx.Client(base_url=base, timeout=30) as client:
            csrf = csrf_from(client.get("/login").text)
            login = client.post("/login", data={"token": TOKEN, "next": "/", "csrf_token": csrf})
        assert login.status_code == 303 and "diffmine_auth" in login.headers.get("set-cookie", "")
    finally:
        stop(server)
