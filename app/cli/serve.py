"""The web app: `diffmine serve`, and `diffmine demo` (ingest the demo dataset, mine it with the
shipped weights, serve it)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from app.cli.common import (
    CommandError,
    command,
    create_rows,
    progress_bar,
    settings_environment,
    wait_for_job,
)
from app.cli.data import clean_up, print_ingested
from app.settings import Settings


def serve(settings: Settings, *, with_worker: bool, processes: int) -> None:
    """Serve the web app until stopped, with `processes` server processes and, with_worker, a
    worker process beside them."""
    import uvicorn

    from app.db import upgrade
    from app.web import create_app
    from app.web.security import allowed_hosts, is_loopback

    exposed = not is_loopback(settings.host)
    if exposed and not settings.token and not settings.allow_no_token:
        raise CommandError(
            f"refusing to serve on {settings.host} without an access token: anyone who can reach "
            "that address could read and change everything. Set DIFFMINE_TOKEN (16 characters or "
            "more), or, if something else guards the address (a firewall, a container port "
            "published on loopback only), pass --allow-no-token (DIFFMINE_ALLOW_NO_TOKEN=1).")
    upgrade(settings)
    # What killed processes left (staging folders, files no row references); never what a live
    # request, ingest or job uses. `diffmine doctor` also walks the whole data folder.
    report = clean_up(settings, dry_run=False, full=False)
    if report["staging"] or report["files"]:
        print(f"Removed what stopped processes left: {len(report['staging'])} staging folders, "
              f"{report['files']} files no row references.", flush=True)
    print(f"diffmine is serving {settings.home_dir} at http://{settings.host}:{settings.port}/",
          flush=True)
    if exposed:
        names = allowed_hosts(settings)
        print("Answering to the host names " + (", ".join(sorted(names)) if names else "(any)")
              + ("" if names is None else "; add others with DIFFMINE_ALLOWED_HOSTS") + ".",
              flush=True)
    # A worker beside the server, so that what a visitor starts (a translation click, a run)
    # gets done: the web process itself never runs a model.
    worker = start_worker(settings) if with_worker else None
    try:
        if processes > 1:
            # Several server processes import the app by name and read the settings from the
            # environment (one `diffmine serve` process answered 683 gallery pages/s, two 1,322).
            os.environ.update(settings_environment(settings))
            uvicorn.run("app.web:create_app", factory=True, workers=processes, host=settings.host,
                        port=settings.port, log_level="warning")
        else:
            uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)


@command("serve")
def cmd_serve(args, settings: Settings) -> None:
    serve(address_settings(args, settings), with_worker=args.with_worker, processes=args.processes)


def address_settings(args, settings: Settings) -> Settings:
    """The settings with --allow-no-token applied (a flag of serve and demo only)."""
    if args.allow_no_token:
        return settings.model_copy(update={"allow_no_token": True})
    return settings


def start_worker(settings: Settings):
    """A `diffmine worker` process for this data directory, its log in logs/worker-serve.log."""
    import subprocess

    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "worker-serve.log", "ab") as log:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--home", str(settings.home_dir),
                                 "--worker-id", "serve", "--lease", str(settings.lease_seconds)],
                                env=dict(os.environ, **settings_environment(settings)),
                                stdout=subprocess.DEVNULL, stderr=log)


@command("demo")
def cmd_demo(args, settings: Settings) -> None:
    from app.ingest import ingest_dataset
    from app.services.datasets import dataset_by_name
    from app.services.demo import DATASET, RENDER_SIZE, demo_jobs

    settings = address_settings(args, settings)
    if dataset_by_name(settings, DATASET) is None:
        # Rendered at least at the size it is mined at, so the model never sees upscaled pixels
        result = ingest_dataset(settings, source="builtin:twemoji", name=DATASET, seed=args.seed,
                                render_size=max(args.image_size or 0, RENDER_SIZE),
                                progress=progress_bar("ingest", args.json)).as_json()
        if not args.json:
            print_ingested(result)
    jobs = create_rows(settings, lambda session: demo_jobs(session, settings, retrain=args.retrain,
                                                           image_size=args.image_size))
    for result in run_side_by_side(settings, jobs, json_mode=args.json):
        print(f"Mined run {result['run']}: {result['patches']} patches in {result['clusters']} "
              f"clusters.", flush=True)
    # A worker: translation clicks and new runs from the pages need one.
    serve(settings, with_worker=True, processes=1)


def run_side_by_side(settings: Settings, job_ids: list[int], *, json_mode: bool) -> Iterator[dict]:
    """Independent jobs at once, a worker process each, the CPU cores split between them: on
    2 cores two one-thread processes score 1.2-1.3x faster than one two-thread process (measured
    in docs/demo.md). Results come in job order; the workers stop when the queue is empty."""
    import subprocess

    cores = os.cpu_count() or 1
    count = max(1, min(len(job_ids), cores))
    env = dict(os.environ, **settings_environment(settings),
               OMP_NUM_THREADS=str(max(1, cores // count)))
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = []
    for n in range(count if job_ids else 0):
        with open(logs / f"worker-side-{n}.log", "ab") as log:  # the child keeps its own handle
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", "--exit-when-idle",
                 "--home", str(settings.home_dir), "--worker-id", f"side-{n}",
                 "--lease", str(settings.lease_seconds)],
                env=env, stdout=subprocess.DEVNULL, stderr=log))
    try:
        for job_id in job_ids:
            yield wait_for_job(settings, job_id, json_mode=json_mode)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    server = sub.add_parser("serve", parents=[common], help="serve the web app")
    add_address_flags(server)
    server.add_argument("--with-worker", action="store_true",
                        help="also run a worker for this data directory until the server stops")
    server.add_argument("--processes", type=int, default=1,
                        help="web server processes (uvicorn workers); one per core is the most useful")

    demo = sub.add_parser("demo", parents=[common], help="ingest the demo dataset and serve it")
    add_address_flags(demo)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--retrain", action="store_true",
                      help="train the demo models from scratch with the shipped recipe")
    demo.add_argument("--image-size", type=int, metavar="N",
                      help="mine the emoji at N px (default: the shipped models' 32 px; larger sizes are "
                           "scored through tiles of the models' 32 px crops and cost more: docs/demo.md)")


def add_address_flags(parser: argparse.ArgumentParser) -> None:
    """Where the web app listens (default: $DIFFMINE_HOST, $DIFFMINE_PORT, else 127.0.0.1:8000)."""
    parser.add_argument("--host", help="address to listen on (default: $DIFFMINE_HOST or 127.0.0.1); "
                                       "any but loopback needs an access token or --allow-no-token")
    parser.add_argument("--port", type=int, help="port, 1-65535 (default: $DIFFMINE_PORT or 8000)")
    parser.add_argument("--allow-no-token", action="store_true",
                        help="serve on a non-loopback address without an access token (default: "
                             "$DIFFMINE_ALLOW_NO_TOKEN or refused); only where something else "
                             "guards the address")
