"""One image: its typicality heatmap for a label over it (opacity and threshold on the page),
its mined patches outlined, and its score under every label (the diffusion-classifier view)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from app.ingest import TWEMOJI_CREDIT
from app.models import Dataset
from app.services.galleries import run_info
from app.services.images import (
    heatmap_file,
    image_info,
    image_patches,
    image_scores,
    map_region,
    runs_for_dataset,
    stored_file,
)
from app.web.deps import SessionDep, SettingsDep, render
from app.web.ids import QueryId

router = APIRouter(tags=["images"])
CACHE_FOREVER = {"Cache-Control": "public, max-age=31536000, immutable"}


@router.get("/images/{image_id:int}",
            summary="An image with a label's heatmap, its patches and its scores per label")
def image_page(request: Request, image_id: int, session: SessionDep, run: QueryId = None,
               label: QueryId = None):
    image = image_info(session, image_id=image_id)
    if image is None:
        raise HTTPException(404, f"There is no image {image_id}.")
    dataset = session.get(Dataset, image["dataset"])
    runs = runs_for_dataset(session, dataset_id=dataset.id)
    if run is None and runs:
        ready = [r for r in runs if r["status"] == "ready"]
        run = (ready or runs)[0]["id"]
    data = {"image": image, "dataset": {"id": dataset.id, "name": dataset.name},
            "runs": runs, "run": None, "label": None, "scores": [], "predicted": None,
            "patches": [], "heatmap": None}
    if run is not None:
        info = run_info(session, run_id=run)
        if info is None or info["dataset"]["id"] != dataset.id:
            raise HTTPException(404, f"Run {run} is not a run of this image's dataset.")
        data["run"] = info
        data.update(image_scores(session, run_id=run, image_id=image_id))
        data["patches"] = image_patches(session, run_id=run, image_id=image_id)
        with_maps = [s for s in data["scores"] if s["has_map"]]
        own = {label["id"] for label in image["labels"]}
        if label is None and with_maps:
            label = next((s["label_id"] for s in with_maps if s["label_id"] in own),
                         with_maps[0]["label_id"])
        if label is not None:
            score = next((s for s in data["scores"] if s["label_id"] == label), None)
            if score is None:
                raise HTTPException(404, f"Run {run} has no label {label}.")
            data["label"] = {"id": label, "name": score["label"], "has_map": score["has_map"]}
            if score["has_map"]:
                data["heatmap"] = {"url": f"/heatmaps/{run}/{image_id}/{label}.png",
                                   "region": map_region(info["model"]["config"] or {}, info["params"] or {},
                                                        image["width"], image["height"])}
    credit = TWEMOJI_CREDIT if dataset.source == "builtin:twemoji" else None
    return render(request, "image.html", {"data": data, "credit": credit})


@router.get("/images/{image_id:int}/original", summary="The stored image file")
def image_original(image_id: int, session: SessionDep, settings: SettingsDep):
    path = stored_file(settings, session, image_id=image_id)
    if path is None or not path.is_file():
        raise HTTPException(404, f"There is no image file for image {image_id}.")
    return FileResponse(path, headers=CACHE_FOREVER)


@router.get("/heatmaps/{run_id:int}/{image_id:int}/{label_id:int}.png",
            summary="The typicality heatmap of an image under a label (PNG, made once)")
def heatmap(run_id: int, image_id: int, label_id: int, session: SessionDep, settings: SettingsDep):
    path = heatmap_file(settings, session, run_id=run_id, image_id=image_id, label_id=label_id)
    if path is None:
        raise HTTPException(404, f"Run {run_id} kept no typicality map of image {image_id} under "
                                 f"label {label_id} (runs keep maps for an image's own labels, and for "
                                 "every label when scored with --all-labels).")
    return FileResponse(path, media_type="image/png", headers=CACHE_FOREVER)
