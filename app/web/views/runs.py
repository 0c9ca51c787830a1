"""A mined run: its labels at a glance, one label's gallery of clusters (pages of clusters load as
they scroll into view; labels switch without a full reload), and two labels side by side."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from markupsafe import Markup

from app.db import session_scope
from app.ingest import TWEMOJI_CREDIT
from app.services.contrast import label_contrast
from app.services.galleries import (
    CLUSTERS_PER_PAGE,
    MEMBERS_INLINE,
    active_run_jobs,
    clusters_page,
    label_in_set,
    labels_of_set,
    run_info,
    run_label_overview,
)
from app.services.runs import launch_recluster
from app.web.deps import CSRF, SessionDep, SettingsDep, is_htmx, redirect, render, templates, wants_json
from app.web.ids import Offset, QueryId
from app.web.page_cache import run_version, touch

router = APIRouter(tags=["galleries"])


def load_run(session, run_id: int) -> dict:
    run = run_info(session, run_id=run_id)
    if run is None:
        raise HTTPException(404, f"There is no run {run_id}.")
    return run


def credit_for(run: dict) -> str | None:
    return TWEMOJI_CREDIT if run["dataset"]["source"] == "builtin:twemoji" else None


def load_label(session, run: dict, label_id: int) -> dict:
    label = label_in_set(session, label_id=label_id, label_set_id=run["label_set"]["id"])
    if label is None:
        raise HTTPException(404, f"Run {run['id']} has no label {label_id}.")
    return label


@router.get("/runs/{run_id:int}", summary="A run: status and every label's top cluster")
def run_page(request: Request, run_id: int, session: SessionDep, offset: Offset = 0):
    run = load_run(session, run_id)
    labels = labels_of_set(session, label_set_id=run["label_set"]["id"])
    overview = run_label_overview(session, run_id=run_id, labels=labels, offset=offset)
    data = dict(run, job=active_run_jobs(session).get(run_id), **overview)
    context = {"data": data, "run": run, "credit": credit_for(run)}
    if offset and is_htmx(request):
        return render(request, "_run_labels.html", context)
    return render(request, "run.html", context)


@router.post("/runs/{run_id:int}/recluster", dependencies=CSRF,
             summary="Cluster again without look-alikes of the clusters marked as artifacts")
def recluster(request: Request, run_id: int, session: SessionDep, settings: SettingsDep):
    load_run(session, run_id)
    try:
        job = launch_recluster(session, run_id=run_id)
    except ValueError as error:
        raise HTTPException(409, str(error)) from error
    session.commit()
    touch(settings.runs_dir, run_id)  # cached gallery pages are stale
    return redirect(request, f"/runs/{run_id}", data={"job": job.id})


def label_lists(request: Request, run: dict, labels: list[dict], current: int) -> dict:
    """The label list and the compare menu as HTML, rendered once per run and kept (labels
    never change once ingested): with hundreds of labels they cost more than the clusters.
    They share the gallery pages' cache and its bound in bytes (web/page_cache.py)."""
    cache = request.app.state.page_cache
    key = ("label lists", run["id"], run["label_set"]["id"], len(labels))
    lists = cache.get(key)
    if lists is None:
        macros = templates.env.get_template("_label_lists.html").module
        lists = (str(macros.nav(run, labels)), str(macros.options(labels)))
        cache.put(key, lists)
    nav, options = lists
    return {"nav": Markup(nav.replace(f'data-id="{current}"', f'data-id="{current}" class="current"', 1)),
            "options": Markup(options.replace(f'value="{current}">', f'value="{current}" disabled>', 1))}


def _page_args(show_artifacts: bool) -> str:
    return "&artifacts=1" if show_artifacts else ""


@router.get("/runs/{run_id:int}/labels/{label_id:int}",
            summary="A label's gallery: its clusters in rank order, each with its first members")
async def gallery(request: Request, run_id: int, label_id: int, artifacts: bool = False,
                  offset: Offset = 0,
                  per_page: int = Query(CLUSTERS_PER_PAGE, ge=1, le=50),
                  members: int = Query(MEMBERS_INLINE, ge=0, le=200)):
    # The busiest page runs on the event loop: a few indexed SQLite reads (about a
    # millisecond) cost less than the thread hand-offs a sync route and session would take.
    with session_scope(request.app.state.settings) as session:
        return _gallery(request, session, run_id, label_id, artifacts, offset, per_page, members)


def _gallery(request, session, run_id, label_id, artifacts, offset, per_page, members):
    run = load_run(session, run_id)
    label = load_label(session, run, label_id)
    cache = request.app.state.page_cache
    version = run_version(request.app.state.settings.runs_dir, run)
    key = (version, label_id, offset, per_page, members, artifacts) if version else None
    cached = cache.get(key) if key else None
    if cached is None:
        page = clusters_page(session, run_id=run_id, label_id=label_id, offset=offset,
                             limit=per_page, members=members, show_artifacts=artifacts)
        more_url = (f"/runs/{run_id}/labels/{label_id}?offset={page['next_offset']}"
                    f"&per_page={per_page}&members={members}{_page_args(artifacts)}")
        # The clusters' HTML holds nothing personal (no CSRF token): made once, shared.
        html = templates.get_template("_clusters.html").render(
            {"data": page, "more_url": more_url, "request": request})
        cached = {"page": page, "html": Markup(html)}
        if key:
            cache.put(key, cached)
    page = cached["page"]
    if is_htmx(request) and request.headers.get("hx-target") != "gallery" and not wants_json(request):
        return HTMLResponse(cached["html"])  # the next page of clusters
    labels = cache.get(("labels", version)) if version else None
    if labels is None:
        labels = labels_of_set(session, label_set_id=run["label_set"]["id"])
        if version:
            cache.put(("labels", version), labels)
    data = {"run": run, "label": label, "show_artifacts": artifacts, **page, "labels": labels}
    if wants_json(request):
        return JSONResponse(data)
    context = {"data": data, "run": run, "label": label, "credit": credit_for(run),
               "clusters_html": cached["html"],
               "lists": label_lists(request, run, labels, label_id)}
    if is_htmx(request):  # another label, same page around it
        return render(request, "_gallery.html", dict(context, fragment=True))
    return render(request, "gallery.html", context)


@router.get("/runs/{run_id:int}/compare",
            summary="Two labels' galleries side by side, and each one's patches ranked by T(x|A) - T(x|B)")
def compare(request: Request, run_id: int, session: SessionDep, settings: SettingsDep,
            a: QueryId = None, b: QueryId = None, artifacts: bool = False):
    run = load_run(session, run_id)
    labels = labels_of_set(session, label_set_id=run["label_set"]["id"])
    if not labels:
        raise HTTPException(404, f"Run {run_id} has no labels.")
    a = a if a is not None else labels[0]["id"]
    b = b if b is not None else labels[min(1, len(labels) - 1)]["id"]
    sides = []
    for label_id, other in ((a, b), (b, a)):
        label = load_label(session, run, label_id)
        page = clusters_page(session, run_id=run_id, label_id=label_id, show_artifacts=artifacts,
                             members=MEMBERS_INLINE)
        contrast = label_contrast(session, settings.runs_dir / str(run_id), run=run,
                                  label_id=label_id, against=other)
        sides.append({"label": label, **page, "contrast": contrast,
                      "more_url": f"/runs/{run_id}/labels/{label_id}?offset={page['next_offset']}"
                                  f"&per_page={CLUSTERS_PER_PAGE}&members={MEMBERS_INLINE}"
                                  f"{_page_args(artifacts)}"})
    data = {"run": run, "labels": labels, "a": a, "b": b, "sides": sides,
            "show_artifacts": artifacts}
    return render(request, "compare.html", {"data": data, "run": run, "credit": credit_for(run)})
