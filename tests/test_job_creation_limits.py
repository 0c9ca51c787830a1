"""Job creation (issue 14, section 7): a double-clicked run form, or a command run twice, queues
one job, not two; a dataset's queued and running jobs are capped, with a clear message (429 on
the web, an error line from the CLI) and nothing created."""
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Job, MiningRun, TrainedModel
from app.settings import Settings
from tests.cli_helpers import diffmine_in_process
from tests.helpers import free_port, wait_for_server

RUN_FORM = {"preset": "fast", "backend": "pixel", "size": "tiny", "steps": "20", "draws": "2",
            "per_label": "5", "clusters": "2"}


@pytest.fixture
def home(pets_home):
    return pets_home


def counts(home) -> tuple[int, int, int]:
    with session_scope(Settings(home=home)) as session:
        return tuple(session.scalar(select(func.count()).select_from(table))
                     for table in (Job, TrainedModel, MiningRun))


def post_run(base: str, **fields) -> tuple[int, dict]:
    """The run form posted as a script would (JSON answer): (status, body)."""
    body = urllib.parse.urlencode(dict(RUN_FORM, **fields)).encode()
    request = urllib.request.Request(f"{base}/datasets/1/runs", data=body, method="POST",
                                     headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_identical_run_forms_queue_one_job_and_the_cap_refuses_more(home):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--home", str(home), "--port", str(port)],
        env=dict(os.environ, DIFFMINE_MAX_PENDING_JOBS_PER_DATASET="3"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, server)
        # A double-click, and then some: the same form posted four times at once.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post_run(base, seed="0"), range(4)))
        assert {status for status, _ in answers} == {200}, answers
        assert len({body["job"] for _, body in answers}) == 1, answers
        assert len({body["run"] for _, body in answers}) == 1, answers
        assert counts(home) == (1, 1, 1)  # one job, one model, one run

        assert post_run(base, seed="1")[0] == post_run(base, seed="2")[0] == 200
        assert counts(home) == (3, 3, 3)
        status, body = post_run(base, seed="3")
        assert status == 429, body
        assert "already has 3 jobs queued or running" in body["detail"]
        assert "DIFFMINE_MAX_PENDING_JOBS_PER_DATASET=3" in body["detail"]
        assert counts(home) == (3, 3, 3)  # nothing of the refused run was kept
        # The same request as a queued one is still answered with that job, not refused.
        assert post_run(base, seed="1")[0] == 200
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def test_the_cli_queues_a_command_once_and_refuses_past_the_cap(home, capsys, monkeypatch):
    first = diffmine_in_process(capsys, "train", "pets", "--size", "tiny", "--queue", home=home)
    again = diffmine_in_process(capsys, "train", "pets", "--size", "tiny", "--queue", home=home)
    assert again["job"] == first["job"] and counts(home) == (1, 1, 0)
    other = diffmine_in_process(capsys, "train", "pets", "--size", "tiny", "--seed", "1", "--queue",
                                home=home)
    assert other["job"] != first["job"]

    monkeypatch.setenv("DIFFMINE_MAX_PENDING_JOBS_PER_DATASET", "2")
    diffmine_in_process(capsys, "train", "pets", "--size", "tiny", "--seed", "2", "--queue",
                        home=home, expect=1)
    error = capsys.readouterr().err
    assert "diffmine train: dataset 'pets' already has 2 jobs queued or running" in error
    assert "DIFFMINE_MAX_PENDING_JOBS_PER_DATASET=2" in error and "diffmine cancel" in error
    assert counts(home) == (2, 2, 0)
    # Cancelling one makes room.
    diffmine_in_process(capsys, "cancel", str(first["job"]), home=home)
    diffmine_in_process(capsys, "train", "pets", "--size", "tiny", "--seed", "2", "--queue", home=home)
    assert counts(home) == (3, 3, 0)
