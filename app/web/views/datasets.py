"""Pages about datasets: the home list (with its upload form) and one dataset's labels, models
and runs, with the form that starts a run."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from app import catalog
from app.ingest import TWEMOJI_CREDIT
from app.jobs import Workers, job_json, list_jobs
from app.params import MineOptions, RunParams, ValidationError, readable
from app.services.bases import web_base
from app.services.datasets import dataset_json, dataset_samples, datasets_query, label_samples, load_dataset
from app.services.galleries import models_of_dataset, runs_of_datasets
from app.services.runs import NotFound, launch_pipeline
from app.web.deps import CSRF, SessionDep, SettingsDep, redirect, render
from app.web.forms import RUN_CHOICES, RUN_DEFAULTS, form_defaults, upload_limits

router = APIRouter(tags=["datasets"])

@router.get("/", summary="Datasets, their label sets and runs; the upload form")
def home(request: Request, session: SessionDep):
    datasets = session.scalars(datasets_query()).all()
    runs = runs_of_datasets(session, dataset_ids=[d.id for d in datasets])
    workers = Workers.of(request.app.state.settings)
    data = {"datasets": [dict(dataset_json(d), runs=runs[d.id],
                              samples=[_thumb(i) for i in dataset_samples(session, d.id, limit=10)])
                         for d in datasets],
            "jobs": [job_json(j, workers=workers) for j in list_jobs(session, active_only=True, limit=10)]}
    credit = TWEMOJI_CREDIT if any(d.source == "builtin:twemoji" for d in datasets) else None
    return render(request, "index.html", {"data": data, "credit": credit, "form": form_defaults(),
                                          "limits": upload_limits(request.app.state.settings),
                                          "error": None})


def dataset_page_data(request: Request, session, dataset) -> dict:
    data = dataset_json(dataset)
    # A dataset's images and labels never change after its ingest, so its sample thumbnails
    # are read once per server process (keyed with created_at: a deleted dataset's id may come
    # back); with 365 labels that took the page from 20 to 33 per second (bench_gallery.py).
    # They share the gallery pages' cache and its bound in bytes (web/page_cache.py).
    cache, key = request.app.state.page_cache, ("samples", dataset.id, dataset.created_at)
    samples = cache.get(key)
    if samples is None:
        samples = label_samples(session, [label.id for label_set in dataset.label_sets
                                          for label in label_set.labels])
        cache.put(key, samples)
    data["samples"] = samples
    data["models"] = models_of_dataset(session, dataset_id=dataset.id)
    data["runs"] = runs_of_datasets(session, dataset_ids=[dataset.id])[dataset.id]
    return data


def _dataset_or_404(session, dataset_id: int):
    dataset = load_dataset(session, dataset_id)
    if dataset is None:
        raise HTTPException(404, f"There is no dataset {dataset_id}.")
    return dataset


@router.get("/datasets/{dataset_id:int}", summary="A dataset: labels with samples, models, runs")
def dataset_page(request: Request, dataset_id: int, session: SessionDep):
    dataset = _dataset_or_404(session, dataset_id)
    credit = TWEMOJI_CREDIT if dataset.source == "builtin:twemoji" else None
    return render(request, "dataset.html", {"data": dataset_page_data(request, session, dataset),
                                            "credit": credit, "form": RUN_DEFAULTS, "error": None,
                                            **RUN_CHOICES})


def _int(form, name: str, low: int, high: int) -> int | None:
    value = (form.get(name) or "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name.replace('_', ' ')} must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name.replace('_', ' ')} must be between {low} and {high}, got {number}")
    return number


def _number(form, name: str) -> float | None:
    """A decimal field, its range left to the params model that says what it allows."""
    value = (form.get(name) or "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name.replace('_', ' ')} must be a number, got {value!r}") from None


@router.post("/datasets/{dataset_id:int}/runs", dependencies=CSRF,
             summary="Start a run: train, score and mine in one queued pipeline job")
async def start_run(request: Request, dataset_id: int, session: SessionDep, settings: SettingsDep):
    form = await request.form()
    dataset = _dataset_or_404(session, dataset_id)
    values = {k: form.get(k) for k in RUN_DEFAULTS}
    values["all_labels"] = bool(form.get("all_labels"))
    try:
        backend = form.get("backend") or "pixel"
        if backend not in catalog.BACKENDS:
            raise ValueError(f"unknown model backend {backend!r}; choose one of {', '.join(catalog.BACKENDS)}")
        size = form.get("size") or None
        if size not in (None, *catalog.PIXEL_SIZES):
            raise ValueError(f"model size must be one of {', '.join(catalog.PIXEL_SIZES)}, got {size!r}")
        label_set = form.get("label_set") or None
        share = _number(form, "support_share")
        mine = MineOptions(per_label=_int(form, "per_label", 1, 100_000),
                           clusters=_int(form, "clusters", 1, 1000),
                           patch_size=_int(form, "patch_size", 2, 4096),
                           per_image=_int(form, "per_image", 1, 100),
                           **({} if share is None else {"support_share": share}))
        run = RunParams(preset=form.get("preset") or "fast", seed=_int(form, "seed", 0, 2**31) or 0,
                        draws=_int(form, "draws", 1, 100_000), all_labels=values["all_labels"],
                        precision=form.get("precision") or RUN_DEFAULTS["precision"],
                        tile_stride=form.get("tile_stride") or None, mine=mine)
        config = {"steps": _int(form, "steps", 1, 10_000_000),
                  "resolution": _int(form, "resolution", 8, 4096),
                  "image_size": _int(form, "image_size", 8, 8192),
                  "batch_size": _int(form, "batch_size", 1, 4096),
                  "processes": _int(form, "processes", 1, 1024),
                  "size": size if backend == "pixel" else None,
                  "base": web_base(settings, base=form.get("base"))}
        if backend == "stable-diffusion" and not config["base"]:
            raise ValueError("the stable-diffusion backend needs base weights: a model folder "
                             "under the data directory, or one listed in DIFFMINE_ALLOWED_BASES")

        def launch():
            # Under the queue's write lock until the commit (an identical request gets this
            # job): off the event loop, so that a request waiting for the lock never stalls
            # the one holding it.
            launched = launch_pipeline(session, settings, dataset=dataset.id, label_set=label_set,
                                       backend=backend, run=run, **config)
            session.commit()
            return launched

        _, mining_run, job = await run_in_threadpool(launch)
    except (ValueError, NotFound) as error:
        session.rollback()
        message = readable(error) if isinstance(error, ValidationError) else str(error)
        data = dataset_page_data(request, session, _dataset_or_404(session, dataset_id))
        data["error"] = message
        credit = TWEMOJI_CREDIT if dataset.source == "builtin:twemoji" else None
        given = {k: v for k, v in values.items() if v is not None}
        return render(request, "dataset.html", {"data": data, "credit": credit, "error": message,
                                                "form": dict(RUN_DEFAULTS, **given),
                                                **RUN_CHOICES}, status_code=400)
    return redirect(request, f"/jobs/{job.id}", data={"job": job.id, "run": mining_run.id})


def _thumb(image) -> dict:
    return {"id": image.id, "thumb": image.thumb_path, "path": image.original_path}
