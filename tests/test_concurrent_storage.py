"""Several processes and requests on one data folder at once (issue 14, "Concurrency and
storage"): concurrent ingests lose nothing and fail clearly, a failing one removes only what it
alone made, the schema is created once under a lock, the server's secret is written whole, the
lease length is a setting, and an ingest job retried after its commit still cleans up."""
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select, text

from app.db import engine_for, session_scope, upgrade
from app.ingest import ingest_dataset
from app.jobs import enqueue
from app.models import Dataset, Image, utcnow
from app.settings import Settings
from tests.cli_helpers import diffmine_json
from tests.conftest import label_files, write_zip
from tests.helpers import free_port, job_row, wait_for_server, wait_until
from worker import queue

NOT_AN_IMAGE = "diffmine ingest: a/bad.png: not an image file (Pillow cannot identify it)"


def good_zip(tmp_path, name: str, start: int, per_label: int = 3):
    return write_zip(tmp_path / f"{name}.zip", label_files({"a": per_label, "b": per_label}, start=start))


def bad_zip(tmp_path, name: str, start: int):
    files = label_files({"a": 3, "b": 3}, start=start)
    files["a/bad.png"] = b"not an image"
    return write_zip(tmp_path / f"{name}.zip", files)


def ingest_at_once(home, sources: list[tuple[str, object]]) -> dict[str, tuple[int, str, str]]:
    """`diffmine ingest SOURCE --name NAME` for every (name, source), all started at once; the
    exit code, stdout and stderr of each, by name (two sources may share a name: "name#2")."""
    started = {}
    for name, source in sources:
        key = name if name not in started else f"{name}#2"
        started[key] = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "ingest", str(source), "--name", name,
             "--min-per-label", "3", "--home", str(home), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return {key: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for key, p in started.items()}


def check_folder(home, expected: dict[str, int]) -> None:
    """Exactly the `expected` datasets ({name: images}) are listed, every image row has its file,
    no staged file is left, and SQLite finds the database intact."""
    listed = diffmine_json(home, "datasets")["datasets"]
    assert {d["name"]: d["images"] for d in listed} == expected
    settings = Settings(home=home)
    with session_scope(settings) as session:
        rows = dict(session.execute(select(Dataset.name, func.count(Image.id))
                                    .join(Image).group_by(Dataset.name)).all())
        stored = session.scalars(select(Image.stored_path)).all()
    assert rows == expected
    assert all((home / path).is_file() for path in stored)
    assert not [p for p in (home / "staging").rglob("*") if p.is_file()]
    with engine_for(settings.db_url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_concurrent_ingests_into_a_new_folder_lose_nothing(tmp_path):
    home = tmp_path / "new-home"
    sources = [(f"good{i}", good_zip(tmp_path, f"good{i}", 100 * i)) for i in range(4)]
    sources += [(f"bad{i}", bad_zip(tmp_path, f"bad{i}", 1000 + 100 * i)) for i in range(2)]
    done = ingest_at_once(home, sources)
    for i in range(4):
        code, out, err = done[f"good{i}"]
        assert code == 0, err
        assert json.loads(out)["images"] == 6
    for i in range(2):
        code, out, err = done[f"bad{i}"]
        assert code == 1 and out == "" and err.splitlines() == [NOT_AN_IMAGE]
    check_folder(home, {f"good{i}": 6 for i in range(4)})


def test_concurrent_ingests_into_an_existing_folder_lose_nothing(settings, tmp_path):
    home = settings.home_dir
    sources = [(f"good{i}", good_zip(tmp_path, f"good{i}", 100 * i)) for i in range(3)]
    sources += [("bad", bad_zip(tmp_path, "bad", 1000)),
                # Two ingests of one name: one wins, the other is told so.
                ("twin", good_zip(tmp_path, "twin1", 2000)), ("twin", good_zip(tmp_path, "twin2", 3000))]
    done = ingest_at_once(home, sources)
    for i in range(3):
        assert done[f"good{i}"][0] == 0, done[f"good{i}"][2]
    assert done["bad"][0] == 1 and done["bad"][2].splitlines() == [NOT_AN_IMAGE]
    twins = sorted([done["twin"], done["twin#2"]])
    assert [code for code, _, _ in twins] == [0, 1], twins
    assert twins[1][2].splitlines() == ["diffmine ingest: a dataset named 'twin' already exists"]
    check_folder(home, {"good0": 6, "good1": 6, "good2": 6, "twin": 6})


def test_a_failed_first_ingest_removes_only_what_it_made(tmp_path):
    """A failing ingest that created the folder removes it; the folder and database are then
    made again by the next process, with nothing lost."""
    home = tmp_path / "new-home"
    done = ingest_at_once(home, [("bad", bad_zip(tmp_path, "bad", 0))])
    assert done["bad"][0] == 1 and not home.exists()
    done = ingest_at_once(home, [("bad", bad_zip(tmp_path, "bad", 0)),
                                 ("good", good_zip(tmp_path, "good", 500))])
    assert done["good"][0] == 0, done["good"][2]
    check_folder(home, {"good": 6})


# --- the web server ---------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    """`diffmine serve` over a new data folder: (its URL, its data folder). Every small upload is
    ingested within its request here (no cap), so that concurrent ingests meet in the database."""
    home, port = tmp_path / "served", free_port()
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--home", str(home),
                                "--port", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, DIFFMINE_MAX_INLINE_INGESTS="8"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, process)
        yield base, home
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def upload_at_once(base: str, uploads: list[tuple[str, bytes]]) -> list[httpx.Response]:
    """POST /upload of every (name, zip bytes) from its own thread, all released together."""
    barrier = threading.Barrier(len(uploads))
    responses: list = [None] * len(uploads)

    def post(index: int, name: str, content: bytes) -> None:
        barrier.wait()
        responses[index] = httpx.post(base + "/upload", data={"name": name},
                                      files={"file": (f"{name}.zip", content, "application/zip")},
                                      headers={"Accept": "application/json"}, timeout=120)

    threads = [threading.Thread(target=post, args=(i, *upload)) for i, upload in enumerate(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_concurrent_uploads_each_succeed_or_say_the_name_is_taken(server, tmp_path):
    base, home = server
    distinct = [(f"set{i}", good_zip(tmp_path, f"set{i}", 100 * i, per_label=8).read_bytes())
                for i in range(5)]
    responses = upload_at_once(base, distinct)
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]

    same = [("same", good_zip(tmp_path, f"same{i}", 1000 + 100 * i, per_label=8).read_bytes())
            for i in range(3)]
    responses = upload_at_once(base, same)
    assert sorted(r.status_code for r in responses) == [200, 400, 400], [r.text for r in responses]
    for refused in (r for r in responses if r.status_code == 400):
        assert "already exists" in refused.json()["detail"]
    with session_scope(Settings(home=home)) as session:
        names = dict(session.execute(select(Dataset.name, Dataset.image_count)).all())
    assert names == {**{f"set{i}": 16 for i in range(5)}, "same": 16}


# --- the server's secret ------------------------------------------------------------------------
RACER = """
import json, sys, time
from pathlib import Path
from app.settings import Settings
from app.web.security import server_secret
base, count = Path(sys.argv[1]), int(sys.argv[2])
(base / f"ready-{sys.argv[3]}").touch()
while not (base / "go").exists():
    time.sleep(0.001)
print(json.dumps([server_secret(Settings(home=base / f"home{i}")) for i in range(count)]))
"""


def test_server_processes_starting_at_once_agree_on_one_whole_secret(tmp_path):
    count, racers = 40, 5
    processes = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(count), str(n)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in range(racers)]
    wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == racers, timeout=120,
               message="the processes to be ready")
    (tmp_path / "go").touch()
    seen = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        seen.append(json.loads(out))
    for i in range(count):
        secrets = {s[i] for s in seen}
        path = tmp_path / f"home{i}" / "web-secret"
        assert secrets == {path.read_text()} and len(path.read_text()) == 64, (i, secrets)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in path.parent.iterdir()) == ["web-secret"]  # no temporary left


# --- lease length ---------------------------------------------------------------------------------
def queue_blocked_ingest(settings: Settings, tmp_path) -> tuple[int, str]:
    """An ingest job whose source is a named pipe: the worker that claims it waits, the job
    running, until the test opens the pipe (`release`); then it fails (not a zip)."""
    pipe = tmp_path / "pipe.zip"
    os.mkfifo(pipe)
    with session_scope(settings) as session:
        job_id = enqueue(session, kind="ingest", params={"source": str(pipe), "name": "pipe"}).id
    return job_id, str(pipe)


def release(pipe: str, *, timeout: float = 60) -> bool:
    """Let the worker reading the pipe go on: open it for writing once the worker has opened it
    for reading (before, the open fails with ENXIO). False when no worker opened it in time."""
    def opened() -> bool:
        try:
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return False
        return True

    try:
        wait_until(opened, timeout=timeout, interval=0.05, message="the worker to open the pipe")
    except AssertionError:
        return False
    return True


def lease_of_running(settings: Settings, job_id: int) -> timedelta:
    job = wait_until(lambda: (row := job_row(settings, job_id)).status == "running" and row,
                     timeout=120, message="a worker to claim the job")
    return job.lease_until - job.heartbeat_at


def test_serve_with_worker_uses_the_lease_setting(tmp_path):
    settings = Settings(home=tmp_path / "home")
    upgrade(settings)
    job_id, pipe = queue_blocked_ingest(settings, tmp_path)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--with-worker", "--home",
                               str(settings.home_dir), "--port", str(port)],
                              env=dict(os.environ, DIFFMINE_LEASE_SECONDS="123"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", server)
        assert lease_of_running(settings, job_id) == timedelta(seconds=123)
        assert release(pipe)
        wait_until(lambda: job_row(settings, job_id).status == "failed", timeout=60,
                   message="the released job to end")
    finally:
        release(pipe, timeout=10)  # also when the test failed: the worker stops only once released
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def test_the_worker_flag_overrides_the_lease_setting(settings, tmp_path, start_worker, monkeypatch):
    monkeypatch.setenv("DIFFMINE_LEASE_SECONDS", "123")
    job_id, pipe = queue_blocked_ingest(settings, tmp_path)
    worker = start_worker(settings.home_dir, "--poll", "0.2", "--lease", "7", "--exit-when-idle")
    try:
        assert lease_of_running(settings, job_id) == timedelta(seconds=7)
    finally:
        release(pipe, timeout=10)
    assert worker.wait(timeout=60) == 0, worker.stderr.read()


# --- an ingest job retried after its commit ---------------------------------------------------
def test_an_ingest_retried_after_its_commit_still_removes_the_upload(settings, tmp_path, start_worker):
    upload = settings.staging_dir / "uploads" / "f00d"
    upload.mkdir(parents=True)
    archive = good_zip(upload, "pets", 0)
    with session_scope(settings) as session:
        job_id = enqueue(session, kind="ingest", params={
            "source": str(archive), "name": "pets", "min_images_per_label": 3,
            "remove_after": str(upload), "display_source": "upload:pets.zip"}).id
    # The first attempt: claimed, committed, and killed before anything after its commit (what
    # its worker would have done: the same service, with the job's staging key).
    assert queue.claim_next(settings, worker_id="dead", lease_seconds=0.01) == job_id
    ingest_dataset(settings, source=str(archive), name="pets", min_images_per_label=3,
                   staging_key=f"job-{job_id}")
    wait_until(lambda: job_row(settings, job_id).lease_until < utcnow(), timeout=10, interval=0.01,
               message="the dead attempt's lease to run out")
    worker = start_worker(settings.home_dir, "--poll", "0.2", "--exit-when-idle")
    assert worker.wait(timeout=120) == 0, worker.stderr.read()
    job = job_row(settings, job_id)
    assert job.status == "succeeded" and job.result["resumed"] and job.attempts == 2
    assert not upload.exists()
    with session_scope(settings) as session:
        assert session.scalar(select(Dataset.source).where(Dataset.name == "pets")) == "upload:pets.zip"
        assert session.execute(text("SELECT COUNT(*) FROM images")).scalar() == 6
