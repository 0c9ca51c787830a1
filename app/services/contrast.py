"""Label contrast: the patches typical of label A under A but not under B.

A run scored under every label (all_labels) keeps each image's typicality map under every label;
the mining job reads every patch's box from those maps (worker/handlers/run_views.py), so T(x|L)
is stored for every patch x and label L (app/run_files.py). A's patches are ranked here by
T(x|A) - T(x|B): what the label A explains in them that the label B does not. This is a read of
stored numbers (one row per patch of A); no model runs in the web process.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import run_files
from app.models import Patch
from app.services.galleries import _PATCH_COLUMNS, patch_json

CONTRAST_PATCHES = 14


def unavailable(run: dict) -> str | None:
    """Why the run has no per-label patch scores, or None when it has them."""
    if not (run["params"] or {}).get("all_labels"):
        return ("Label contrast needs every image scored under every label: score the run with "
                "--all-labels (\"Score every image under every label\" on the dataset page).")
    if "label_scores" not in run["stages_done"]:
        if run["status"] == "ready":
            return "This run was mined before label contrast existed: mine it again to compute it."
        return "Label contrast is computed when the run is mined."
    return None


def label_contrast(session: Session, run_dir: Path, *, run: dict, label_id: int, against: int,
                   offset: int = 0, limit: int = CONTRAST_PATCHES) -> dict:
    """`label_id`'s patches by T(x|label) - T(x|against), highest first, with both scores."""
    out = {"label": label_id, "against": against, "patches": [], "offset": offset, "next_offset": None}
    reason = unavailable(run)
    stored = None if reason else run_files.read_label_scores(run_dir)
    if stored is None:
        return dict(out, available=False, reason=reason or "The run's label scores are missing.")
    scores, columns = stored
    if label_id not in columns or against not in columns:
        return dict(out, available=False, reason="These labels are not among the run's labels.")
    rows = session.execute(select(*_PATCH_COLUMNS, Patch.feature_row)
                           .where(Patch.run_id == run["id"], Patch.label_id == label_id,
                                  Patch.feature_row.is_not(None))).all()
    if not rows:
        return dict(out, available=True, reason=None)
    feature_rows = np.array([r.feature_row for r in rows])
    order = np.argsort(feature_rows)  # a memory map reads sorted rows in one pass
    under = np.empty((len(rows), 2), dtype=np.float32)
    under[order] = scores[feature_rows[order]][:, [columns.index(label_id), columns.index(against)]]
    contrast = under[:, 0] - under[:, 1]
    ranked = sorted(range(len(rows)), key=lambda i: (-contrast[i], rows[i].patch_id))
    page = ranked[offset:offset + limit]
    patches = [dict(patch_json(rows[i]), under_label=float(under[i, 0]), under_against=float(under[i, 1]),
                    contrast=float(contrast[i])) for i in page]
    more = offset + limit < len(ranked)
    return dict(out, available=True, reason=None, patches=patches,
                next_offset=offset + limit if more else None)
