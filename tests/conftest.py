"""Shared fixtures: a fresh data directory per test, real image files to upload, a mined data
directory and a web client over it, worker processes, one torch thread."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

# pytest-xdist runs test files side by side (addopts: -n auto): the cores are split between its
# workers, set before torch is imported here or in the worker processes the tests start, since
# OpenMP threads that outnumber the cores spin against each other (10x slower forward passes).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Starlette's TestClient sends `Host: testserver`: a name the web app answers to only when told
# (docs/security.md, "The web boundary"). Servers the tests start are reached as 127.0.0.1.
os.environ.setdefault("DIFFMINE_ALLOWED_HOSTS", "testserver")

import pytest
from PIL import Image, ImageDraw
from sqlalchemy import inspect, text

from app.db import engine_for, upgrade
from app.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(home=tmp_path / "home", min_images_per_label=3)
    upgrade(s)
    return s


def png_bytes(seed: int, size: int = 32, mode: str = "RGB") -> bytes:
    """A small distinct image: a coloured shape whose position depends on the seed."""
    image = Image.new(mode, (size, size), (seed * 37 % 256, 90, 200) if mode == "RGB" else 0)
    draw = ImageDraw.Draw(image)
    offset = seed % (size // 2)
    draw.rectangle([offset, offset, offset + size // 3, offset + size // 4],
                   fill=(255, (seed * 11) % 256, 0) if mode == "RGB" else 255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_files(labels: dict[str, int], start: int = 0) -> dict[str, bytes]:
    """{"cat/0.png": bytes, ...}: `n` distinct images per label."""
    files, seed = {}, start
    for label, count in labels.items():
        for i in range(count):
            files[f"{label}/{i}.png"] = png_bytes(seed)
            seed += 1
    return files


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A zip archive of `files` (name -> content), in memory: what a browser uploads."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def snapshot(settings: Settings) -> tuple[dict, set]:
    """Row counts of every table, and every file and folder in the data directory (but the
    database's own files); folders end in "/", so an empty one left behind shows too."""
    engine = engine_for(settings.db_url)
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f'SELECT COUNT(*) FROM "{t}"')).scalar()
                  for t in inspect(conn).get_table_names()}
    paths = {p.relative_to(settings.home_dir).as_posix() + ("/" if p.is_dir() else "")
             for p in settings.home_dir.rglob("*") if not p.name.startswith("diffmine.sqlite")}
    return counts, paths


@pytest.fixture(scope="session")
def mined_template(tmp_path_factory) -> Path:
    from tests.mined import build_mined_home

    return build_mined_home(tmp_path_factory.mktemp("mined") / "home")


@pytest.fixture
def mined_settings(mined_template, tmp_path) -> Settings:
    """A data directory with one dataset, one trained model and one mined run (ids 1)."""
    from tests.mined import copy_mined_home

    return Settings(home=copy_mined_home(mined_template, tmp_path / "home"))


@pytest.fixture
def start_worker():
    """start_worker(home, *flags) -> a real `diffmine worker` process, killed after the test."""
    import subprocess
    import sys

    started: list[subprocess.Popen] = []

    def start(home, *flags):
        started.append(subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--home", str(home), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
def client(mined_settings):
    """A web client over the mined data directory (test files over other data define their own)."""
    from fastapi.testclient import TestClient

    from app.web import create_app

    return TestClient(create_app(mined_settings))


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (pytestmark = pytest.mark.usefixtures("one_thread")):
    tiny models' ops are too small for intra-op threads, one thread is as fast on an idle 2-core
    machine and many times faster on a busy one. Function-scoped so that it runs after (and
    overrides) any per-test thread setting of a conftest."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def kill_started():
    """The processes a test registered with `tests.helpers.started` are gone after it."""
    from tests.helpers import kill_started as kill

    yield
    kill()


@pytest.fixture
def pets_home(tmp_path) -> Path:
    """A data folder holding one small dataset, "pets": 6 cats and 6 dogs."""
    from app.ingest import ingest_dataset

    source = write_folder(tmp_path / "pets", label_files({"cat": 6, "dog": 6}))
    home = tmp_path / "home"
    ingest_dataset(Settings(home=home), source=str(source), name="pets", min_images_per_label=3)
    return home
