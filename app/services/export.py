"""A run's results as JSON, CSV or a self-contained HTML report, written as a stream.

The JSON layout is stable (docs/export.md)::

    {"run": {...parameters...},
     "labels": [{"name": str, "clusters": [{"id": int, "rank": int, "median_typicality": float,
                 "ranking_typicality": float | null, "stability": float | null,
                 "coherence": float, "size": int, "is_artifact": bool, "trend": {label: float} | null,
                 "members": [{"image": original relative path,
                 "box": [x0, y0, x1, y1] in original image pixels, "typicality": float,
                 "typicality_stderr": float | null, "stay": float | null}]}]}],
     "images": [{"image": original relative path, "split": str,
                 "scores": {label: image-level typicality, ...}}]}

Labels are read one at a time and images in pages, so exporting a large run never holds it all.
"""
from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Iterator
from typing import IO

from sqlalchemy import select

from app.db import session_scope
from app.ingest import TWEMOJI_CREDIT
from app.models import Cluster, ClusterMember, Dataset, Image, ImageScore, MiningRun, Patch, TrainedModel
from app.services.runs import labels_of
from app.settings import Settings

IMAGE_PAGE = 1000
HTML_CLUSTERS, HTML_MEMBERS = 8, 16


def export_run(settings: Settings, *, run_id: int, format: str, out: IO[str]) -> None:
    writers = {"json": write_json, "csv": write_csv, "html": write_html}
    if format not in writers:
        raise ValueError(f"unknown export format {format!r}; choose json, csv or html")
    writers[format](settings, run_id, out)


def run_header(settings: Settings, run_id: int) -> dict:
    with session_scope(settings) as session:
        run = session.get(MiningRun, run_id)
        if run is None:
            raise LookupError(f"no run {run_id}")
        model = session.get(TrainedModel, run.model_id)
        dataset = session.get(Dataset, model.dataset_id)
        return {"id": run.id, "status": run.status, "preset": run.preset, "params": run.params,
                "model": {"id": model.id, "backend": model.backend, "config": model.config,
                          "metrics": {k: v for k, v in model.metrics.items() if k != "loss_curve"}},
                "dataset": dataset.name, "dataset_source": dataset.source,
                "label_set_id": model.label_set_id}


def label_clusters(settings: Settings, run_id: int, label_id: int, *, max_clusters: int | None = None,
                   max_members: int | None = None) -> list[dict]:
    with session_scope(settings) as session:
        query = (select(Cluster).where(Cluster.run_id == run_id, Cluster.label_id == label_id)
                 .order_by(Cluster.rank))
        clusters = session.scalars(query.limit(max_clusters) if max_clusters else query).all()
        out = []
        for cluster in clusters:
            members = (select(Image.original_path, Patch.x0, Patch.y0, Patch.x1, Patch.y1,
                              Patch.score, Patch.score_stderr, Patch.stay, Patch.crop_path)
                       .select_from(ClusterMember)
                       .join(Patch, Patch.id == ClusterMember.patch_id)
                       .join(Image, Image.id == Patch.image_id)
                       .where(ClusterMember.cluster_id == cluster.id).order_by(ClusterMember.position))
            rows = session.execute(members.limit(max_members) if max_members else members).all()
            out.append({"id": cluster.id, "rank": cluster.rank,
                        "median_typicality": cluster.median_typicality,
                        "ranking_typicality": cluster.ranking_typicality, "stability": cluster.stability,
                        "coherence": cluster.coherence, "size": cluster.size,
                        "is_artifact": cluster.is_artifact, "trend": cluster.trend,
                        "members": [{"image": path, "box": [x0, y0, x1, y1], "typicality": score,
                                     "typicality_stderr": stderr, "stay": stay, "crop": crop}
                                    for path, x0, y0, x1, y1, score, stderr, stay, crop in rows]})
        return out


def image_scores(settings: Settings, run_id: int, label_names: dict[int, str]) -> Iterator[dict]:
    """Every scored image with its typicality under each label, a page at a time."""
    after = 0
    while True:
        with session_scope(settings) as session:
            ids = session.scalars(select(ImageScore.image_id).where(
                ImageScore.run_id == run_id, ImageScore.image_id > after).distinct()
                .order_by(ImageScore.image_id).limit(IMAGE_PAGE)).all()
            if not ids:
                return
            rows = session.execute(
                select(Image.id, Image.original_path, Image.split, ImageScore.label_id,
                       ImageScore.typicality).join(ImageScore, ImageScore.image_id == Image.id)
                .where(ImageScore.run_id == run_id, Image.id.in_(ids)).order_by(Image.id)).all()
        current: dict | None = None
        for image_id, path, split, label_id, typicality in rows:
            if current is None or current["id"] != image_id:
                if current:
                    yield {k: v for k, v in current.items() if k != "id"}
                current = {"id": image_id, "image": path, "split": split, "scores": {}}
            current["scores"][label_names[label_id]] = typicality
        if current:
            yield {k: v for k, v in current.items() if k != "id"}
        after = ids[-1]


def _labels(settings: Settings, label_set_id: int) -> list[tuple[int, str]]:
    with session_scope(settings) as session:
        return [(label.id, label.name) for label in labels_of(session, label_set_id)]


def write_json(settings: Settings, run_id: int, out: IO[str]) -> None:
    header = run_header(settings, run_id)
    labels = _labels(settings, header["label_set_id"])
    out.write('{"run": ' + json.dumps(header) + ', "labels": [')
    for number, (label_id, name) in enumerate(labels):
        clusters = [{k: v for k, v in c.items() if k != "crop"} | {
            "members": [{k: v for k, v in m.items() if k != "crop"} for m in c["members"]]}
            for c in label_clusters(settings, run_id, label_id)]
        out.write(("," if number else "") + json.dumps({"name": name, "clusters": clusters}))
    out.write('], "images": [')
    for number, image in enumerate(image_scores(settings, run_id, dict(labels))):
        out.write(("," if number else "") + json.dumps(image))
    out.write("]}\n")


def write_csv(settings: Settings, run_id: int, out: IO[str]) -> None:
    """One row per cluster member (columns added since are appended, so old readers keep working)."""
    header = run_header(settings, run_id)
    writer = csv.writer(out)
    writer.writerow(["label", "cluster_rank", "cluster_median_typicality", "cluster_coherence",
                     "position", "image", "x0", "y0", "x1", "y1", "typicality",
                     "typicality_stderr", "stay", "cluster_stability", "cluster_ranking_typicality"])
    for label_id, name in _labels(settings, header["label_set_id"]):
        for cluster in label_clusters(settings, run_id, label_id):
            for position, member in enumerate(cluster["members"]):
                writer.writerow([name, cluster["rank"], cluster["median_typicality"],
                                 cluster["coherence"], position, member["image"], *member["box"],
                                 member["typicality"], _blank(member["typicality_stderr"]),
                                 _blank(member["stay"]), _blank(cluster["stability"]),
                                 _blank(cluster["ranking_typicality"])])


def _blank(value):
    """CSV has no null: runs mined before these columns existed leave the cell empty."""
    return "" if value is None else value


def write_html(settings: Settings, run_id: int, out: IO[str]) -> None:
    """A self-contained report (crops inlined as data URIs) that can be mailed or published."""
    header = run_header(settings, run_id)
    esc = html.escape
    out.write(f"<!doctype html><html lang=en><meta charset=utf-8><title>diffmine run {run_id}: "
              f"{esc(header['dataset'])}</title><style>{REPORT_CSS}</style>"
              f"<h1>What is typical of each label in {esc(header['dataset'])}</h1>"
              f"<p class=meta>run {run_id} · preset {esc(header['preset'])} · "
              f"model {header['model']['id']} ({esc(header['model']['backend'])})</p>")
    for label_id, name in _labels(settings, header["label_set_id"]):
        out.write(f"<section><h2>{esc(name)}</h2>")
        for cluster in label_clusters(settings, run_id, label_id, max_clusters=HTML_CLUSTERS,
                                      max_members=HTML_MEMBERS):
            settled = (f" · {cluster['stability']:.0%} of its patches expected to stay in the label's "
                       f"top patches under new draws" if cluster["stability"] is not None else "")
            out.write(f"<div class=cluster><p>cluster {cluster['rank'] + 1} · {cluster['size']} "
                      f"patches · median typicality {cluster['median_typicality']:.4g}{esc(settled)}</p>")
            for member in cluster["members"]:
                if member["crop"]:
                    data = base64.b64encode((settings.home_dir / member["crop"]).read_bytes()).decode()
                    out.write(f"<img src='data:image/png;base64,{data}' "
                              f"title='{esc(member['image'])}' alt=''>")
            out.write("</div>")
        out.write("</section>")
    if header["dataset_source"] == "builtin:twemoji":
        out.write(f"<footer>{esc(TWEMOJI_CREDIT)}</footer>")
    out.write("</html>\n")


REPORT_CSS = ("body{font:14px system-ui,sans-serif;margin:2rem;color:#222}"
              ".cluster{margin:.5rem 0 1rem}.cluster p{margin:.2rem 0;color:#666}"
              "img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;"
              "border:1px solid #ddd;margin:1px}.meta,footer{color:#666}")
