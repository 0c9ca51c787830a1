"""One mined patch: where it comes from, the clusters it belongs to, and "more like this" from
the run's FAISS index of patch features (read here with faiss and numpy only: no torch)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Cluster, ClusterMember, Image, Label, Patch
from app.run_files import crop_path, save_crop
from app.services.galleries import _PATCH_COLUMNS, patch_json
from app.services.images import stored_file
from app.settings import Settings

SIMILAR_K = 24


def patch_info(session: Session, *, patch_id: int) -> dict | None:
    row = session.execute(select(*_PATCH_COLUMNS, Patch.run_id, Patch.feature_row,
                                 Label.name.label("label_name"))
                          .join(Label, Label.id == Patch.label_id)
                          .where(Patch.id == patch_id)).first()
    if row is None:
        return None
    clusters = [{"id": c.id, "rank": c.rank, "label_id": c.label_id, "size": c.size,
                 "median_typicality": c.median_typicality, "is_artifact": bool(c.is_artifact),
                 "position": c.position}
                for c in session.execute(
                    select(Cluster.id, Cluster.rank, Cluster.label_id, Cluster.size,
                           Cluster.median_typicality, Cluster.is_artifact, ClusterMember.position)
                    .join(ClusterMember, ClusterMember.cluster_id == Cluster.id)
                    .where(ClusterMember.patch_id == patch_id))]
    return dict(patch_json(row), run=row.run_id, feature_row=row.feature_row,
                label_name=row.label_name, clusters=clusters)


# --- nearest neighbours --------------------------------------------------------------------------
class _LoadedIndexes:
    """The last few runs' FAISS indexes and feature arrays, kept loaded in this process (an
    LRU keyed by file and modification time, so a re-mined run is read again)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, run_dir: Path):
        index_file, features_file = run_dir / "index.faiss", run_dir / "features.npy"
        key = (str(run_dir), index_file.stat().st_mtime_ns, features_file.stat().st_mtime_ns)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        from app.vector_index import load_index  # faiss + numpy only

        loaded = (load_index(index_file), np.load(features_file, mmap_mode="r"))
        with self.lock:
            self.items[key] = loaded
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return loaded


INDEXES = _LoadedIndexes()


def similar_patches(settings: Settings, session: Session, *, patch: dict, k: int = SIMILAR_K,
                    label_id: int | None = None) -> list[dict]:
    """The k patches of the run whose DIFT features are closest to this patch's (cosine),
    optionally only among one label's patches; the patch itself is left out."""
    from app.vector_index import search

    if patch.get("feature_row") is None:
        return []
    run_dir = settings.runs_dir / str(patch["run"])
    if not (run_dir / "index.faiss").is_file():
        return []
    index, features = INDEXES.get(run_dir)
    query = np.asarray(features[patch["feature_row"]], dtype=np.float32)
    allowed = None
    if label_id is not None:
        allowed = np.array(session.scalars(select(Patch.feature_row).where(
            Patch.run_id == patch["run"], Patch.label_id == label_id,
            Patch.feature_row.is_not(None))).all(), dtype=np.int64)
    scores, rows = search(index, query, k + 1, allowed)
    found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0])
             if r >= 0 and r != patch["feature_row"]][:k]
    if not found:
        return []
    by_row = {r.feature_row: r for r in session.execute(
        select(*_PATCH_COLUMNS, Patch.feature_row, Label.name.label("label_name"))
        .join(Label, Label.id == Patch.label_id)
        .where(Patch.run_id == patch["run"], Patch.feature_row.in_([r for r, _ in found])))}
    return [dict(patch_json(by_row[r]), label_name=by_row[r].label_name, similarity=s)
            for r, s in found if r in by_row]


# --- crops ---------------------------------------------------------------------------------------
def crop_file(settings: Settings, session: Session, *, patch_id: int) -> Path | None:
    """The patch's crop: the mining job's file, or (for a run mined before its crops stage)
    cut from the original image once and kept under the same name."""
    row = session.execute(select(Patch.run_id, Patch.crop_path, Patch.x0, Patch.y0, Patch.x1,
                                 Patch.y1, Patch.image_id, Image.sha256)
                          .join(Image, Image.id == Patch.image_id).where(Patch.id == patch_id)).first()
    if row is None:
        return None
    relative = row.crop_path or crop_path(row.run_id, row.sha256, (row.x0, row.y0, row.x1, row.y1))
    target = settings.home_dir / relative
    if target.is_file():
        return target
    from PIL import Image as PILImage

    from app.ingest.images import to_rgb

    source = stored_file(settings, session, image_id=row.image_id)  # never outside its folder
    if source is None:
        return None
    with PILImage.open(source) as image:
        save_crop(to_rgb(image), (row.x0, row.y0, row.x1, row.y1), target)
    return target
