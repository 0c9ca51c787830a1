"""Adaptive draws: the paper's draws where they decide what is mined, a few elsewhere.

What a run shows is each label's top K patches, taken from every image's best boxes
(docs/method.md section 3), not every image's score. An image row (image, label) matters only
if one of its boxes can reach its label's top K. So every row is scored with a few draws of the
preset's sequence (`TypicalityPreset.stages`), and goes on to the next stage, more draws of the
same sequence, while its place is uncertain:

* each row's top boxes get a score and a standard error from the per-draw values of the box
  (`box_bounds`; the stage's own draws estimate the spread, divided by the root of all draws);
* a label's bar is the K-th largest lower bound (score - z stderr) over all of its rows' boxes:
  if the bounds hold, at least K boxes truly score above it, so the true K-th best does too;
* a row stays open while the upper bound of its best box (best score + z x its largest box
  stderr) reaches the bar (`open_rows`). A closed row's boxes are, within the bounds, all
  below the label's K-th best: it cannot be mined.

A later stage scores only the draws the row has not had yet and adds them to its earlier ones
(`extend`: the map is the mean over all of them), so a row open to the end costs the paper's N
draws. The last stage is the paper's draws, so every row that can be mined ends with the paper's
N draws: its map and its top boxes are paper-quality. The bar is recomputed after each stage
from every row's latest bounds; a row closed earlier that a later bar reopens is scored at N
too (the score job loops until no open row has fewer than N draws).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from .patches import image_shape_of, patch_scores, top_boxes

#: the boxes of a row kept for its bounds (the mining's own per-image count is passed in)
Bounds = np.ndarray  # [2, P]: row 0 the scores of the row's top boxes, row 1 their standard errors


def box_bounds(mean_maps: torch.Tensor, draw_maps: torch.Tensor, total_draws: Sequence[int], shorter_side: int,
               patch_size: int, per_image: int) -> list[Bounds]:
    """Scores and standard errors of each row's top boxes: the boxes the mine job would take
    from the row's mean map [R, h, w] (upsampled to the image at `shorter_side`, k x k
    average-pooled, greedy), their spread over the draws of `draw_maps` [R, n, h, w] (this stage's
    draws: n of the row's `total_draws`), the same i.i.d. formula as the image score's."""
    bounds = []
    for mean, maps, total in zip(mean_maps, draw_maps, total_draws):  # one row at a time: N pooled maps are big
        shape = image_shape_of(mean.shape[-2:], shorter_side)
        boxes = top_boxes(patch_scores(mean, shape, patch_size), patch_size, per_image)
        per_draw = patch_scores(maps, shape, patch_size)  # [n, Hs, Ws]
        values = torch.stack([per_draw[:, box.y0, box.x0] for box in boxes], dim=1)  # [n, P]
        scores = torch.tensor([box.score for box in boxes])
        errors = values.std(dim=0) / total ** 0.5
        bounds.append(torch.stack([scores, errors]).numpy().astype(np.float64))
    return bounds


def extend(prior_sum: torch.Tensor | None, prior_differences: torch.Tensor | None, maps: torch.Tensor,
           differences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's map sum and per-draw differences after a stage that scored `differences` [n] more
    draws with mean map `maps` [h, w], on top of the earlier stages' (None: the first stage)."""
    total = maps * len(differences)
    if prior_sum is None:
        return total, differences
    return prior_sum + total, torch.cat([prior_differences, differences])


def open_rows(rows: dict[Hashable, tuple[Hashable, Bounds]], per_label: int, confidence: float) -> set:
    """The rows whose best box may still reach their label's top `per_label` boxes.

    `rows`: row key -> (label, bounds). A label with fewer than `per_label` boxes in all keeps
    every row open: all of its boxes are mined."""
    lower: dict[Hashable, list[np.ndarray]] = defaultdict(list)
    for label, (scores, errors) in rows.values():
        lower[label].append(scores - confidence * errors)
    bars = {label: kth_largest(np.concatenate(values), per_label) for label, values in lower.items()}
    return {key for key, (label, (scores, errors)) in rows.items()
            if scores.size == 0 or scores.max() + confidence * errors.max() >= bars[label]}


def kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest value, or -inf when there are fewer than k."""
    if len(values) < k:
        return float("-inf")
    return float(np.partition(values, len(values) - k)[len(values) - k])


def next_stage_draws(stages: Sequence[int], stage: int) -> int:
    """Draws of stage `stage` (0-based); after the last, the catch-up stages use the last's."""
    return stages[min(stage, len(stages) - 1)]
