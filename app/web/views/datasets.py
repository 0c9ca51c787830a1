"""Pages about datasets: the home list and one dataset's labels with sample thumbnails."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from app.ingest import TWEMOJI_CREDIT
from app.services.datasets import (dataset_json, dataset_samples, datasets_query, load_dataset,
                                   sample_images)
from app.web.deps import SessionDep, render

router = APIRouter()


@router.get("/")
def home(request: Request, session: SessionDep):
    datasets = session.scalars(datasets_query()).all()
    data = {"datasets": [dict(dataset_json(d), samples=[_thumb(i) for i in
                              dataset_samples(session, d.id, limit=10)]) for d in datasets]}
    credit = TWEMOJI_CREDIT if any(d.source == "builtin:twemoji" for d in datasets) else None
    return render(request, "index.html", {"data": data, "credit": credit})


@router.get("/datasets/{dataset_id:int}")
def dataset_page(request: Request, dataset_id: int, session: SessionDep):
    dataset = load_dataset(session, dataset_id)
    if dataset is None:
        raise HTTPException(404, f"no dataset {dataset_id}")
    data = dataset_json(dataset)
    samples = {label.id: [_thumb(i) for i in sample_images(session, label.id)]
               for label_set in dataset.label_sets for label in label_set.labels}
    data["samples"] = samples
    credit = TWEMOJI_CREDIT if dataset.source == "builtin:twemoji" else None
    return render(request, "dataset.html", {"data": data, "credit": credit})


def _thumb(image) -> dict:
    return {"id": image.id, "thumb": image.thumb_path, "path": image.original_path}
