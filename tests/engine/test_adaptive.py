"""Adaptive draws: box bounds as the mining sees the boxes, and which rows stay open."""
import numpy as np
import pytest
import torch

from worker.engine.adaptive import box_bounds, extend, kth_largest, open_rows
from worker.engine.patches import patch_scores, top_boxes
from worker.engine.presets import ADAPTIVE, PAPER, get_preset


def test_box_bounds_are_the_mined_boxes_with_their_spread_over_draws():
    g = torch.Generator().manual_seed(0)
    draw_maps = torch.randn(2, 10, 16, 16, generator=g) + torch.linspace(0, 3, 16)  # [rows, draws, h, w]
    bounds = box_bounds(draw_maps.mean(dim=1), draw_maps, [10, 10], shorter_side=32, patch_size=6, per_image=3)
    for row, (scores, errors) in zip(draw_maps, bounds):
        grid = patch_scores(row.mean(dim=0), 32, 6)
        boxes = top_boxes(grid, 6, 3)
        np.testing.assert_allclose(scores, [b.score for b in boxes], atol=1e-5)
        first = boxes[0]
        per_draw = patch_scores(row, 32, 6)[:, first.y0, first.x0]
        assert errors[0] == pytest.approx(float(per_draw.std() / 10 ** 0.5), rel=1e-5)
    same = box_bounds(torch.ones(1, 8, 8), torch.ones(1, 4, 8, 8), [4], shorter_side=8, patch_size=4, per_image=2)[0]
    assert (same[1] == 0).all()
    # A later stage: the boxes of the mean over all draws, the spread of this stage's draws over
    # the root of all of them.
    later = box_bounds(draw_maps[:1].mean(dim=1), draw_maps[:1, 6:], [10], shorter_side=32, patch_size=6,
                       per_image=1)[0]
    box = top_boxes(patch_scores(draw_maps[0].mean(dim=0), 32, 6), 6, 1)[0]
    assert later[0, 0] == pytest.approx(box.score, abs=1e-6)
    assert later[1, 0] == pytest.approx(float(patch_scores(draw_maps[0, 6:], 32, 6)[:, box.y0, box.x0].std())
                                        / 10 ** 0.5, rel=1e-5)


def test_a_stage_extends_the_earlier_draws():
    g = torch.Generator().manual_seed(1)
    draws = torch.randn(10, 4, 4, generator=g)
    total, differences = extend(None, None, draws[:4].mean(dim=0), draws[:4].mean(dim=(1, 2)))
    total, differences = extend(total, differences, draws[4:].mean(dim=0), draws[4:].mean(dim=(1, 2)))
    torch.testing.assert_close(total / 10, draws.mean(dim=0))
    torch.testing.assert_close(differences, draws.mean(dim=(1, 2)))


def rows_of(label, *boxes):
    """Bounds of a row from its boxes' (score, stderr)."""
    return (label, np.array(boxes, dtype=float).T)


def test_a_row_stays_open_while_its_best_box_may_reach_the_labels_top_k():
    rows = {
        "a": rows_of(1, (10, 0.1), (9, 0.1)),
        "b": rows_of(1, (8, 0.1), (7.9, 0.1)),
        "near": rows_of(1, (7.0, 0.5)),  # upper bound 8.5, under the bar
        "close": rows_of(1, (8.6, 0.1)),  # upper 8.9 >= bar 8.7
        "far": rows_of(1, (1, 0.5)),
        "other label": rows_of(2, (0, 0.1)),  # alone under K boxes: always open
    }
    # Lower bounds (z = 3) of label 1's boxes: 9.7, 8.7, 7.7, 7.6, 5.5, 8.3, -0.5; K = 2: the bar is 8.7.
    assert open_rows(rows, per_label=2, confidence=3) == {"a", "close", "other label"}
    # A wider confidence lowers the bar and widens every upper bound.
    assert open_rows(rows, per_label=2, confidence=10) == {"a", "b", "near", "close", "other label"}
    assert kth_largest(np.array([3.0, 1.0, 2.0]), 2) == 2.0 and kth_largest(np.array([1.0]), 2) == -np.inf


def test_the_adaptive_preset_ends_at_the_papers_draws():
    assert get_preset("adaptive") is ADAPTIVE
    assert ADAPTIVE.draws == PAPER.draws and ADAPTIVE.stages[-1] == PAPER.draws
    assert (ADAPTIVE.timesteps, ADAPTIVE.t_min, ADAPTIVE.t_max) == (PAPER.timesteps, PAPER.t_min, PAPER.t_max)
    with pytest.raises(ValueError, match="stages must rise strictly"):
        ADAPTIVE.with_(stages=(36, 12, 100))
