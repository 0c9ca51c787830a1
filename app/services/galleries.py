"""Read-side queries for mined runs: the run, its labels, clusters page by page, members.

Every query reads a bounded slice through an index (clusters by run, label and rank; members by
cluster and position; patches by image or feature row): pages stay fast with 1,000 patches per
label and hundreds of labels. Results are plain dicts, the same for a page and its JSON twin.
"""
from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from app.models import Cluster, ClusterMember, Dataset, ImageScore, Job, Label, LabelSet, MiningRun, Patch, TrainedModel

CLUSTERS_PER_PAGE = 5
MEMBERS_INLINE = 10
MEMBERS_PER_PAGE = 100
LABELS_PER_PAGE = 40
#: Members whose images are averaged for a cluster's per-label profile (when no trend is stored).
PROFILE_MEMBERS = 100


# The gallery's statements are built once: building a statement costs more than running it.
_RUN_INFO = (
    select(MiningRun.id, MiningRun.status, MiningRun.preset, MiningRun.params,
           MiningRun.stages_done, MiningRun.created_at, MiningRun.finished_at,
           TrainedModel.id.label("model_id"), TrainedModel.backend, TrainedModel.config,
           TrainedModel.status.label("model_status"), TrainedModel.metrics,
           LabelSet.id.label("label_set_id"), LabelSet.name.label("label_set"),
           LabelSet.kind, Dataset.id.label("dataset_id"), Dataset.name.label("dataset"),
           Dataset.source)
    .join(TrainedModel, TrainedModel.id == MiningRun.model_id)
    .join(LabelSet, LabelSet.id == TrainedModel.label_set_id)
    .join(Dataset, Dataset.id == TrainedModel.dataset_id)
    .where(MiningRun.id == bindparam("run_id")))
_LABELS_OF_SET = (select(Label.id, Label.name, Label.image_count)
                  .where(Label.label_set_id == bindparam("label_set_id")).order_by(Label.position))
_LABEL_IN_SET = select(Label.id, Label.name, Label.image_count).where(
    Label.id == bindparam("label_id"), Label.label_set_id == bindparam("label_set_id"))


def run_info(session: Session, *, run_id: int) -> dict | None:
    row = session.connection().execute(_RUN_INFO, {"run_id": run_id}).first()
    if row is None:
        return None
    return {"id": row.id, "status": row.status, "preset": row.preset, "params": row.params,
            "stages_done": row.stages_done or [],
            "created_at": row.created_at.isoformat(timespec="seconds"),
            "finished_at": row.finished_at.isoformat(timespec="seconds") if row.finished_at else None,
            "model": {"id": row.model_id, "backend": row.backend, "config": row.config,
                      "status": row.model_status, "metrics": _short_metrics(row.metrics)},
            "label_set": {"id": row.label_set_id, "name": row.label_set, "kind": row.kind},
            "dataset": {"id": row.dataset_id, "name": row.dataset, "source": row.source}}


def _short_metrics(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if not isinstance(v, (list, dict))}


def labels_of_set(session: Session, *, label_set_id: int) -> list[dict]:
    return [{"id": i, "name": n, "images": c} for i, n, c in session.connection().execute(
        _LABELS_OF_SET, {"label_set_id": label_set_id})]


def label_in_set(session: Session, *, label_id: int, label_set_id: int) -> dict | None:
    row = session.connection().execute(_LABEL_IN_SET, {"label_id": label_id,
                                          "label_set_id": label_set_id}).first()
    return {"id": row.id, "name": row.name, "images": row.image_count} if row else None


def patch_json(row) -> dict:
    """`stderr`: the score's standard error over the draws; `stay`: its chance to stay in the
    label's top K under new draws (None for runs mined before, or drawn at random)."""
    return {"id": row.patch_id, "image": row.image_id, "label": row.label_id,
            "score": row.score, "stderr": row.score_stderr, "stay": row.stay, "crop": row.crop_path,
            "box": [row.x0, row.y0, row.x1, row.y1]}


_PATCH_COLUMNS = (Patch.id.label("patch_id"), Patch.image_id, Patch.label_id, Patch.score,
                  Patch.score_stderr, Patch.stay, Patch.crop_path, Patch.x0, Patch.y0, Patch.x1, Patch.y1)


def _cluster_json(c) -> dict:
    """`stability`: the share of members expected to stay in the label's top K under new draws;
    `ranking_typicality`: the median shrunk toward the label's by size, which the rank follows."""
    return {"id": c.id, "rank": c.rank, "size": c.size,
            "median_typicality": c.median_typicality, "ranking_typicality": c.ranking_typicality,
            "stability": c.stability, "coherence": c.coherence,
            "is_artifact": bool(c.is_artifact)}


_CLUSTER_COLUMNS = (Cluster.id, Cluster.rank, Cluster.size, Cluster.median_typicality,
                    Cluster.ranking_typicality, Cluster.stability, Cluster.coherence, Cluster.is_artifact)
_CLUSTERS = {artifacts: (select(*_CLUSTER_COLUMNS)
                         .where(Cluster.run_id == bindparam("run_id"),
                                Cluster.label_id == bindparam("label_id"),
                                *([] if artifacts else [Cluster.is_artifact.is_(False)]))
                         .order_by(Cluster.rank).offset(bindparam("offset")).limit(bindparam("limit")))
             for artifacts in (False, True)}
_MEMBERS_OF = (select(ClusterMember.cluster_id, ClusterMember.distance, *_PATCH_COLUMNS)
               .join(Patch, Patch.id == ClusterMember.patch_id)
               .where(ClusterMember.cluster_id.in_(bindparam("ids", expanding=True)),
                      ClusterMember.position < bindparam("members"))
               .order_by(ClusterMember.cluster_id, ClusterMember.position))
_ARTIFACTS = select(func.count()).select_from(Cluster).where(
    Cluster.run_id == bindparam("run_id"), Cluster.label_id == bindparam("label_id"),
    Cluster.is_artifact.is_(True))


def clusters_page(session: Session, *, run_id: int, label_id: int, offset: int = 0,
                  limit: int = CLUSTERS_PER_PAGE, members: int = MEMBERS_INLINE,
                  show_artifacts: bool = False) -> dict:
    """One page of a label's clusters in rank order, each with its first `members` patches."""
    conn = session.connection()  # Core, not the ORM: these rows are plain tuples
    rows = conn.execute(_CLUSTERS[show_artifacts], {"run_id": run_id, "label_id": label_id,
                                                       "offset": offset, "limit": limit + 1}).all()
    more = len(rows) > limit
    clusters = [_cluster_json(c) for c in rows[:limit]]
    if clusters and members > 0:
        by_id = {c["id"]: c for c in clusters}
        for c in clusters:
            c["members"] = []
        for r in conn.execute(_MEMBERS_OF, {"ids": list(by_id), "members": members}):
            by_id[r.cluster_id]["members"].append(dict(patch_json(r), distance=r.distance))
    hidden = 0
    if not show_artifacts and offset == 0:
        hidden = conn.scalar(_ARTIFACTS, {"run_id": run_id, "label_id": label_id})
    return {"clusters": clusters, "offset": offset,
            "next_offset": offset + limit if more else None, "artifacts_hidden": hidden}


def cluster_info(session: Session, *, cluster_id: int) -> dict | None:
    c = session.get(Cluster, cluster_id)
    if c is None:
        return None
    label = session.get(Label, c.label_id)
    return dict(_cluster_json(c), run=c.run_id, label={"id": label.id, "name": label.name},
                trend=c.trend)


def cluster_members(session: Session, *, cluster_id: int, offset: int = 0,
                    limit: int = MEMBERS_PER_PAGE) -> dict:
    """Members in order (closest to the centroid first), by position: a keyed range scan."""
    rows = session.execute(
        select(ClusterMember.position, ClusterMember.distance, *_PATCH_COLUMNS)
        .join(Patch, Patch.id == ClusterMember.patch_id)
        .where(ClusterMember.cluster_id == cluster_id, ClusterMember.position >= offset,
               ClusterMember.position < offset + limit + 1)
        .order_by(ClusterMember.position)).all()
    members = [dict(patch_json(r), position=r.position, distance=r.distance) for r in rows[:limit]]
    return {"members": members, "offset": offset,
            "next_offset": offset + limit if len(rows) > limit else None}


def cluster_profile(session: Session, *, cluster: dict, labels: list[dict]) -> dict:
    """The cluster's typicality across the run's labels, in label order.

    The mining job stores a trend for ordered labels (the members' typicality under each
    label); otherwise the mean image typicality of the first members' images under each label
    is read from the run's all-label scores."""
    if cluster.get("trend"):
        trend = cluster["trend"]
        points = [{"label": entry["name"], "label_id": entry["id"], "value": trend.get(entry["name"])}
                  for entry in labels if entry["name"] in trend]
        return {"source": "trend", "points": points}
    first = (select(ClusterMember.patch_id).where(ClusterMember.cluster_id == cluster["id"],
                                                  ClusterMember.position < PROFILE_MEMBERS)
             .scalar_subquery())
    images = select(Patch.image_id).where(Patch.id.in_(first)).distinct().scalar_subquery()
    values = dict(session.execute(
        select(ImageScore.label_id, func.avg(ImageScore.typicality))
        .where(ImageScore.run_id == cluster["run"], ImageScore.image_id.in_(images))
        .group_by(ImageScore.label_id)).all())
    points = [{"label": entry["name"], "label_id": entry["id"], "value": values.get(entry["id"])}
              for entry in labels if entry["id"] in values]
    return {"source": "image scores", "points": points}


def run_label_overview(session: Session, *, run_id: int, labels: list[dict], offset: int = 0,
                       limit: int = LABELS_PER_PAGE, members: int = 8) -> dict:
    """A page of labels, each with its top (non-artifact) cluster's first members."""
    page = labels[offset:offset + limit]
    ids = [label["id"] for label in page]
    out = {label["id"]: dict(label, top=None, clusters=0) for label in page}
    if ids:
        counts = session.execute(
            select(Cluster.label_id, func.count(), func.min(Cluster.rank))
            .where(Cluster.run_id == run_id, Cluster.label_id.in_(ids),
                   Cluster.is_artifact.is_(False))
            .group_by(Cluster.label_id)).all()
        top_ranks = {}
        for label_id, count, rank in counts:
            out[label_id]["clusters"] = count
            top_ranks[label_id] = rank
        tops = {}
        if top_ranks:
            for c in session.execute(
                    select(Cluster.label_id, *_CLUSTER_COLUMNS)
                    .where(Cluster.run_id == run_id, Cluster.label_id.in_(list(top_ranks)))
                    .order_by(Cluster.label_id, Cluster.rank)):
                if c.rank == top_ranks[c.label_id]:
                    tops[c.id] = dict(_cluster_json(c), members=[])
                    out[c.label_id]["top"] = tops[c.id]
        if tops:
            for row in session.execute(
                    select(ClusterMember.cluster_id, *_PATCH_COLUMNS)
                    .join(Patch, Patch.id == ClusterMember.patch_id)
                    .where(ClusterMember.cluster_id.in_(list(tops)),
                           ClusterMember.position < members)
                    .order_by(ClusterMember.cluster_id, ClusterMember.position)):
                tops[row.cluster_id]["members"].append(patch_json(row))
    more = offset + limit < len(labels)
    return {"labels": [out[i] for i in ids], "offset": offset,
            "next_offset": offset + limit if more else None}


def runs_of_datasets(session: Session, *, dataset_ids: list[int]) -> dict[int, list[dict]]:
    """Models and runs per dataset, newest first (a few rows per dataset)."""
    out: dict[int, list[dict]] = {i: [] for i in dataset_ids}
    if not dataset_ids:
        return out
    rows = session.execute(
        select(MiningRun.id, MiningRun.status, MiningRun.preset, MiningRun.created_at,
               TrainedModel.id.label("model_id"), TrainedModel.backend,
               TrainedModel.status.label("model_status"), TrainedModel.dataset_id,
               LabelSet.name.label("label_set"))
        .join(TrainedModel, TrainedModel.id == MiningRun.model_id)
        .join(LabelSet, LabelSet.id == TrainedModel.label_set_id)
        .where(TrainedModel.dataset_id.in_(dataset_ids))
        .order_by(MiningRun.id.desc()).limit(50 * len(dataset_ids)))
    jobs = active_run_jobs(session)
    for r in rows:
        out[r.dataset_id].append({
            "id": r.id, "status": r.status, "preset": r.preset, "label_set": r.label_set,
            "created_at": r.created_at.isoformat(timespec="seconds"),
            "model": {"id": r.model_id, "backend": r.backend, "status": r.model_status},
            "job": jobs.get(r.id)})
    return out


def models_of_dataset(session: Session, *, dataset_id: int) -> list[dict]:
    return [{"id": m.id, "backend": m.backend, "status": m.status, "config": m.config,
             "metrics": _short_metrics(m.metrics),
             "created_at": m.created_at.isoformat(timespec="seconds")}
            for m in session.scalars(select(TrainedModel).where(TrainedModel.dataset_id == dataset_id)
                                     .order_by(TrainedModel.id.desc()).limit(100))]


def active_run_jobs(session: Session) -> dict[int, dict]:
    """{run id: its queued or running job} from the (few) active jobs."""
    out = {}
    for job in session.scalars(select(Job).where(Job.status.in_(("queued", "running")))
                               .order_by(Job.id).limit(500)):
        run_id = (job.params or {}).get("run_id")
        if run_id is not None:
            total = job.progress_total or 0
            out[run_id] = {"id": job.id, "kind": job.kind, "status": job.status,
                           "stage": job.stage,
                           "fraction": job.progress_done / total if total else None}
    return out
