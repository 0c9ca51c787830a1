"""Killed processes leave nothing behind for good (issue 14, section 8): an ingest killed while
staging or between moving its files into images/ and its commit, and a web server killed during
an upload or during the ingest inside the request, leave staging folders and files no row
references; `diffmine doctor` (and `diffmine serve` as it starts) removes them, and never what a
live ingest, request or queued job uses."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.ingest import ingest_dataset
from app.models import Dataset, Image
from app.settings import Settings
from tests.cli_helpers import diffmine_json
from tests.conftest import label_files, snapshot, write_folder, zip_bytes
from tests.helpers import free_port, started, wait_for_server, wait_until

PAUSE = "DIFFMINE_TEST_PAUSE_AT"


@pytest.fixture
def settings(tmp_path) -> Settings:
    """A data folder holding one dataset already (the kills must not touch it)."""
    source = write_folder(tmp_path / "pets", label_files({"cat": 6, "dog": 6}))
    settings = Settings(home=tmp_path / "home")
    ingest_dataset(settings, source=str(source), name="pets", min_images_per_label=3)
    return settings


def start(settings: Settings, *args, pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, **({PAUSE: pause} if pause else {}))
    return started(subprocess.Popen([sys.executable, "-m", "app.cli", *args, "--home", str(settings.home_dir)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def paused(process: subprocess.Popen, point: str) -> None:
    """Wait until the ingest in `process` says it is paused at `point`."""
    line = process.stderr.readline()
    while line and f"paused at {point}" not in line:
        line = process.stderr.readline()
    assert line, f"the ingest exited ({process.wait()}) before pausing at {point}"


def unreferenced(settings: Settings) -> list[str]:
    """Files under images/ and thumbs/ that no image row references."""
    with session_scope(settings) as session:
        used = set(session.scalars(select(Image.stored_path))) | set(session.scalars(select(Image.thumb_path)))
    return sorted(p.relative_to(settings.home_dir).as_posix()
                  for folder in ("images", "thumbs") for p in (settings.home_dir / folder).rglob("*")
                  if p.is_file() and p.relative_to(settings.home_dir).as_posix() not in used)


def missing(settings: Settings) -> list[str]:
    """Files the image rows reference that are not there."""
    with session_scope(settings) as session:
        paths = session.execute(select(Image.stored_path, Image.thumb_path)).all()
    return [p for row in paths for p in row if not (settings.home_dir / p).is_file()]


def test_an_ingest_killed_while_staging_or_before_its_commit_leaves_what_doctor_removes(settings, tmp_path):
    before = snapshot(settings)
    more = write_folder(tmp_path / "more", label_files({"cat": 6, "dog": 6}, start=100))
    for number, point in enumerate(("staged", "published")):
        ingest = start(settings, "ingest", str(more), "--name", f"more{number}", "--min-per-label", "3",
                       pause=point)
        paused(ingest, point)
        ingest.kill()
        ingest.wait(timeout=30)
    leftovers = snapshot(settings)[1] - before[1]
    assert any(p.startswith("staging/") for p in leftovers)
    orphans = unreferenced(settings)
    assert len(orphans) == 12  # moved into images/ by the second ingest, never committed

    dry = diffmine_json(settings.home_dir, "doctor", "--dry-run")
    assert dry["dry_run"] and len(dry["staging"]) == 2 and dry["files"] == 12
    assert snapshot(settings)[1] - before[1] == leftovers  # a dry run changes nothing
    report = diffmine_json(settings.home_dir, "doctor")
    assert len(report["staging"]) == 2 and report["files"] == 12 and report["in_use"] == []
    assert sorted(report["file_paths"]) == orphans
    assert snapshot(settings) == before  # rows and files as before the killed ingests
    assert diffmine_json(settings.home_dir, "doctor")["files"] == 0


def test_doctor_leaves_a_live_ingest_alone(settings, tmp_path):
    more = write_folder(tmp_path / "more", label_files({"cat": 6, "dog": 6}, start=100))
    # Staged, not yet committed: its staging folder is in use.
    ingest = start(settings, "ingest", str(more), "--name", "more", "--min-per-label", "3", pause="staged")
    paused(ingest, "staged")
    report = diffmine_json(settings.home_dir, "doctor")
    assert report["staging"] == [] and report["files"] == 0 and len(report["in_use"]) == 1
    ingest.send_signal(signal.SIGUSR1)  # go on
    assert ingest.wait(timeout=120) == 0, ingest.stderr.read()

    # Moved into images/, not yet committed (holding the write lock): a doctor run meanwhile
    # waits for the commit, then finds every file referenced.
    ingest = start(settings, "ingest", str(write_folder(tmp_path / "third", label_files(
        {"cat": 6, "dog": 6}, start=200))), "--name", "third", "--min-per-label", "3", pause="published")
    paused(ingest, "published")
    doctor = start(settings, "doctor", "--json")
    ingest.send_signal(signal.SIGUSR1)
    assert ingest.wait(timeout=120) == 0, ingest.stderr.read()
    out, err = doctor.communicate(timeout=120)
    assert doctor.returncode == 0, err
    assert json.loads(out)["files"] == 0
    with session_scope(settings) as session:
        assert sorted(session.scalars(select(Dataset.name))) == ["more", "pets", "third"]
    assert missing(settings) == [] and unreferenced(settings) == []


def multipart(fields: dict, file_name: str, content: bytes, boundary: str = "diffmine-test-boundary"):
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(base: str, body: bytes, content_type: str, timeout: float = 60) -> dict:
    request = urllib.request.Request(f"{base}/upload", data=body, method="POST",
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def serve(settings: Settings, port: int, log, *, pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, **({PAUSE: pause} if pause else {}))
    return started(subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--home",
                                     str(settings.home_dir), "--port", str(port)],
                                    env=env, stdout=log, stderr=log))


def test_a_web_server_killed_during_uploads_and_ingests_leaves_nothing_for_good(settings, tmp_path):
    uploads = settings.staging_dir / "uploads"
    port, log_path = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = serve(settings, port, log, pause="published")
    try:
        wait_for_server(base, server, log=log_path)
        # A manifest for a server folder: queued as an ingest job, which will read the upload.
        folder = write_folder(tmp_path / "served", label_files({"cat": 6, "dog": 6}, start=300))
        manifest = "path,label\n" + "".join(f"{label}/{i}.png,{label}\n" for label in ("cat", "dog")
                                             for i in range(6))
        body, content_type = multipart({"name": "served", "server_path": str(folder)}, "list.csv",
                                       manifest.encode())
        queued = post(base, body, content_type)["job"]
        waiting = [p.parent for p in uploads.glob("*/list.csv")]
        assert len(waiting) == 1

        # An upload cut off halfway: the server is killed while the file streams in.
        body, content_type = multipart({"name": "big"}, "big.zip", b"x" * 2_000_000)
        cut = socket.create_connection(("127.0.0.1", port))
        cut.sendall(f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        wait_until(lambda: any(p.stat().st_size > 0 for p in uploads.glob("*/big.zip")), timeout=60,
                   message="the cut-off upload to reach staging/uploads/")

        # A small zip, ingested inside the request: killed between moving its images into
        # images/ and its commit.
        body, content_type = multipart({"name": "small"}, "small.zip",
                                       zip_bytes(label_files({"cat": 5, "dog": 5}, start=400)))
        threading.Thread(target=lambda: _ignore_errors(post, base, body, content_type), daemon=True).start()
        wait_until(lambda: "paused at published" in log_path.read_text(), timeout=120,
                   message="the ingest inside the request to pause before its commit")
        server.kill()
        server.wait(timeout=30)
        cut.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)

    assert len(list(uploads.iterdir())) == 3  # the queued manifest, the cut-off zip, the small zip
    assert [p for p in settings.staging_dir.iterdir() if p.name != "uploads"]  # the staged ingest
    assert len(unreferenced(settings)) == 10  # the small zip's images

    # The next start sweeps what the dead server left, but the upload a queued job needs.
    with open(log_path, "w") as log:
        server = serve(settings, port, log)
    try:
        wait_for_server(base, server, log=log_path)
        assert "Removed what stopped processes left: 3 staging folders" in log_path.read_text()
        assert [p for p in uploads.iterdir()] == waiting
        assert [p.name for p in settings.staging_dir.iterdir()] == ["uploads"]
        assert unreferenced(settings) == [] and missing(settings) == []
        report = diffmine_json(settings.home_dir, "doctor")
        assert report["staging"] == [] and report["files"] == 0
        assert report["in_use"] == [f"uploads/{waiting[0].name}"]
        with urllib.request.urlopen(f"{base}/jobs/{queued}.json", timeout=10) as response:
            assert json.load(response)["status"] == "queued"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def _ignore_errors(function, *args):
    try:
        function(*args)
    except OSError:
        pass  # the server was killed under it
