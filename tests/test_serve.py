"""`diffmine serve --with-worker` (what `diffmine demo` ends with): the pages are served and what a
visitor starts from them gets done by the worker beside the server, which stops with it."""
import json
import os
import signal
import subprocess
import sys
import urllib.request

import psutil

from tests.cli_helpers import diffmine_json
from tests.helpers import free_port, wait_for_server, wait_until


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def workers_of(home) -> list:
    return [p for p in psutil.process_iter(["cmdline"])
            if "worker" in (p.info["cmdline"] or []) and str(home) in " ".join(p.info["cmdline"] or [])]


def test_a_translation_queued_while_serving_is_done_by_the_worker_beside_it(mined_settings):
    home, port = mined_settings.home_dir, free_port()
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--with-worker", "--home", str(home),
                               "--port", str(port)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, server)
        queued = diffmine_json(home, "translate", "--patch", "1", "--invert-steps", "4", "--sample-steps", "2",
                               "--queue")
        job = wait_until(lambda: (job := get_json(f"{base}/jobs/{queued['job']}.json"))["status"]
                         not in ("queued", "running") and job, timeout=300, interval=0.5,
                         message="the worker beside the server to finish the translation")
        assert job["status"] == "succeeded", job
        assert len(workers_of(home)) == 1
    finally:
        server.send_signal(signal.SIGINT)  # as Ctrl-C does
        server.wait(timeout=60)
    wait_until(lambda: not workers_of(home), timeout=10,
               message=lambda: f"the worker to go with the server (still there: {workers_of(home)})")


def test_several_server_processes_serve_the_same_data(mined_settings):
    home, port = mined_settings.home_dir, free_port()
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--processes", "2", "--home", str(home),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, server)
        assert len(psutil.Process(server.pid).children(recursive=True)) >= 2
        # The data directory came through the environment, not a flag the children never saw.
        assert [run["id"] for run in get_json(base + "/index.json")["datasets"][0]["runs"]] == [1]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
