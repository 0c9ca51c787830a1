"""How much two mining runs agree, on what a user sees (issue 15): small functions over plain data.

* `spearman`: rank correlation of the image scores;
* `same_top_patch`: the share of maps whose best k x k box has the same top-left;
* `top_k_overlap`: the share of each label's top-K patches that the other run also mined
  (same image, boxes overlapping by IoU >= 0.5, matched one to one), K the run's per-label count;
* `cluster_agreement`: the adjusted Rand index of cluster membership over the patches both runs
  mined (the matched pairs), per label, weighted by the pairs.

A comparison means something only between runs whose draws are independent (another seed, or
another preset: worker/engine/streams.py); `paper` at seed 0 against `paper` at seed 1 is the floor.
Patches are dicts with image, label, box (x0, y0, x1, y1) and cluster (None: in no cluster).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: two boxes of one image are the same patch when they overlap at least this much
SAME_PATCH_IOU = 0.5


def spearman(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    ranks = torch.stack([a.argsort().argsort().double(), b.argsort().argsort().double()])
    return float(torch.corrcoef(ranks)[0, 1])


def top_patches(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """Flat index of each map's best patch: k x k average pool, stride 1, no padding (docs/method.md section 3)."""
    return F.avg_pool2d(maps[:, None].float(), patch, stride=1).flatten(1).argmax(dim=1)


def same_top_patch(maps_a: torch.Tensor, maps_b: torch.Tensor, patch: int) -> float:
    return float((top_patches(maps_a, patch) == top_patches(maps_b, patch)).float().mean())


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def matched_patches(patches_a: list[dict], patches_b: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs (a, b) of one label and one image whose boxes overlap by >= SAME_PATCH_IOU, one to
    one, the most overlapping first."""
    by_key = defaultdict(lambda: ([], []))
    for side, patches in enumerate((patches_a, patches_b)):
        for patch in patches:
            by_key[(patch["label"], patch["image"])][side].append(patch)
    pairs = []
    for side_a, side_b in by_key.values():
        candidates = sorted(((iou(a["box"], b["box"]), i, j) for i, a in enumerate(side_a)
                             for j, b in enumerate(side_b)), reverse=True)
        used_a, used_b = set(), set()
        for overlap, i, j in candidates:
            if overlap >= SAME_PATCH_IOU and i not in used_a and j not in used_b:
                used_a.add(i)
                used_b.add(j)
                pairs.append((side_a[i], side_b[j]))
    return pairs


def top_k_overlap(patches_a: list[dict], patches_b: list[dict]) -> float:
    """Mean over labels of |matched| / K, K the larger of the two runs' patch counts of the label."""
    counts_a, counts_b = _per_label_counts(patches_a), _per_label_counts(patches_b)
    matched = _per_label_counts([a for a, _ in matched_patches(patches_a, patches_b)])
    labels = sorted(set(counts_a) | set(counts_b))
    return float(np.mean([matched.get(label, 0) / max(counts_a.get(label, 0), counts_b.get(label, 0))
                          for label in labels]))


def cluster_agreement(patches_a: list[dict], patches_b: list[dict]) -> float:
    """Adjusted Rand index of the two runs' clusterings over their shared patches, per label,
    weighted by the number of shared patches (a patch in no cluster counts as its own group)."""
    from sklearn.metrics import adjusted_rand_score

    per_label = defaultdict(list)
    for a, b in matched_patches(patches_a, patches_b):
        per_label[a["label"]].append((_cluster(a), _cluster(b)))
    total = sum(len(pairs) for pairs in per_label.values())
    if total == 0:
        return float("nan")
    return float(sum(len(pairs) * adjusted_rand_score([x for x, _ in pairs], [y for _, y in pairs])
                     for pairs in per_label.values() if len(pairs) > 1) / total)


def _per_label_counts(patches: list[dict]) -> dict:
    counts: dict = defaultdict(int)
    for patch in patches:
        counts[patch["label"]] += 1
    return counts


def _cluster(patch: dict):
    return patch["cluster"] if patch["cluster"] is not None else ("alone", patch["image"], tuple(patch["box"]))
