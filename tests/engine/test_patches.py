"""Patch mining geometry: pooled scores, greedy non-overlapping boxes, per-label top K, coordinates."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine import data
from worker.engine.patches import (
    Box,
    box_to_model,
    box_to_original,
    default_patch_size,
    least_per_label,
    least_typical_boxes,
    patch_scores,
    random_boxes,
    random_per_label,
    score_boxes,
    top_boxes,
    top_per_label,
)


def naive_scores(diff_map: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """The definition, one window at a time."""
    up = F.interpolate(diff_map.float()[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    out = torch.empty(size - k + 1, size - k + 1, dtype=torch.float64)
    for y, x in itertools.product(range(size - k + 1), repeat=2):
        out[y, x] = up[y:y + k, x:x + k].double().mean()
    return out


def naive_greedy(scores: torch.Tensor, k: int, per_image: int, gap: int = 0) -> list[tuple[int, int]]:
    """Sort all top-lefts by score (row-major on ties), keep those not overlapping a kept one."""
    rows, cols = scores.shape
    order = sorted(itertools.product(range(rows), range(cols)), key=lambda p: (-float(scores[p]), p))
    kept: list[tuple[int, int]] = []
    for y, x in order:
        if all(abs(y - ky) >= k + gap or abs(x - kx) >= k + gap for ky, kx in kept):
            kept.append((y, x))
        if len(kept) == per_image:
            break
    return kept


def overlaps(a: Box, b: Box) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


# --- scores -------------------------------------------------------------------------------------
def test_patch_scores_equal_naive_windows():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 8, 8, generator=g)
    scores = patch_scores(maps, 20, 5)
    assert scores.shape == (2, 16, 16)
    for b in range(2):
        torch.testing.assert_close(scores[b].double(), naive_scores(maps[b], 20, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(patch_scores(maps[1], 20, 5), scores[1])  # unbatched == batched


def test_pooling_the_difference_equals_difference_of_pooled_losses():
    g = torch.Generator().manual_seed(1)
    loss_null, loss_label = torch.rand(2, 16, 16, generator=g).unbind()
    pooled_difference = patch_scores(loss_null - loss_label, 64, 12)
    difference_of_pooled = patch_scores(loss_null, 64, 12) - patch_scores(loss_label, 64, 12)
    torch.testing.assert_close(pooled_difference, difference_of_pooled, atol=1e-6, rtol=0)


def test_patch_scores_accept_float16_and_rectangular_images():
    maps = torch.randn(8, 8).half()
    scores = patch_scores(maps, (24, 40), 6)
    assert scores.dtype == torch.float32 and scores.shape == (19, 35)


@pytest.mark.parametrize("bad", [
    dict(diff_map=torch.randn(8, 8), image_size=16, patch_size=17),  # patch larger than image
    dict(diff_map=torch.randn(8, 8), image_size=16, patch_size=0),
    dict(diff_map=torch.randn(1, 1, 8, 8), image_size=16, patch_size=4),  # wrong rank
    dict(diff_map=torch.full((8, 8), float("nan")), image_size=16, patch_size=4),
])
def test_patch_scores_reject_bad_input(bad):
    with pytest.raises(ValueError):
        patch_scores(**bad)


@pytest.mark.parametrize("size, expected", [(256, 50), (512, 64), (32, 6), (64, 13), (128, 25), (16, 4),
                                            (8, 4), (384, 57), (1024, 128)])
def test_default_patch_size(size, expected):
    assert default_patch_size(size) == expected


def test_default_patch_size_rejects_tiny_images():
    with pytest.raises(ValueError):
        default_patch_size(3)


# --- boxes per image ----------------------------------------------------------------------------
@pytest.mark.parametrize("gap", [0, 1])
def test_top_boxes_match_naive_greedy(gap):
    g = torch.Generator().manual_seed(2)
    scores = patch_scores(torch.randn(8, 8, generator=g), 48, 8)
    boxes = top_boxes(scores, 8, gap=gap)
    assert [(b.y0, b.x0) for b in boxes] == naive_greedy(scores, 8, 5, gap)


def test_top_boxes_are_five_best_first_non_overlapping_with_true_scores():
    g = torch.Generator().manual_seed(3)
    scores = patch_scores(torch.randn(16, 16, generator=g), 64, 10)
    boxes = top_boxes(scores, 10)
    assert len(boxes) == 5
    assert all(b.x1 - b.x0 == b.y1 - b.y0 == 10 for b in boxes)
    assert all(0 <= b.x0 and b.x1 <= 64 and 0 <= b.y0 and b.y1 <= 64 for b in boxes)
    assert not any(overlaps(a, b) for a, b in itertools.combinations(boxes, 2))
    assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)
    assert all(b.score == pytest.approx(float(scores[b.y0, b.x0])) for b in boxes)
    assert boxes[0].score == pytest.approx(float(scores.max()))


def test_image_smaller_than_two_patches_gets_one_box():
    scores = patch_scores(torch.randn(4, 4), 12, 8)  # 5x5 top-lefts, all within 8 of each other
    assert len(top_boxes(scores, 8)) == 1


def test_image_of_exactly_two_patches_fits_four_corners():
    scores = patch_scores(torch.randn(4, 4), 16, 8)  # top-lefts 0..8: only the four corners coexist
    boxes = top_boxes(scores, 8, per_image=5)
    assert len(boxes) <= 4
    assert not any(overlaps(a, b) for a, b in itertools.combinations(boxes, 2))
    flat = torch.zeros(9, 9)  # equal scores: ties go row-major, so exactly the four corners
    assert [(b.x0, b.y0) for b in top_boxes(flat, 8)] == [(0, 0), (8, 0), (0, 8), (8, 8)]


def test_batched_boxes_equal_one_image_at_a_time():
    scores = patch_scores(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(4)), 32, 6)
    assert top_boxes(scores, 6) == [top_boxes(s, 6) for s in scores]


def test_least_typical_boxes_take_the_minima_with_true_scores():
    scores = patch_scores(torch.randn(8, 8, generator=torch.Generator().manual_seed(5)), 32, 6)
    boxes = least_typical_boxes(scores, 6)
    assert boxes[0].score == pytest.approx(float(scores.min()))
    assert [b.score for b in boxes] == sorted(b.score for b in boxes)
    assert [(b.x0, b.y0) for b in boxes] == [(b.x0, b.y0) for b in top_boxes(-scores, 6)]


def test_random_boxes_are_seeded_non_overlapping_with_true_scores():
    scores = patch_scores(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(6)), 32, 6)
    first, again = random_boxes(scores, 6, seed=7), random_boxes(scores, 6, seed=7)
    assert first == again and first != random_boxes(scores, 6, seed=8)
    for b, boxes in enumerate(first):
        assert len(boxes) == 5
        assert not any(overlaps(x, y) for x, y in itertools.combinations(boxes, 2))
        assert all(box.score == pytest.approx(float(scores[b, box.y0, box.x0])) for box in boxes)


def test_top_boxes_reject_non_finite_scores():
    with pytest.raises(ValueError):
        top_boxes(torch.tensor([[0.0, float("nan")]]), 1)


def test_score_boxes_reads_other_maps_at_the_boxes():
    scores = torch.arange(25.0).view(5, 5)
    assert score_boxes(scores, [Box(1, 2, 4, 5, 0.0), (0, 0, 3, 3)]) == [11.0, 0.0]
    with pytest.raises(ValueError):
        score_boxes(scores, [(5, 0, 8, 3)])


# --- boxes per label ----------------------------------------------------------------------------
def candidates(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(count):  # a generator: top_per_label must not need a list
        yield ("ab"[i % 2], float(rng.normal()), i)


def test_top_per_label_streams_the_k_best_of_each_label():
    result = top_per_label(candidates(500, 0), k=7)
    everything = list(candidates(500, 0))
    for label in "ab":
        expected = sorted(((s, i) for entry, s, i in everything if entry == label), reverse=True)[:7]
        assert result[label] == expected
    least = least_per_label(candidates(500, 0), k=3)
    assert least["a"] == sorted((s, i) for label, s, i in everything if label == "a")[:3]


def test_top_per_label_keeps_earlier_candidates_on_ties_and_rejects_nan():
    assert top_per_label([("a", 1.0, "first"), ("a", 1.0, "second"), ("a", 0.5, "low")], k=1) == {"a": [(1.0, "first")]}
    with pytest.raises(ValueError):
        top_per_label([("a", float("nan"), 0)])


def test_random_per_label_is_a_seeded_sample():
    first = random_per_label(candidates(300, 1), k=10, seed=3)
    assert first == random_per_label(candidates(300, 1), k=10, seed=3)
    assert first != random_per_label(candidates(300, 1), k=10, seed=4)
    everything = {i: (label, s) for label, s, i in candidates(300, 1)}
    for label, kept in first.items():
        assert len(kept) == 10 and len({i for _, i in kept}) == 10
        assert all(everything[i] == (label, s) for s, i in kept)  # true scores carried through


# --- coordinates --------------------------------------------------------------------------------
@pytest.mark.parametrize("original", [(90, 60), (60, 90), (64, 64), (301, 97)])
def test_box_to_original_finds_the_region_through_the_real_pipeline(original):
    """Paint a rectangle in the original, run data.py's resize + center crop, find it in the model
    image, map that box back: it must land on the painted rectangle (to a pixel of resampling)."""
    width, height = original
    resolution = 32
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0 = width // 2 - width // 8, height // 2 - height // 8
    x1, y1 = width // 2 + width // 8, height // 2 + height // 8
    pixels[y0:y1, x0:x1] = 255
    resized = data.resize_shorter_side(Image.fromarray(pixels), resolution)
    left, top = (resized.width - resolution) // 2, (resized.height - resolution) // 2  # ImageDataset(train=False)
    model = np.asarray(resized.crop((left, top, left + resolution, top + resolution)))[..., 0] > 127
    rows, cols = np.nonzero(model)
    found = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    mapped = box_to_original(found, resolution, original)
    scale = max(width, height) / resolution  # one model pixel, in original pixels
    assert np.allclose(mapped, (x0, y0, x1, y1), atol=1.5 * scale)


@pytest.mark.parametrize("original", [(90, 60), (60, 90), (301, 97)])
@pytest.mark.parametrize("size, multiple", [(32, 1), (64, 64)])  # pixel models; Stable Diffusion
def test_the_whole_view_maps_a_region_at_the_edge_back(original, size, multiple):
    """The whole view (no crop): a rectangle at the right edge, which the centre crop would cut
    away, is found in the model image and maps back onto itself, also where the sides were
    rounded to 64 px (301 x 97 at 64 px is 199 x 64 exactly, 192 x 64 rounded)."""
    width, height = original
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = width - width // 6, height // 3, width, height // 2
    pixels[y0:y1, x0:x1] = 255
    view = data.View(size=size, multiple=multiple)
    model = view.load_pil(Image.fromarray(pixels))
    assert model.shape[1:] == view.shape_of(original)
    assert model.shape[1] % multiple == 0 and model.shape[2] % multiple == 0
    rows, cols = np.nonzero(model[0].numpy() > 0)
    found = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    mapped = box_to_original(found, size, original, whole=True, multiple=multiple)
    scale = min(width, height) / size
    assert np.allclose(mapped, (x0, y0, x1, y1), atol=1.5 * scale)
    assert np.allclose(box_to_model(mapped, size, original, whole=True, multiple=multiple), found)


def test_box_to_model_inverts_box_to_original():
    box = Box(3, 5, 13, 15, 0.25)
    for original in [(90, 60), (60, 90), (1000, 333), (32, 32)]:
        there = box_to_original(box, 32, original)
        assert there[4] == 0.25  # the score passes through
        assert np.allclose(box_to_model(there, 32, original), box)


def test_box_to_original_of_the_whole_model_image_is_the_center_crop():
    x0, y0, x1, y1 = box_to_original((0, 0, 32, 32), 32, (96, 64))  # resized to 48x32, crop from x=8
    assert (x0, y0, x1, y1) == pytest.approx((16.0, 0.0, 80.0, 64.0))


@pytest.mark.parametrize("original, size, whole, multiple", [
    *[(original, 32, False, 1) for original in [(28, 28), (72, 72), (100, 60), (33, 500)]],
    # Stable Diffusion's whole view, sides rounded to 64 px (originals at least the view's size:
    # far smaller ones map several model boxes onto one stored box)
    *[(original, 64, True, 64) for original in [(72, 72), (100, 66), (301, 97), (70, 500)]]])
def test_model_top_left_recovers_the_grid_position_of_a_stored_box(original, size, whole, multiple):
    import math

    from worker.engine.patches import box_to_original, model_top_left

    k = 6
    height, width = data.View(size, whole=whole, multiple=multiple).shape_of(original)
    for x in range(0, width - k + 1, 3):
        for y in range(0, height - k + 1, 5):
            x0, y0, x1, y1 = box_to_original((x, y, x + k, y + k), size, original, whole=whole, multiple=multiple)
            stored = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
            assert model_top_left(stored, size, original, k, whole=whole, multiple=multiple) == (x, y), \
                (x, y, stored)
