"""Two mining stages that prepare whole-run views for the web, which only reads their files
(app/run_files.py says what they hold):

* `mine_label_scores` (all_labels runs): every patch's typicality under every label, read from
  the maps the score job kept, for the Compare page's label contrast T(x|A) - T(x|B).
* `mine_map`: the patch map, every patch placed in 2D by its DIFT features
  (worker/engine/projection.py) and its thumbnail put in a sprite atlas.

Both take the mining job's `RunInfo` (worker/handlers/mine.py) and write aside and rename, so a
killed job leaves the previous files or none.
"""
from __future__ import annotations

import os
import shutil
from collections import defaultdict

import numpy as np
from sqlalchemy import select

from app import run_files
from app.db import session_scope
from app.models import Image, ImageScore, Patch
from worker.context import JobContext

#: Images whose maps are read per query (their ImageScore rows: images x labels).
IMAGES_PER_READ = 256
#: Thumbnails in the atlases: `THUMB_PX` square cells, `ATLAS_COLUMNS` x `ATLAS_COLUMNS` per atlas
#: (1024 x 1024 px, 1,024 patches: 30 atlases for 30,000 patches).
THUMB_PX = 32
ATLAS_COLUMNS = 32


def run_features(info) -> np.ndarray:
    """The features stage's matrix (memory-mapped); no file when the run has no patches."""
    path = info.dir / "features.npy"
    return np.load(path, mmap_mode="r") if path.exists() else np.zeros((0, 1), dtype=np.float32)


# --- every patch under every label -------------------------------------------------------------
def mine_label_scores(context: JobContext, info) -> None:
    """T(x|label) of every patch for every label of the run: each image's stored maps under all
    labels go through `patch_scores`, as patch selection does with the own label's map, and
    each patch's box is read at its top-left (`Patch.score` is the column of its own label)."""
    features = run_features(info)
    label_ids = [label_id for label_id, _ in info.labels]
    target = info.dir / run_files.LABEL_SCORES
    temporary = target.with_name(target.name + ".tmp.npy")
    matrix = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32,
                                       shape=(len(features), len(label_ids)))
    matrix[:] = np.nan
    images = patches_by_image(context, info)
    image_ids = list(images)
    for start in range(0, len(image_ids), IMAGES_PER_READ):
        chunk = image_ids[start:start + IMAGES_PER_READ]
        with MapFiles(context.settings.home_dir) as files:
            for image_id, paths in map_paths(context, info, chunk).items():
                missing = [label_id for label_id in label_ids if label_id not in paths]
                if missing:
                    raise ValueError(f"image {image_id} has no map under labels {missing}: "
                                     f"score the run again with all_labels")
                maps = np.stack([files.read(paths[label_id]) for label_id in label_ids])
                for row, scores in patch_label_scores(info, maps, images[image_id]):
                    matrix[row] = scores
        context.progress(start + len(chunk), len(image_ids), "patches under every label",
                         stage="label_scores")
        context.check()
    matrix.flush()
    del matrix
    run_files.write_json(info.dir / run_files.LABEL_SCORES_META, {"labels": label_ids})
    os.replace(temporary, target)


def patches_by_image(context, info) -> dict[int, list]:
    """{image id: [(feature row, box, (width, height))]} in image order."""
    with session_scope(context.settings) as session:
        rows = session.execute(select(Patch.image_id, Patch.feature_row, Patch.x0, Patch.y0, Patch.x1,
                                      Patch.y1, Image.width, Image.height)
                               .join(Image, Image.id == Patch.image_id)
                               .where(Patch.run_id == info.run_id, Patch.feature_row.is_not(None))
                               .order_by(Patch.image_id)).all()
    images: dict[int, list] = defaultdict(list)
    for image_id, row, x0, y0, x1, y1, width, height in rows:
        images[image_id].append((row, (x0, y0, x1, y1), (width, height)))
    return images


def map_paths(context, info, image_ids: list[int]) -> dict[int, dict[int, str]]:
    """{image id: {label id: "file:key"}} of the score job's maps."""
    with session_scope(context.settings) as session:
        rows = session.execute(select(ImageScore.image_id, ImageScore.label_id, ImageScore.map_path)
                               .where(ImageScore.run_id == info.run_id,
                                      ImageScore.image_id.in_(image_ids),
                                      ImageScore.map_path.is_not(None))).all()
    paths: dict[int, dict[int, str]] = {image_id: {} for image_id in image_ids}
    for image_id, label_id, path in rows:
        paths[image_id][label_id] = path
    return paths


def patch_label_scores(info, maps: np.ndarray, patches: list) -> list[tuple[int, np.ndarray]]:
    """[(feature row, [labels] scores)] of one image's patches from its [labels, h, w] maps."""
    import torch

    from worker.engine.patches import scores_at_boxes

    scores = scores_at_boxes(torch.from_numpy(maps.astype(np.float32)), [box for _, box, _ in patches],
                             [size for _, _, size in patches], view_size=info.view.size,
                             patch_size=info.patch_size, whole=info.view.whole, multiple=info.view.multiple)
    return [(row, values.numpy()) for (row, _, _), values in zip(patches, scores)]


class MapFiles:
    """The score job's map files ("path:key"), each opened once while in use."""

    def __init__(self, home):
        self.home, self.open = home, {}

    def read(self, map_path: str) -> np.ndarray:
        path, key = map_path.rsplit(":", 1)
        if path not in self.open:
            self.open[path] = np.load(self.home / path)
        return self.open[path][key]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for data in self.open.values():
            data.close()


# --- the patch map -----------------------------------------------------------------------------
def mine_map(context: JobContext, info) -> None:
    """Lay out every patch, sort the points along a Z-order curve, cut the atlases, then point
    `current.json` at the new version and remove the older ones."""
    from worker.engine.projection import SAMPLE, layout, z_order

    features = run_features(info)
    patch_ids, label_ids = patches_by_row(context, info, len(features))
    context.progress(0, 1, "laying out the patch map", stage="map")
    positions = layout(features, seed=info.seed)
    order = np.argsort(z_order(positions[:, 0], positions[:, 1]), kind="stable")
    points = np.zeros(len(order), dtype=run_files.POINT)
    points["patch"], points["label"] = patch_ids[order], label_ids[order]
    points["x"], points["y"] = positions[order, 0], positions[order, 1]
    version = run_files.map_version(points)
    folder = run_files.map_folder(info.dir)
    target = folder / version
    building = folder / f"{version}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    points.tofile(building / run_files.POINTS)
    write_atlases(context, info, points["patch"], building)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(building, target)
    per_atlas = ATLAS_COLUMNS * ATLAS_COLUMNS
    run_files.write_json(folder / run_files.MAP_META, {
        "version": version, "count": len(points), "thumb": THUMB_PX, "columns": ATLAS_COLUMNS,
        "per_atlas": per_atlas, "atlases": -(-len(points) // per_atlas),
        "projection": f"t-SNE of {min(len(points), SAMPLE):,} patches (PCA to 50 dimensions first), "
                      f"the others placed among their nearest sampled neighbours",
        "seed": info.seed})
    for old in folder.iterdir():
        if old.is_dir() and old.name != version:
            shutil.rmtree(old, ignore_errors=True)


def patches_by_row(context, info, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(patch id, label id) per feature row, read from the database in chunks."""
    patch_ids = np.zeros(rows, dtype=np.uint32)
    label_ids = np.zeros(rows, dtype=np.uint32)
    with session_scope(context.settings) as session:
        result = session.execute(select(Patch.feature_row, Patch.id, Patch.label_id)
                                 .where(Patch.run_id == info.run_id, Patch.feature_row.is_not(None)))
        for chunk in result.partitions(65536):
            values = np.array(chunk, dtype=np.int64).reshape(-1, 3)
            patch_ids[values[:, 0]], label_ids[values[:, 0]] = values[:, 1], values[:, 2]
    return patch_ids, label_ids


def write_atlases(context, info, patch_ids: np.ndarray, folder) -> None:
    """Each patch's crop as a `THUMB_PX` thumbnail in atlas order (see app/run_files.py)."""
    from PIL import Image as PILImage

    per_atlas = ATLAS_COLUMNS * ATLAS_COLUMNS
    atlases = -(-len(patch_ids) // per_atlas)
    context.progress(0, atlases, "patch map thumbnails", stage="map")
    for number in range(atlases):
        ids = [int(i) for i in patch_ids[number * per_atlas:(number + 1) * per_atlas]]
        with session_scope(context.settings) as session:
            crops = dict(session.execute(select(Patch.id, Patch.crop_path).where(Patch.id.in_(ids))).all())
        rows = -(-len(ids) // ATLAS_COLUMNS)
        atlas = PILImage.new("RGBA", (ATLAS_COLUMNS * THUMB_PX, rows * THUMB_PX), (0, 0, 0, 0))
        for cell, patch_id in enumerate(ids):
            if crops.get(patch_id):
                with PILImage.open(context.settings.home_dir / crops[patch_id]) as crop:
                    thumb = thumbnail(crop.convert("RGBA"))
                left = cell % ATLAS_COLUMNS * THUMB_PX + (THUMB_PX - thumb.width) // 2
                top = cell // ATLAS_COLUMNS * THUMB_PX + (THUMB_PX - thumb.height) // 2
                atlas.paste(thumb, (left, top))
        atlas.save(folder / run_files.atlas_name(number), optimize=False)
        context.progress(number + 1, atlases, "patch map thumbnails", stage="map")
        context.check()


def thumbnail(crop):
    """A crop fitted into the cell: small crops enlarged by whole pixels (they are pixel art at
    model size), large ones shrunk smoothly."""
    from PIL import Image as PILImage

    largest = max(crop.size)
    if largest <= THUMB_PX:
        factor = THUMB_PX // largest
        return crop.resize((crop.width * factor, crop.height * factor), PILImage.Resampling.NEAREST)
    scale = THUMB_PX / largest
    return crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                       PILImage.Resampling.LANCZOS)
