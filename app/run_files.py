"""Files a mining run writes beside its FAISS index for the web to read: the patch map and every
patch's typicality under every label. The worker writes them (worker/handlers/run_views.py), the
services read them; this module is the one place that knows their names and layout.

The patch map (`runs/<run>/map/`):

* `<version>/points.bin`: one 16-byte little-endian record per patch (`POINT`: patch id, x, y in
  [0, 1], label id), in atlas order: record i's thumbnail is cell `i % per_atlas` of atlas
  `i // per_atlas`. Records are sorted along a Z-order curve of their position, so a zoomed-in
  view needs the few atlases of its neighbourhood, not all of them.
* `<version>/atlas-NNN.png`: `columns` x `columns` thumbnails of `thumb` px each.
* `current.json`: the meta data (count, version, thumbnail geometry, how it was projected),
  written last. `version` is a hash of the points, so an atlas's URL changes when its content
  does and browsers may keep it forever (/files serves it with immutable cache headers).

Gallery crops (`runs/<run>/crops/`): named by what they show (the image's content hash and the
box), never by patch id: ids can come back when a run is mined again, and a browser that cached
an old crop under a reused name would keep showing it.

Label scores (`runs/<run>/label_scores.npy`, all_labels runs only): float32 [feature rows,
labels], row r for the patch whose `Patch.feature_row` is r, columns in the order of
`label_scores.json`'s `labels` (label ids). Read with mmap: a query reads its rows only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

POINT = np.dtype([("patch", "<u4"), ("x", "<f4"), ("y", "<f4"), ("label", "<u4")])
MAP_DIR = "map"
MAP_META = "current.json"
POINTS = "points.bin"
LABEL_SCORES = "label_scores.npy"
LABEL_SCORES_META = "label_scores.json"


def crop_path(run_id: int, image_sha256: str, box: tuple[int, int, int, int]) -> str:
    """The home-relative path of a patch's gallery crop (see the module docstring)."""
    return f"runs/{run_id}/crops/{image_sha256[:20]}-{'-'.join(str(int(v)) for v in box)}.png"


#: the longer side of a gallery crop, px
CROP_PX = 96


def save_crop(image, box: tuple[int, int, int, int], target: Path) -> None:
    """Cut `box` from an RGB PIL image, shrink it to at most CROP_PX, and write it to `target`
    aside and renamed: the worker's crops stage and the web's on-demand crop can write one name
    at once, and /files serves it as immutable, so no reader may see half a file."""
    from PIL import Image

    crop = image.crop(box)
    if max(crop.size) > CROP_PX:
        crop.thumbnail((CROP_PX, CROP_PX), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(f".{os.getpid()}.tmp")
    crop.save(temporary, format="PNG")
    os.replace(temporary, target)


def map_folder(run_dir: Path) -> Path:
    return run_dir / MAP_DIR


def atlas_name(number: int) -> str:
    return f"atlas-{number:03d}.png"


def write_json(path: Path, value: dict) -> None:
    """Written aside and renamed: a reader sees the old file or the new one, never half."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def map_version(points: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(points, dtype=POINT).tobytes()).hexdigest()[:12]


def read_map_meta(run_dir: Path) -> dict | None:
    """The current map's meta data, or None when the run has no map."""
    try:
        return json.loads((map_folder(run_dir) / MAP_META).read_text())
    except FileNotFoundError:
        return None


def points_file(run_dir: Path, meta: dict) -> Path:
    return map_folder(run_dir) / meta["version"] / POINTS


def read_points(run_dir: Path, meta: dict, offset: int = 0, limit: int | None = None) -> np.ndarray:
    """Records [offset, offset + limit) of the current map (only those are read)."""
    offset = min(max(offset, 0), meta["count"])
    count = meta["count"] - offset if limit is None else max(0, min(limit, meta["count"] - offset))
    return np.fromfile(points_file(run_dir, meta), dtype=POINT, count=count,
                       offset=offset * POINT.itemsize)


def read_label_scores(run_dir: Path) -> tuple[np.ndarray, list[int]] | None:
    """(memory-mapped [feature rows, labels] scores, label id of each column), or None."""
    try:
        labels = json.loads((run_dir / LABEL_SCORES_META).read_text())["labels"]
        return np.load(run_dir / LABEL_SCORES, mmap_mode="r"), labels
    except FileNotFoundError:
        return None
