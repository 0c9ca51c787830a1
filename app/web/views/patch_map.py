"""A run's patch map: every mined patch placed by its features, drawn on a canvas by
static/patch_map.js from the points file and thumbnail atlases the mining job wrote. Its JSON
twin gives the points page by page, each with its label, position and thumbnail URLs."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse

from app import run_files
from app.services.galleries import labels_of_set
from app.services.patch_map import MAX_POINTS_PER_PAGE, POINTS_PER_PAGE, map_overview, map_points
from app.web.deps import SessionDep, SettingsDep, render, wants_json
from app.web.files import CACHE_FOREVER
from app.web.ids import Offset, QueryId
from app.web.views.runs import credit_for, load_label, load_run

router = APIRouter(tags=["galleries"])


@router.get("/runs/{run_id:int}/map",
            summary="The run's patch map: every patch placed by its features, coloured by label")
def patch_map(request: Request, run_id: int, session: SessionDep, settings: SettingsDep,
              offset: Offset = 0, limit: int = Query(POINTS_PER_PAGE, ge=1, le=MAX_POINTS_PER_PAGE),
              label: QueryId = None):
    run = load_run(session, run_id)
    if label is not None:
        load_label(session, run, label)
    labels = labels_of_set(session, label_set_id=run["label_set"]["id"])
    run_dir = settings.runs_dir / str(run_id)
    data = dict(map_overview(session, run_dir, run=run, labels=labels), run=run)
    if wants_json(request) and data["available"]:
        data.update(map_points(session, run_dir, overview=data, offset=offset,
                               limit=limit, label_id=label))
    return render(request, "map.html", {"data": data, "run": run, "credit": credit_for(run)})


@router.get("/runs/{run_id:int}/map/points.bin",
            summary="The map's points as binary records (format in the map's JSON, point_format)")
def map_points_file(run_id: int, session: SessionDep, settings: SettingsDep, v: str | None = None):
    run = load_run(session, run_id)
    run_dir = settings.runs_dir / str(run_id)
    meta = run_files.read_map_meta(run_dir) if "map" in run["stages_done"] else None
    if meta is None:
        raise HTTPException(404, f"Run {run_id} has no patch map.")
    # The URL names the version: a page that asks for the current one may keep it forever.
    cache = CACHE_FOREVER if v == meta["version"] else "no-cache"
    return FileResponse(run_files.points_file(run_dir, meta), media_type="application/octet-stream",
                        headers={"Cache-Control": cache, "X-Map-Version": meta["version"]})
