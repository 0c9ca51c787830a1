"""Translations across labels as rows and jobs: the web records a `Translation` and a
"translate" job; the worker's translate handler fills the row (status, result_dir, results).

Contract with the handler: the job's params are {"translation_id": T}; the row carries
model_id, image_id, patch_id, box = [x0, y0, x1, y1] in original pixels, params (translation
options, {} for the defaults) and settings_key = `translation_key(box, params)`. The handler
sets status ("queued" / "running" / "ready" / "failed"), result_dir and results =
[{"label", "label_id", "crop" (relative to the data directory), "typicality", "is_source"}].
A second request for the same (model, image, settings_key) reuses the row: clicks are cached.
"""
from __future__ import annotations

import hashlib
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import ACTIVE, PRIORITY_INTERACTIVE, enqueue
from app.models import ClusterMember, Job, MiningRun, Patch, TrainedModel, Translation
from app.params import TranslationOptions
from app.services.runs import NotFound

#: Members of a cluster translated for its consistent-change view.
CLUSTER_MEMBERS = 8
#: Recent translate jobs looked through to find a translation's finished job.
RECENT_JOBS = 300


def translation_key(box: list, params: dict) -> str:
    """sha256 of the canonical JSON of [box, params]."""
    text = json.dumps([list(box) if box is not None else None, params], sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def request_translation(session: Session, *, patch_id: int,
                        options: TranslationOptions | None = None) -> tuple[Translation, int | None]:
    """The translation of a patch's region into every label: the cached row when there is one
    (with its running job, or None when it is ready), else a new row and an interactive job."""
    patch = session.get(Patch, patch_id)
    if patch is None:
        raise NotFound(f"no patch {patch_id}")
    model = session.get(TrainedModel, session.scalar(select(MiningRun.model_id)
                                                     .where(MiningRun.id == patch.run_id)))
    return cached_or_queued(session, model=model, image_id=patch.image_id, patch_id=patch.id,
                            box=[patch.x0, patch.y0, patch.x1, patch.y1], options=options)


def cached_or_queued(session: Session, *, model: TrainedModel, image_id: int, patch_id: int | None,
                     box: list | None, options: TranslationOptions | None) -> tuple[Translation, int | None]:
    """The row for these settings (ready: no job; running: its job), else a new or retried row
    and its interactive job. Options are stored in their smallest spelling for the model's
    backend, so equal settings share one row however they were given."""
    params = (options or TranslationOptions()).canonical(model.backend)
    key = translation_key(box, params)
    translation = session.scalar(
        select(Translation).where(Translation.model_id == model.id, Translation.image_id == image_id,
                                  Translation.settings_key == key)
        .order_by(Translation.id.desc()).limit(1))
    if translation is None:
        translation = Translation(model_id=model.id, image_id=image_id, patch_id=patch_id,
                                  box=box, params=params, settings_key=key, status="queued")
        session.add(translation)
        session.flush()
    elif translation.status == "ready":
        return translation, None
    else:
        job = jobs_for(session, [translation.id]).get(translation.id)
        if job is not None and job.status in ACTIVE:
            return translation, job.id
        translation.status = "queued"  # failed, or its job is gone: try again
    job = enqueue(session, kind="translate", params={"translation_id": translation.id},
                  priority=PRIORITY_INTERACTIVE)
    return translation, job.id


def jobs_for(session: Session, translation_ids: list[int]) -> dict[int, Job]:
    """The latest translate job of each translation: active jobs first (few, by the claim
    index), then the most recent finished ones (a bounded read, never the whole table)."""
    wanted, found = set(translation_ids), {}
    for query in (select(Job).where(Job.status.in_(ACTIVE), Job.kind == "translate")
                  .order_by(Job.id.desc()).limit(RECENT_JOBS),
                  select(Job).where(Job.kind == "translate").order_by(Job.id.desc())
                  .limit(RECENT_JOBS)):
        for job in session.scalars(query):
            tid = (job.params or {}).get("translation_id")
            if tid in wanted and tid not in found:
                found[tid] = job
        if len(found) == len(wanted):
            break
    return found


def translation_json(translation: Translation, job: Job | None = None) -> dict:
    from app.jobs import job_json

    results = translation.results or []
    return {"id": translation.id, "status": translation.status, "model": translation.model_id,
            "image": translation.image_id, "patch": translation.patch_id, "box": translation.box,
            "params": translation.params, "result_dir": translation.result_dir,
            "results": results, "ready": translation.status == "ready",
            "created_at": translation.created_at.isoformat(timespec="seconds"),
            "job": job_json(job) if job is not None else None}


def request_cluster_translations(session: Session, *, cluster_id: int,
                                 members: int = CLUSTER_MEMBERS) -> list[tuple[Translation, int | None]]:
    """Translations of the cluster's first members (the consistent-change view)."""
    patch_ids = session.scalars(select(ClusterMember.patch_id)
                                .where(ClusterMember.cluster_id == cluster_id,
                                       ClusterMember.position < members)
                                .order_by(ClusterMember.position)).all()
    return [request_translation(session, patch_id=p) for p in patch_ids]


def cluster_translations(session: Session, *, cluster_id: int,
                         members: int = CLUSTER_MEMBERS) -> list[dict]:
    """Each of the first members with its cached translation (or None when not requested)."""
    rows = session.execute(
        select(Patch.id, Patch.image_id, Patch.crop_path, Patch.score, Patch.x0, Patch.y0,
               Patch.x1, Patch.y1, MiningRun.model_id)
        .join(ClusterMember, ClusterMember.patch_id == Patch.id)
        .join(MiningRun, MiningRun.id == Patch.run_id)
        .where(ClusterMember.cluster_id == cluster_id, ClusterMember.position < members)
        .order_by(ClusterMember.position)).all()
    out, translations = [], {}
    for r in rows:
        key = translation_key([r.x0, r.y0, r.x1, r.y1], {})
        translation = session.scalar(
            select(Translation).where(Translation.model_id == r.model_id,
                                      Translation.image_id == r.image_id,
                                      Translation.settings_key == key)
            .order_by(Translation.id.desc()).limit(1))
        if translation is not None:
            translations[translation.id] = translation
        out.append({"patch": {"id": r.id, "image": r.image_id, "crop": r.crop_path,
                              "score": r.score},
                    "translation": translation})
    jobs = jobs_for(session, list(translations)) if translations else {}
    for row in out:
        t = row["translation"]
        row["translation"] = translation_json(t, jobs.get(t.id)) if t is not None else None
    return out
