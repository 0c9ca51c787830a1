"""The `diffmine` command line (contract: docs/cli.md).

Every command returns a JSON-able dict; `--json` prints it as one object on stdout, otherwise a
human summary is printed. Failures print one line on stderr and exit non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Iterator

from app.settings import Settings

COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], dict | None]] = {}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def command(name: str):
    def register(func):
        COMMANDS[name] = func
        return func
    return register


# Bars still drawn when a command fails: main() closes them, so the error gets a line of its own.
open_bars: list = []


def progress_bar(description: str, json_mode: bool):
    """A progress callback(done, total) drawing a tqdm bar on stderr (not when piped in --json)."""
    from tqdm import tqdm

    bar = None

    def update(done: float, total: float, message: str | None = None) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="img", file=sys.stderr,
                       disable=json_mode and not sys.stderr.isatty(), dynamic_ncols=True)
            open_bars.append(bar)
        bar.total = total
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.update(done - bar.n)  # tqdm redraws at most every 0.1 s
        if done >= total:
            bar.close()
    return update


# --- commands -------------------------------------------------------------------------------
def queue_or_wait(args, settings: Settings, kind: str, params: dict) -> dict | None:
    """With --queue, record the job and return its id; with --wait, also follow it to the end.
    Returns None when the work should run in the foreground."""
    if not (args.queue or args.wait):
        return None
    from app.db import session_scope, upgrade
    from app.jobs import enqueue

    upgrade(settings)
    with session_scope(settings) as session:
        job_id = enqueue(session, kind=kind, params=params).id
    if not args.wait:
        if not args.json:
            print(f"Queued job {job_id} ({kind}); follow it with: diffmine jobs")
        return {"job": job_id}
    return wait_for_job(settings, job_id, json_mode=args.json)


def wait_for_job(settings: Settings, job_id: int, *, json_mode: bool) -> dict:
    import time

    from app.db import session_scope
    from app.models import Job

    bar = progress_bar(f"job {job_id}", json_mode)
    while True:
        with session_scope(settings) as session:
            job = session.get(Job, job_id)
            status, result, error = job.status, job.result, job.error
            done, total, message = job.progress_done, job.progress_total, job.message
        if total:
            bar(min(done, total), total, message)
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    if status != "succeeded":
        raise CommandError(f"job {job_id} {status}" + (f": {error}" if error else ""))
    return dict(result or {}, job=job_id)


def run_job(args, settings: Settings, job_id: int, description: str) -> dict:
    """Follow a job created by a command: return its id (--queue), wait for the worker (--wait),
    or run it here in the foreground (the default), with the same code the worker runs."""
    if args.queue:
        if not args.json:
            print(f"Queued job {job_id} ({description}); follow it with: diffmine jobs")
        return {"job": job_id}
    if args.wait:
        return wait_for_job(settings, job_id, json_mode=args.json)
    from worker import queue
    from worker.runner import Worker

    worker = Worker(settings, worker_id=f"cli:{os.getpid()}")
    bar = progress_bar(description, args.json)
    # Claimed again after an error that can pass (the job went back to the queue), until
    # it ends or runs out of attempts.
    while queue.claim_job(settings, job_id=job_id, worker_id=worker.worker_id,
                          lease_seconds=worker.lease_seconds):
        # In the foreground nothing else shares this process, so the job never yields.
        worker.run_claimed(job_id, on_progress=bar, preemptible=False)
    return wait_for_job(settings, job_id, json_mode=True)


def create_rows(settings: Settings, launch) -> int:
    """Run `launch(session)` (which creates rows, usually a job) and return what it returns."""
    from app.db import session_scope, upgrade
    from app.services.runs import NotFound

    upgrade(settings)
    try:
        with session_scope(settings) as session:
            return launch(session)
    except (NotFound, ValueError) as error:
        raise CommandError(str(error)) from error


@command("train")
def cmd_train(args, settings: Settings) -> dict:
    from app.services.runs import launch_train

    if args.base and args.backend == "pixel" and not os.path.isdir(args.base):
        raise CommandError(f"--base {args.base}: no such model folder")
    if args.accelerate_config and not os.path.isfile(args.accelerate_config):
        raise CommandError(f"--accelerate-config {args.accelerate_config}: no such file")
    job_id = create_rows(settings, lambda session: launch_train(
        session, settings, **train_options(args))[1].id)
    result = run_job(args, settings, job_id, "train")
    if not args.json and "model" in result:
        accuracy = result.get("classifier_accuracy")
        loss = result["final_loss"]
        print(f"Trained model {result['model']}: {result['steps']} steps"
              + (f", final loss {loss:.4f}" if loss is not None else " (the model before fine-tuning)")
              + (f", holdout classifier accuracy {accuracy:.1%}" if accuracy is not None else ""))
    return result


def train_options(args) -> dict:
    return dict(dataset=args.dataset, label_set=args.label_set, backend=args.backend, seed=args.seed,
                base=args.base, resolution=args.resolution, steps=args.steps,
                batch_size=args.batch_size, size=args.size, lr=args.lr,
                checkpoint_every=args.checkpoint_every, processes=args.processes,
                accelerate_config=args.accelerate_config and os.path.abspath(args.accelerate_config))


@command("score")
def cmd_score(args, settings: Settings) -> dict:
    from app.services.runs import launch_score

    job_id = create_rows(settings, lambda session: launch_score(
        session, model_id=args.model, preset=args.preset, draws=args.draws, precision=args.precision,
        all_labels=args.all_labels, seed=args.seed, shard_size=args.shard_size)[1].id)
    result = run_job(args, settings, job_id, "score")
    if not args.json and "run" in result:
        print(f"Scored {result['images']} images: run {result['run']}")
    return result


@command("mine")
def cmd_mine(args, settings: Settings) -> dict:
    from app.services.runs import launch_mine, launch_recluster

    if args.recluster:
        launch = lambda session: launch_recluster(  # noqa: E731
            session, run_id=args.run, lookalike_threshold=args.lookalike_threshold).id
    else:
        launch = lambda session: launch_mine(session, run_id=args.run, mine=mine_options(args)).id  # noqa: E731
    result = run_job(args, settings, create_rows(settings, launch), "mine")
    if not args.json and "patches" in result:
        print(f"Run {result['run']}: {result['patches']} patches in {result['clusters']} clusters"
              + (f" ({result['artifact_clusters']} marked as artifacts)"
                 if result.get("artifact_clusters") else ""))
    return result


def mine_options(args) -> dict:
    return {"patch_size": args.patch_size, "per_label": args.per_label, "clusters": args.clusters,
            "per_image": args.per_image, "selection": args.selection,
            "trend_members": args.trend_members, "lookalike_threshold": args.lookalike_threshold}


@command("artifact")
def cmd_artifact(args, settings: Settings) -> dict:
    from app.services.runs import mark_artifact

    def mark(session):
        cluster = mark_artifact(session, cluster_id=args.cluster, artifact=not args.unmark)
        return {"cluster": cluster.id, "run": cluster.run_id, "is_artifact": cluster.is_artifact}

    result = create_rows(settings, mark)
    if not args.json:
        state = "marked as an artifact" if result["is_artifact"] else "no longer an artifact"
        print(f"Cluster {result['cluster']} {state}; re-cluster without its look-alikes: "
              f"diffmine mine {result['run']} --recluster")
    return result


@command("run")
def cmd_run(args, settings: Settings) -> dict:
    from app.services.runs import launch_pipeline

    job_id = create_rows(settings, lambda session: launch_pipeline(
        session, settings, **train_options(args),
        preset=args.preset, draws=args.draws, precision=args.precision, shard_size=args.shard_size,
        all_labels=args.all_labels, mine=mine_options(args))[2].id)
    result = run_job(args, settings, job_id, "train, score, mine")
    if not args.json and "run" in result:
        print(f"Model {result['model']}, run {result['run']}: {result.get('patches')} patches in "
              f"{result.get('clusters')} clusters. See them with: diffmine serve")
    return result


@command("evaluate")
def cmd_evaluate(args, settings: Settings) -> dict:
    from app.jobs import enqueue
    from app.models import MiningRun

    def launch(session):
        if session.get(MiningRun, args.run) is None:
            raise CommandError(f"no run {args.run}")
        return enqueue(session, kind="evaluate", params={
            "run_id": args.run, "draws": args.draws, "max_images": args.max_images}).id

    result = run_job(args, settings, create_rows(settings, launch), "evaluate")
    if not args.json and "classifier_accuracy" in result:
        print(f"Holdout diffusion classifier: {result['classifier_accuracy']:.1%} on "
              f"{result['classifier_images']} images (chance {result['chance']:.1%})")
        if "box_auc_pr" in result:
            print(f"Typicality map vs boxes: AUC-PR {result['box_auc_pr']:.3f} "
                  f"(positive rate {result['box_positive_rate']:.3f})")
        for label, overlap in result.get("mark_overlap", {}).items():
            top = overlap["top_cluster"]
            print(f"Planted mark in {label!r}: top cluster {top:.0%} on the mark, "
                  f"all patches {overlap['all_patches']:.0%}" if top is not None else
                  f"Planted mark in {label!r}: all patches {overlap['all_patches']:.0%}")
    return result


@command("export")
def cmd_export(args, settings: Settings) -> None:
    import tempfile
    from pathlib import Path

    from app.services.export import export_run

    if not args.output:
        export_run(settings, run_id=args.run, format=args.format, out=sys.stdout)
        return None
    target = Path(args.output)
    # Written beside the target and renamed at the end: a failed export leaves no file.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent or ".",
                                     suffix=".partial", delete=False) as out:
        try:
            export_run(settings, run_id=args.run, format=args.format, out=out)
        except BaseException:
            os.unlink(out.name)
            raise
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)
    if not args.json:
        print(f"Wrote the {args.format} export of run {args.run} to {target}", file=sys.stderr)
    return None


@command("translate")
def cmd_translate(args, settings: Settings) -> dict:
    """A patch or an image region into every label (interactive job), or with --parallel N the
    consistent-change analysis of N sampled images (worker/handlers/translate.py, parallel.py)."""
    from app.models import MiningRun, TrainedModel, Translation
    from app.services.runs import labels_of
    from worker.handlers.translate import canonical_params

    try:
        params = canonical_params({"preset": args.preset, "invert_steps": args.invert_steps,
                                   "sample_steps": args.sample_steps, "guidance": args.guidance,
                                   "seed": args.seed, "sdedit_strength": args.sdedit,
                                   "context": args.context})
    except ValueError as error:
        raise CommandError(str(error)) from error
    if args.parallel is not None:
        if args.run is None:
            raise CommandError("--parallel needs --run RUN")
        from app.services.translation_jobs import launch_parallel

        job_id = create_rows(settings, lambda session: launch_parallel(
            session, run_id=args.run, images=args.parallel, params=params, clusters=args.clusters).id)
        result = run_job(args, settings, job_id, "parallel dataset")
        if not args.json and "summary" in result:
            print(f"Parallel set of {result['images']} images x {len(result['labels'])} labels: "
                  f"{result['patches']} patches in {result['clusters']} clusters ({result['summary']})")
        return result
    if args.patch is None and (args.run is None or args.image is None):
        raise CommandError("give --patch ID, or --run RUN --image IMAGE_ID [--box x0,y0,x1,y1]")
    box = None
    if args.box:
        try:
            box = [int(float(v)) for v in args.box.split(",")]
            assert len(box) == 4
        except (ValueError, AssertionError) as error:
            raise CommandError(f"--box wants x0,y0,x1,y1 in original pixels, got {args.box!r}") from error

    def launch(session):
        if args.patch is not None:
            from app.services.translations import request_translation

            row, job = request_translation(session, patch_id=args.patch, params=params)
        else:
            from app.services.translation_jobs import request_region_translation

            run = session.get(MiningRun, args.run)
            if run is None:
                raise CommandError(f"no run {args.run}")
            row, job = request_region_translation(session, model_id=run.model_id, image_id=args.image,
                                                  box=box, params=params)
        model = session.get(TrainedModel, row.model_id)
        return row.id, job, [label.name for label in labels_of(session, model.label_set_id)]

    translation_id, job_id, labels = create_rows(settings, launch)
    cached = job_id is None
    if job_id is not None:
        outcome = run_job(args, settings, job_id, "translate")
        if args.queue:
            return {"translation": translation_id, **outcome, "labels": labels}
    from app.db import session_scope

    with session_scope(settings) as session:
        row = session.get(Translation, translation_id)
        results, result_dir, status = list(row.results or []), row.result_dir, row.status
    errors = [r["reconstruction_error"] for r in results if r.get("reconstruction_error") is not None]
    result = {"translation": translation_id, "status": status, "cached": cached,
              "labels": [r["label"] for r in results], "result_dir": result_dir, "results": results,
              "reconstruction_error": errors[0] if errors else None}
    if not args.json:
        print(f"Translation {translation_id}{' (cached)' if cached else ''}: {result_dir}"
              + (f", reconstruction RMSE {errors[0]:.3f}" if errors else ""))
        for r in results:
            print(f"  {r['label']:<20} typicality {r['typicality']:+.4f} (source {r['source_typicality']:+.4f})"
                  f"{'  [source label]' if r['is_source'] else ''}  {r['crop']}")
    return result


@command("ingest")
def cmd_ingest(args, settings: Settings) -> dict:
    from app.ingest import default_dataset_name, ingest_dataset

    # Named here, not in the service, so that a queued job's parameters carry the name too.
    name = args.name or default_dataset_name(args.source)
    params = dict(source=args.source, name=name, manifest=args.manifest,
                  path_column=args.path_column, label_columns=args.label_column or [],
                  bin_years=args.bin, multi_sep=args.multi_sep, holdout=args.holdout,
                  in_place=args.in_place, seed=args.seed, limit_per_label=args.limit_per_label,
                  min_images_per_label=args.min_per_label, plant_mark=args.plant_mark,
                  plant_fraction=args.plant_fraction, plant_size=args.plant_size)
    queued = queue_or_wait(args, settings, "ingest", params)
    if queued is not None and "dataset" not in queued:
        return queued
    result = queued or ingest_dataset(settings, **params,
                                      progress=progress_bar("ingest", args.json)).as_json()
    if not args.json:
        print(f"Ingested {result['images']} images into dataset {result['dataset']!r} "
              f"({result.get('duplicates', 0)} duplicates kept once).")
        for set_name, counts in result.get("label_sets", {}).items():
            print(f"  {set_name}: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    return result


@command("datasets")
def cmd_datasets(args, settings: Settings) -> dict:
    from app.services.datasets import list_datasets
    from app.ingest import BUILTINS

    datasets = list_datasets(settings)
    if not args.json:
        if not datasets:
            print("No datasets yet. Try: diffmine ingest builtin:twemoji --name twemoji")
        for ds in datasets:
            print(f"{ds['name']}: {ds['images']} images")
            for label_set in ds["label_sets"]:
                labels = ", ".join(f"{l['name']} ({l['images']})" for l in label_set["labels"])
                print(f"  {label_set['name']} [{label_set['kind']}]: {labels}")
        print("Builtin datasets (diffmine ingest builtin:NAME): " + ", ".join(BUILTINS))
    return {"datasets": datasets, "builtin": BUILTINS}


@command("worker")
def cmd_worker(args, settings: Settings) -> None:
    from worker.runner import Worker

    worker = Worker(settings, worker_id=args.worker_id, lease_seconds=args.lease,
                    poll_seconds=args.poll)
    if not args.json:
        print(f"diffmine worker {worker.worker_id} on {settings.home_dir}", flush=True)
    worker.run(exit_when_idle=args.exit_when_idle)


@command("jobs")
def cmd_jobs(args, settings: Settings) -> dict:
    from app.db import session_scope, upgrade
    from app.jobs import job_json, list_jobs

    upgrade(settings)
    with session_scope(settings) as session:
        jobs = [job_json(j) for j in list_jobs(session, active_only=not args.all, limit=args.limit)]
    if not args.json:
        if not jobs:
            print("No queued or running jobs." if not args.all else "No jobs.")
        for job in jobs:
            fraction = f" {100 * job['fraction']:.0f}%" if job["fraction"] is not None else ""
            eta = f" eta {job['eta_seconds']:.0f}s" if job["eta_seconds"] else ""
            print(f"{job['id']:>5} {job['kind']:<10} {job['status']:<10}{fraction}{eta} "
                  f"{job['stage'] or ''} {job['message'] or ''} {job['error'] or ''}".rstrip())
    return {"jobs": jobs}


@command("cancel")
def cmd_cancel(args, settings: Settings) -> dict:
    from app.db import session_scope
    from app.jobs import job_json, request_cancel

    with session_scope(settings) as session:
        job = request_cancel(session, args.job)
        if job is None:
            raise CommandError(f"no job {args.job}")
        result = job_json(job)
    if not args.json:
        print(f"Job {args.job}: {result['status']}"
              + (" (stops at its next step)" if result["cancel_requested"] else ""))
    return result


@command("serve")
def cmd_serve(args, settings: Settings) -> None:
    import uvicorn

    from app.db import upgrade
    from app.web import create_app

    upgrade(settings)
    print(f"diffmine is serving {settings.home_dir} at http://{settings.host}:{settings.port}/",
          flush=True)
    # A worker beside the server, so that what a visitor starts (a translation click, a run)
    # gets done: the web process itself never runs a model.
    worker = start_worker(settings) if args.with_worker else None
    try:
        if getattr(args, "processes", 1) > 1:
            # Several server processes import the app by name and read the settings from the
            # environment (one `diffmine serve` process answered 683 gallery pages/s, two 1,322).
            os.environ.update(settings_environment(settings))
            uvicorn.run("app.web:create_app", factory=True, workers=args.processes, host=settings.host,
                        port=settings.port, log_level="warning")
        else:
            uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)


def start_worker(settings: Settings):
    """A `diffmine worker` process for this data directory, its log in logs/worker-serve.log."""
    import subprocess

    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "worker-serve.log", "ab") as log:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--home", str(settings.home_dir),
                                 "--worker-id", "serve"], env=dict(os.environ, **settings_environment(settings)),
                                stdout=subprocess.DEVNULL, stderr=log)


@command("demo")
def cmd_demo(args, settings: Settings) -> None:
    from app.services.datasets import dataset_by_name
    from app.services.demo import DATASET, demo_jobs

    args.queue = args.wait = False
    if dataset_by_name(settings, DATASET) is None:
        for attr, value in dict(source="builtin:twemoji", name=DATASET, manifest=None,
                                path_column=None, label_column=None, bin=None, multi_sep="|",
                                holdout=0.1, in_place=False, limit_per_label=None,
                                min_per_label=None, plant_mark=None, plant_fraction=0.5,
                                plant_size=0.3).items():
            setattr(args, attr, value)
        cmd_ingest(args, settings)
    jobs = create_rows(settings, lambda session: demo_jobs(session, settings, retrain=args.retrain))
    for result in run_side_by_side(settings, jobs, json_mode=args.json):
        print(f"Mined run {result['run']}: {result['patches']} patches in {result['clusters']} "
              f"clusters.", flush=True)
    args.with_worker = True  # translation clicks and new runs from the pages need one
    cmd_serve(args, settings)


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
                 "--home", str(settings.home_dir), "--worker-id", f"side-{n}"],
                env=env, stdout=subprocess.DEVNULL, stderr=log))
    try:
        for job_id in job_ids:
            yield wait_for_job(settings, job_id, json_mode=json_mode)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)


# --- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from app.services.runs import PRECISIONS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="data directory (default: $DIFFMINE_HOME or ./diffmine-data)")
    add_setting_flag(common, "database_url", "SQLAlchemy URL (default: $DIFFMINE_DATABASE_URL, "
                                             "else SQLite in the data directory)")
    add_setting_flag(common, "device", "torch device: auto (cuda, then mps, then cpu), cuda, cuda:1, "
                                       "cpu... (default: $DIFFMINE_DEVICE or auto)")
    # The environment variable is the safer way to pass a secret: a flag shows in `ps`.
    add_setting_flag(common, "token", "access token every web request then needs (default: "
                                      "$DIFFMINE_TOKEN or none; prefer the variable: flags show in ps)")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser = argparse.ArgumentParser(prog="diffmine", parents=[common], description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", parents=[common], help="add a labeled image dataset")
    ingest.add_argument("source", help="a zip, a folder, or builtin:twemoji / builtin:animals")
    ingest.add_argument("--name", help="dataset name (default: the builtin's name for builtin:NAME, "
                                       "the file name without its suffix for a zip or CSV, the "
                                       "folder's name for a folder)")
    ingest.add_argument("--manifest", help="CSV or JSONL manifest (default: manifest.csv/.jsonl in the source)")
    ingest.add_argument("--path-column")
    ingest.add_argument("--label-column", action="append", help="repeatable: one label set each")
    ingest.add_argument("--bin", type=int, help="bin numeric labels into ranges of this many years")
    ingest.add_argument("--multi-sep", default="|", help="separator of several labels in one cell")
    ingest.add_argument("--holdout", type=float, default=0.1, help="fraction kept for evaluation")
    ingest.add_argument("--in-place", action="store_true", help="reference a server folder, don't copy")
    ingest.add_argument("--seed", type=int, default=0)
    ingest.add_argument("--limit-per-label", type=int, help="builtin datasets: sample this many per label")

    ingest.add_argument("--min-per-label", type=int, help="fewest images a label may have")
    ingest.add_argument("--plant-mark", metavar="LABEL",
                        help="paint a known mark into some of LABEL's images (a ground truth "
                             "for `diffmine evaluate`)")
    ingest.add_argument("--plant-fraction", type=float, default=0.5)
    ingest.add_argument("--plant-size", type=float, default=0.3, help="mark side / image side")
    add_queue_flags(ingest)

    sub.add_parser("datasets", parents=[common], help="list datasets, label sets and counts")

    train = sub.add_parser("train", parents=[common], help="train a conditional denoiser")
    train.add_argument("dataset", help="dataset name or id")
    train.add_argument("--label-set", help="which label set (default: the only one)")
    train.add_argument("--backend", choices=("pixel", "stable-diffusion"), default="pixel")
    train.add_argument("--base", help="weights to start from: a model folder (or SD folder/hub id)")
    train.add_argument("--resolution", type=int)
    train.add_argument("--steps", type=int, help="0: the model before fine-tuning, as a baseline")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--size", choices=("tiny", "small", "base"), help="pixel model width")
    train.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4, the fine-tuning recipe's; "
                                                  "a pixel model trained from scratch learns faster at 1e-3)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--processes", type=int,
                       help="train under `accelerate launch` with this many processes (one per GPU), "
                            "followed by the job; the batch size is split over them")
    train.add_argument("--accelerate-config", metavar="FILE",
                       help="an `accelerate config` file for the launch (several machines)")
    add_queue_flags(train)

    score = sub.add_parser("score", parents=[common], help="typicality of every image")
    score.add_argument("model", type=int, help="model id")
    score.add_argument("--preset", choices=("paper", "fast"), default="paper")
    score.add_argument("--draws", type=int, help="override the preset's number of draws")
    score.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="denoiser autocast while scoring; fp16 is for GPUs (Stable Diffusion on an "
                       "H200: 4.9-6.5x faster, closer to fp32 than fp32 is to itself under another "
                       "seed), fp32 on CPUs")
    score.add_argument("--all-labels", action="store_true",
                       help="also score every image under every label (diffusion classifier)")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--shard-size", type=int, help="images per resumable shard (default 64)")
    add_queue_flags(score)

    mine = sub.add_parser("mine", parents=[common], help="patches, features and clusters of a run")
    mine.add_argument("run", type=int, help="run id (from diffmine score)")
    add_mine_flags(mine)
    mine.add_argument("--recluster", action="store_true",
                      help="only cluster again, leaving out look-alikes of artifact clusters")
    add_queue_flags(mine)

    artifact = sub.add_parser("artifact", parents=[common],
                              help="mark a cluster as a dataset artifact (scanner border, watermark)")
    artifact.add_argument("cluster", type=int)
    artifact.add_argument("--unmark", action="store_true", help="take the mark back")

    run = sub.add_parser("run", parents=[common], help="train, score and mine in one go")
    run.add_argument("dataset")
    for action in train._actions + score._actions:
        if action.dest not in ("help", "home", "json", "dataset", "model", "queue", "wait",
                               "seed") and not any(a.dest == action.dest for a in run._actions):
            run._add_action(action)
    run.add_argument("--seed", type=int, default=0)
    add_mine_flags(run)
    add_queue_flags(run)

    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="holdout classifier accuracy, box and planted-mark metrics")
    evaluate.add_argument("run", type=int)
    evaluate.add_argument("--draws", type=int, help="draws per label for the classifier (default 16)")
    evaluate.add_argument("--max-images", type=int, help="holdout images used (default 1000)")
    add_queue_flags(evaluate)

    export = sub.add_parser("export", parents=[common], help="a run's results as JSON, CSV or HTML")
    export.add_argument("run", type=int)
    export.add_argument("--format", choices=("json", "csv", "html"), default="json")
    export.add_argument("-o", "--output", help="file to write (default: stdout)")

    translate = sub.add_parser("translate", parents=[common],
                               help="a patch or image region under every label; --parallel N: consistent changes")
    translate.add_argument("--patch", type=int, help="a mined patch id")
    translate.add_argument("--run", type=int, help="a run id (with --image, or --parallel)")
    translate.add_argument("--image", type=int, help="an image id of the run's dataset")
    translate.add_argument("--box", help="x0,y0,x1,y1 in original pixels (default: the whole image)")
    translate.add_argument("--preset", choices=("fast", "reference"), default="fast",
                           help="fast: 50 inversion / 25 sampling steps; reference: 999 / 50 (the paper)")
    translate.add_argument("--invert-steps", type=int)
    translate.add_argument("--sample-steps", type=int)
    translate.add_argument("--guidance", type=float, help="classifier-free guidance (paper and Stable "
                           "Diffusion: 7.5; fast preset on pixel models: 3)")
    translate.add_argument("--sdedit", type=float, help="SDEdit strength in (0, 1] instead of inversion")
    translate.add_argument("--context", type=float, help="translate a square window this many box sides wide")
    translate.add_argument("--seed", type=int, default=0)
    translate.add_argument("--parallel", type=int, metavar="N", help="translate N sampled images of --run "
                           "into every label and mine consistent changes")
    translate.add_argument("--clusters", type=int, help="with --parallel: k-means clusters")
    add_queue_flags(translate)

    worker = sub.add_parser("worker", parents=[common], help="run the job worker until stopped")
    worker.add_argument("--worker-id")
    worker.add_argument("--lease", type=float, default=30.0, help="seconds a job's lease lasts")
    worker.add_argument("--poll", type=float, default=1.0, help="seconds between queue polls")
    worker.add_argument("--exit-when-idle", action="store_true", help="stop when the queue is empty")

    jobs = sub.add_parser("jobs", parents=[common], help="queued and running jobs with progress")
    jobs.add_argument("--all", action="store_true", help="finished jobs too")
    jobs.add_argument("--limit", type=int, default=50)

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job", type=int)

    for name, text in (("serve", "serve the web app"), ("demo", "ingest the demo dataset and serve it")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("--host")
        cmd.add_argument("--port", type=int)
        if name == "serve":
            cmd.add_argument("--with-worker", action="store_true",
                             help="also run a worker for this data directory until the server stops")
            cmd.add_argument("--processes", type=int, default=1,
                             help="web server processes (uvicorn workers); one per core is the most useful")
        if name == "demo":
            cmd.add_argument("--seed", type=int, default=0)
            cmd.add_argument("--retrain", action="store_true",
                             help="train the demo models from scratch with the shipped recipe")
    return parser


def add_mine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patch-size", type=int, help="box side in model pixels (default: scaled "
                                                        "from the paper's 50 px at 256 px)")
    parser.add_argument("--per-label", type=int, help="patches kept per label (paper: 1000)")
    parser.add_argument("--per-image", type=int, help="boxes per image (paper: 5)")
    parser.add_argument("--lookalike-threshold", type=float,
                        help="re-clustering leaves out patches whose centred DIFT features have a cosine "
                             "above this with an artifact cluster's member (default 0.6)")
    parser.add_argument("--clusters", type=int, help="k-means clusters per label (paper: 32)")
    parser.add_argument("--trend-members", type=int,
                        help="ordered labels: members per cluster scored under every label (default 16)")
    parser.add_argument("--selection", choices=("typical", "least", "random"),
                        help="which patches: the most typical (the method), or a baseline")


def add_queue_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", action="store_true", help="put the work on the worker's queue")
    parser.add_argument("--wait", action="store_true", help="queue it and follow it to the end")


# Settings fields that have a flag; every other field is set by its DIFFMINE_ variable only.
SETTING_FLAGS = ("home", "host", "port", "database_url", "device", "token")


def add_setting_flag(parser: argparse.ArgumentParser, field: str, help: str) -> None:
    """A flag for a field of Settings, spelled like it (database_url -> --database-url)."""
    assert field in Settings.model_fields and field in SETTING_FLAGS, field
    parser.add_argument("--" + field.replace("_", "-"), help=help)


def settings_environment(settings: Settings) -> dict[str, str]:
    """The flagged settings as DIFFMINE_ variables, so that a child process (a worker started
    with only --home) uses the same database, device and token as the command that started it."""
    return {f"DIFFMINE_{field.upper()}": str(value) for field in SETTING_FLAGS
            if (value := getattr(settings, field)) is not None}


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment's settings, with the flags given on the command line overriding them."""
    overrides = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads (torch, FAISS) otherwise spin and starve each other on small machines;
    # it must be set before either library starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        result = COMMANDS[args.command](args, settings)
    except KeyboardInterrupt:
        print("diffmine: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line
        from app.ingest import IngestError

        known = isinstance(exc, (IngestError, CommandError, FileNotFoundError, LookupError))
        reason = str(exc) if known else f"{type(exc).__name__}: {exc}"
        for bar in open_bars:
            bar.close()  # a no-op for a bar already closed
        print(f"diffmine {args.command}: {reason}".replace("\n", " "), file=sys.stderr)
        if os.environ.get("DIFFMINE_TRACEBACK"):
            raise
        return 1
    if args.json and result is not None:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
