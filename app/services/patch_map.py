"""A run's patch map, as the mining job laid it out (app/run_files.py): what the page needs to
draw it, and pages of its points with their labels and thumbnails for the JSON twin.

Nothing is computed here: positions, atlases and their order come from the worker. A page of
points reads only its records from the points file (a label filter scans the file in chunks).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import run_files
from app.models import Patch

POINTS_PER_PAGE = 5000
MAX_POINTS_PER_PAGE = 20000
SCAN_CHUNK = 65536
#: The golden angle: consecutive labels get hues far apart, for any number of labels.
GOLDEN_ANGLE = 137.508


def label_colour(position: int) -> str:
    return f"hsl({position * GOLDEN_ANGLE % 360:.1f}, 70%, 45%)"


def map_overview(session: Session, run_dir: Path, *, run: dict, labels: list[dict]) -> dict:
    """Whether the run has a map (and why not), its geometry and URLs, and the labels with their
    colours and patch counts, in label order."""
    counts = dict(session.execute(select(Patch.label_id, func.count()).where(Patch.run_id == run["id"])
                                  .group_by(Patch.label_id)).all())
    coloured = [dict(label, colour=label_colour(i), patches=counts.get(label["id"], 0))
                for i, label in enumerate(labels)]
    meta = run_files.read_map_meta(run_dir) if "map" in run["stages_done"] else None
    if meta is None:
        reason = ("This run was mined before patch maps existed: mine it again to lay one out."
                  if run["status"] == "ready" else "The map is laid out when the run is mined.")
        return {"available": False, "reason": reason, "labels": coloured}
    base = f"/files/runs/{run['id']}/{run_files.MAP_DIR}/{meta['version']}"
    return {"available": True, "reason": None, "labels": coloured, "count": meta["count"],
            "version": meta["version"], "projection": meta["projection"],
            "points_url": f"/runs/{run['id']}/map/points.bin?v={meta['version']}",
            "point_format": "little-endian records of 16 bytes: patch id (uint32), x, y (float32, "
                            "0-1, y down), label id (uint32); record i is atlas cell i",
            "atlas_base": base, "atlas_url": f"{base}/atlas-{{number:03d}}.png", "thumb": meta["thumb"],
            "columns": meta["columns"], "per_atlas": meta["per_atlas"], "atlases": meta["atlases"]}


def map_points(session: Session, run_dir: Path, *, overview: dict, offset: int = 0,
               limit: int = POINTS_PER_PAGE, label_id: int | None = None) -> dict:
    """Points [offset, offset + limit) in the map's order (of one label's, with `label_id`):
    patch id, label, position, thumbnail (the patch's crop, and its atlas cell)."""
    meta = {"version": overview["version"], "count": overview["count"]}
    if label_id is None:
        records = run_files.read_points(run_dir, meta, offset, limit + 1)
        numbers = np.arange(offset, offset + len(records))
    else:
        numbers, records = label_records(run_dir, meta, label_id, offset, limit + 1)
    more = len(records) > limit
    numbers, records = numbers[:limit], records[:limit]
    ids = [int(i) for i in records["patch"]]
    crops = dict(session.execute(select(Patch.id, Patch.crop_path).where(Patch.id.in_(ids))).all()) if ids else {}
    per_atlas = overview["per_atlas"]
    points = [{"patch": patch_id, "label": int(label), "x": round(float(x), 5), "y": round(float(y), 5),
               "url": f"/patches/{patch_id}",
               "thumbnail": f"/files/{crops[patch_id]}" if crops.get(patch_id) else f"/patches/{patch_id}/crop.png",
               "atlas": {"url": overview["atlas_url"].format(number=int(n) // per_atlas),
                         "cell": int(n) % per_atlas}}
              for n, patch_id, label, x, y in zip(numbers, ids, records["label"], records["x"], records["y"])]
    return {"points": points, "offset": offset, "next_offset": offset + limit if more else None,
            "label": label_id}


def label_records(run_dir: Path, meta: dict, label_id: int, offset: int, limit: int):
    """(record numbers, records) of one label's points [offset, offset + limit), by a scan."""
    numbers, found, skipped = [], [], 0
    for start in range(0, meta["count"], SCAN_CHUNK):
        chunk = run_files.read_points(run_dir, meta, start, SCAN_CHUNK)
        hits = np.flatnonzero(chunk["label"] == label_id)
        take = hits[max(0, offset - skipped):]
        skipped += len(hits) - len(take)
        numbers.append(start + take)
        found.append(chunk[take])
        if sum(len(f) for f in found) >= limit:
            break
    if not found:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=run_files.POINT)
    return np.concatenate(numbers)[:limit], np.concatenate(found)[:limit]
