"""One cluster: every member (pages load as they scroll into view), its typicality across the
run's labels, the artifact mark, and its consistent-change view (each member translated into
every label, one row per member)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request

from app.services.galleries import MEMBERS_PER_PAGE, cluster_info, cluster_members, cluster_profile, labels_of_set
from app.services.runs import NotFound
from app.services.runs import mark_artifact as mark_artifact_of
from app.services.translations import CLUSTER_MEMBERS, cluster_translations, request_cluster_translations
from app.web.deps import CSRF, SessionDep, is_htmx, redirect, render
from app.web.ids import Offset
from app.web.page_cache import touch
from app.web.views.runs import credit_for, load_run

router = APIRouter(tags=["clusters"])


def load_cluster(session, cluster_id: int) -> dict:
    cluster = cluster_info(session, cluster_id=cluster_id)
    if cluster is None:
        raise HTTPException(404, f"There is no cluster {cluster_id}.")
    return cluster


@router.get("/clusters/{cluster_id:int}",
            summary="A cluster: members, typicality across labels, artifact mark")
def cluster_page(request: Request, cluster_id: int, session: SessionDep,
                 offset: Offset = 0, limit: int = Query(MEMBERS_PER_PAGE, ge=1, le=1000)):
    cluster = load_cluster(session, cluster_id)
    run = load_run(session, cluster["run"])
    page = cluster_members(session, cluster_id=cluster_id, offset=offset, limit=limit)
    more_url = f"/clusters/{cluster_id}?offset={page['next_offset']}&limit={limit}"
    context = {"run": run, "cluster": cluster, "more_url": more_url, "credit": credit_for(run)}
    if offset and is_htmx(request):
        return render(request, "_members.html", dict(context, data=page))
    labels = labels_of_set(session, label_set_id=run["label_set"]["id"])
    profile = cluster_profile(session, cluster=cluster, labels=labels)
    data = dict(cluster, run=run, profile=profile, **page)
    return render(request, "cluster.html", dict(context, data=data))


@router.post("/clusters/{cluster_id:int}/artifact", dependencies=CSRF,
             summary="Mark (artifact=1) or unmark (artifact=0) the cluster as a dataset artifact")
async def mark_artifact(request: Request, cluster_id: int, session: SessionDep):
    form = await request.form()
    try:
        cluster = mark_artifact_of(session, cluster_id=cluster_id,
                                   artifact=str(form.get("artifact", "1")) not in ("0", "false", ""))
    except NotFound:
        raise HTTPException(404, f"There is no cluster {cluster_id}.") from None
    session.commit()
    touch(request.app.state.settings.runs_dir, cluster.run_id)  # cached gallery pages are stale
    data = load_cluster(session, cluster_id)
    if is_htmx(request):
        return render(request, "_artifact.html", {"data": data, "cluster": data})
    return redirect(request, f"/clusters/{cluster_id}", data=data)


@router.post("/clusters/{cluster_id:int}/translate", dependencies=CSRF,
             summary="Translate the cluster's first members into every label")
def translate_cluster(request: Request, cluster_id: int, session: SessionDep):
    load_cluster(session, cluster_id)
    requested = request_cluster_translations(session, cluster_id=cluster_id)
    return redirect(request, f"/clusters/{cluster_id}/translations",
                    data={"translations": [t.id for t, _ in requested],
                          "jobs": [j for _, j in requested if j is not None]})


@router.get("/clusters/{cluster_id:int}/translations",
            summary="Consistent changes: each member as a row of its versions, one per label")
def cluster_translations_page(request: Request, cluster_id: int, session: SessionDep):
    cluster = load_cluster(session, cluster_id)
    run = load_run(session, cluster["run"])
    rows = cluster_translations(session, cluster_id=cluster_id)
    pending = any(r["translation"] is not None and not r["translation"]["ready"]
                  and (r["translation"]["job"] or {}).get("status") in ("queued", "running")
                  for r in rows)
    data = dict(cluster, run=run, rows=rows, pending=pending, members=CLUSTER_MEMBERS,
                requested=any(r["translation"] is not None for r in rows))
    context = {"data": data, "cluster": cluster, "run": run, "credit": credit_for(run)}
    if is_htmx(request):
        return render(request, "_cluster_translations.html", context)
    return render(request, "cluster_translations.html", context)
