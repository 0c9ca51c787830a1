"""Patch mining: from a typicality map to the most typical k x k boxes (docs/method.md section 3).

Pipeline, per image::

    scores = patch_scores(diff_map, image_size, patch_size)   # every box's mean typicality
    boxes = top_boxes(scores, patch_size, per_image=5)        # greedy, non-overlapping

then, per label, over a stream of all its images' boxes::

    best = top_per_label((label, box.score, (image_id, box)) for ...)   # K = 1000 best

Coordinates. Boxes are `Box(x0, y0, x1, y1, score)` in pixels of the *model-resolution* image
(the center crop that was scored, see `box_to_original`), half-open: columns x0 <= x < x1 and
rows y0 <= y < y1, so x1 - x0 == y1 - y0 == patch_size. `scores[..., y, x]` is the score of the
box whose top-left corner is (x, y).

Linearity. The paper scores a box as pooled(L_null) - pooled(L_c), each loss averaged over draws
and channels, upsampled, then average-pooled. Averaging, bilinear upsampling and average pooling
are all linear maps, so that equals pooled(L_null - L_c): pooling the single mean difference map
that `typicality` stores gives the paper's scores exactly (up to float rounding), and the
per-condition maps never need to be kept.

Baselines. `least_typical_boxes` (the "-T" ranking) and `random_boxes` run the same greedy
selection as `top_boxes` with a different priority (-score, or a random field), and all three
report each box's true typicality score; `least_per_label` and `random_per_label` do the same
for the per-label top K. Only the priority changes, so a baseline differs from the method in
nothing but the ranking.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import resized_size

#: The paper's patch sizes: 50 px boxes for 256 px images (cars, faces), 64 px for 512 px ones.
PAPER_PATCH_SIZES = {256: 50, 512: 64}
#: The smallest patch `default_patch_size` returns: smaller boxes hold too little to cluster.
MIN_PATCH_SIZE = 4
#: Patches the paper keeps per image, and per label.
PER_IMAGE = 5
PER_LABEL = 1000


class Box(NamedTuple):
    """A k x k box in model-resolution pixels, half-open, with its typicality score."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float


# --- sizes --------------------------------------------------------------------------------------
def default_patch_size(image_size: int) -> int:
    """The box side k for square images of `image_size` px.

    The paper uses k = 50 at 256 px and k = 64 at 512 px (not proportional: relatively smaller
    boxes on the larger street-view/scene images). Other sizes:

    * below 256 px: scale the 256 px ratio, k = round(50 / 256 * size), at least `MIN_PATCH_SIZE`
      (32 px -> 6, 64 px -> 13, 128 px -> 25);
    * between 256 and 512 px: interpolate linearly between 50 and 64;
    * above 512 px: scale the 512 px ratio, k = round(64 / 512 * size) (1024 px -> 128).

    Rounding is half-up (12.5 -> 13), not Python's half-to-even.
    """
    if image_size < MIN_PATCH_SIZE:
        raise ValueError(f"images of {image_size} px are smaller than the minimum patch ({MIN_PATCH_SIZE} px)")
    (small, small_k), (large, large_k) = sorted(PAPER_PATCH_SIZES.items())
    if image_size <= small:
        size = small_k / small * image_size
    elif image_size <= large:
        size = small_k + (large_k - small_k) * (image_size - small) / (large - small)
    else:
        size = large_k / large * image_size
    return max(MIN_PATCH_SIZE, math.floor(size + 0.5))


def _height_width(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def image_shape_of(map_shape: Sequence[int], shorter_side: int) -> tuple[int, int]:
    """(H, W) of the image a [h, w] map was computed on, when that image's shorter side is
    `shorter_side`: the map itself for pixel models, 8x it for Stable Diffusion's latents."""
    height, width = int(map_shape[0]), int(map_shape[1])
    scale = shorter_side / min(height, width)
    return max(shorter_side, round(height * scale)), max(shorter_side, round(width * scale))


# --- scores -------------------------------------------------------------------------------------
def patch_scores(diff_map: torch.Tensor, image_size: int | Sequence[int], patch_size: int) -> torch.Tensor:
    """Mean typicality of every k x k box: [h', w'] or [B, h', w'] -> [H-k+1, W-k+1] (or [B, ...]).

    `diff_map` is the mean difference map L_null - L_c at model resolution (any float dtype;
    float16 maps are computed in float32). It is upsampled bilinearly to `image_size` (an int for
    square images, or (H, W)), then average-pooled with a k x k window, stride 1, no padding, so
    `result[..., y, x]` is the mean over the box with top-left (x, y). See the module docstring
    for why pooling the difference equals the paper's pooled(L_null) - pooled(L_c).
    """
    if diff_map.ndim not in (2, 3):
        raise ValueError(f"diff_map must be [h, w] or [B, h, w], got shape {tuple(diff_map.shape)}")
    height, width = _height_width(image_size)
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch size {patch_size} does not fit in a {height}x{width} image")
    maps = diff_map.float()
    batched = maps if maps.ndim == 3 else maps[None]
    if not torch.isfinite(batched).all():
        raise ValueError("diff_map contains NaN or infinite values")
    # align_corners=False is F.interpolate's default and what the reference code uses.
    upsampled = F.interpolate(batched[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    pooled = box_means(upsampled, patch_size)
    return pooled if maps.ndim == 3 else pooled[0]


def box_means(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """k x k average pooling, stride 1, no padding, over the last two dims: [..., H, W] -> [..., H-k+1, W-k+1].

    Equal to `F.avg_pool2d(x, k, stride=1)` but computed from a summed-area table: O(H W) instead
    of O(H W k^2) (k = 64 at 512 px makes the direct pooling ~100x slower on a CPU). The table is
    accumulated in float64 so the four-corner differences keep float32 precision; NumPy's cumsum
    is about twice as fast as torch's on CPU here.
    """
    k = patch_size
    values = images.detach().cpu().numpy()
    table = np.zeros((*values.shape[:-2], values.shape[-2] + 1, values.shape[-1] + 1))
    inner = table[..., 1:, 1:]
    np.cumsum(values, axis=-2, dtype=np.float64, out=inner)
    np.cumsum(inner, axis=-1, out=inner)
    sums = table[..., k:, k:] - table[..., :-k, k:] - table[..., k:, :-k] + table[..., :-k, :-k]
    return torch.from_numpy((sums / (k * k)).astype(np.float32)).to(images.device)


# --- boxes per image ----------------------------------------------------------------------------
def top_boxes(scores: torch.Tensor, patch_size: int, per_image: int = PER_IMAGE, *,
              gap: int = 0) -> list[Box] | list[list[Box]]:
    """Greedily the `per_image` highest-scoring non-overlapping k x k boxes, best first.

    `scores` is `patch_scores`' output, [Hs, Ws] (returns a list of boxes) or [B, Hs, Ws] (a
    list per image). Each step takes the best remaining top-left and rules out every top-left
    whose box would overlap it, i.e. within k (+ `gap`) of it in both axes. Fewer boxes come
    back when no room is left (an image smaller than 2k fits a single box). Ties go to the
    first position in row-major order.

    `gap=1` reproduces the reference code exactly, which also rules out boxes that only touch
    (it compares inclusive end coordinates); the default keeps every box that does not overlap.
    """
    return _greedy_boxes(scores, scores, patch_size, per_image, gap)


def least_typical_boxes(scores: torch.Tensor, patch_size: int, per_image: int = PER_IMAGE, *,
                        gap: int = 0) -> list[Box] | list[list[Box]]:
    """The "-T" baseline: `top_boxes` on the lowest scores (reported with their true scores)."""
    return _greedy_boxes(scores, -scores, patch_size, per_image, gap)


def random_boxes(scores: torch.Tensor, patch_size: int, per_image: int = PER_IMAGE, *, seed: int,
                 gap: int = 0) -> list[Box] | list[list[Box]]:
    """The random baseline: non-overlapping boxes at random places (reported with their true scores).

    A uniform random priority field goes through the same greedy selection as `top_boxes`.
    Images of one batch get independent fields; when scoring images one call at a time, vary
    `seed` per image (e.g. seed + image index), or every image gets the same box positions.
    """
    generator = torch.Generator().manual_seed(seed)
    priority = torch.rand(scores.shape, generator=generator)
    return _greedy_boxes(scores, priority, patch_size, per_image, gap)


def score_boxes(scores: torch.Tensor, boxes: Sequence[Sequence[float]]) -> list[float]:
    """Read other scores (e.g. another label's `patch_scores`) at the top-lefts of given boxes.

    `scores` is [Hs, Ws] for one image; used for a patch's typicality under every label (trends).
    """
    if scores.ndim != 2:
        raise ValueError(f"score_boxes takes one image's [Hs, Ws] scores, got shape {tuple(scores.shape)}")
    if not boxes:
        return []
    x0 = torch.tensor([int(box[0]) for box in boxes])
    y0 = torch.tensor([int(box[1]) for box in boxes])
    if (x0 < 0).any() or (y0 < 0).any() or (x0 >= scores.shape[1]).any() or (y0 >= scores.shape[0]).any():
        raise ValueError(f"a box's top-left lies outside the {tuple(scores.shape)} score grid")
    return scores[y0, x0].tolist()


def _greedy_boxes(scores: torch.Tensor, priority: torch.Tensor, patch_size: int, per_image: int,
                  gap: int) -> list[Box] | list[list[Box]]:
    """Greedy non-overlapping selection by `priority`, reporting `scores`; batched over images."""
    if scores.ndim not in (2, 3):
        raise ValueError(f"scores must be [Hs, Ws] or [B, Hs, Ws], got shape {tuple(scores.shape)}")
    if patch_size < 1 or per_image < 0 or gap < 0:
        raise ValueError(f"need patch_size >= 1, per_image >= 0, gap >= 0; got {patch_size}, {per_image}, {gap}")
    single = scores.ndim == 2
    scores3 = (scores[None] if single else scores).detach().cpu().float().numpy()
    if not np.isfinite(scores3).all():  # NumPy's check: torch.isfinite is ~10x slower on CPU
        raise ValueError("scores contain NaN or infinite values")
    # Suppressed top-lefts are set to -inf in a private copy (real priorities are finite). The
    # loop runs in NumPy: its argmax is several times faster than torch's on CPU.
    priority = (priority[None] if single else priority).detach().cpu().numpy().astype(np.float32, copy=True)
    batch, rows, cols = scores3.shape
    reach = patch_size + gap  # top-lefts closer than this in both axes give overlapping boxes
    image_index = np.arange(batch)

    boxes: list[list[Box]] = [[] for _ in range(batch)]
    for _ in range(per_image):
        flat = priority.reshape(batch, -1).argmax(axis=1)  # the best remaining top-left of every image
        ys, xs = flat // cols, flat % cols
        taken = np.isfinite(priority[image_index, ys, xs])  # False once an image has no room left
        if not taken.any():
            break
        for b in np.flatnonzero(taken).tolist():
            top, left = int(ys[b]), int(xs[b])
            boxes[b].append(Box(left, top, left + patch_size, top + patch_size, float(scores3[b, top, left])))
            # Vectorised suppression: every top-left within `reach` of the pick in both axes is
            # one rectangle of the grid, cleared with one slice.
            priority[b, max(0, top - reach + 1):top + reach, max(0, left - reach + 1):left + reach] = -np.inf
    return boxes[0] if single else boxes


# --- boxes per label ----------------------------------------------------------------------------
Candidate = tuple[Hashable, float, Any]  # (label, score, payload), e.g. (label, box.score, (image_id, box))


def top_per_label(candidates: Iterable[Candidate], k: int = PER_LABEL) -> dict[Hashable, list[tuple[float, Any]]]:
    """The `k` highest-scoring candidates of each label, best first, from a stream.

    Holds at most k candidates per label at any time (a min-heap each), so the input can be a
    generator over a whole dataset. Equal scores keep the earlier candidate. A multi-label image
    contributes one candidate per label it carries (its score under that label).
    Returns {label: [(score, payload), ...]}.
    """
    return _best_per_label(((label, float(score), float(score), payload) for label, score, payload in candidates), k)


def least_per_label(candidates: Iterable[Candidate], k: int = PER_LABEL) -> dict[Hashable, list[tuple[float, Any]]]:
    """The "-T" baseline of `top_per_label`: the k lowest-scoring candidates, lowest first."""
    return _best_per_label(((label, -float(score), float(score), payload) for label, score, payload in candidates), k)


def random_per_label(candidates: Iterable[Candidate], k: int = PER_LABEL, *,
                     seed: int) -> dict[Hashable, list[tuple[float, Any]]]:
    """The random baseline of `top_per_label`: k candidates per label, uniformly without replacement.

    The k largest of i.i.d. uniform keys are a uniform sample (reservoir sampling), so this is the
    same streaming top-k with a seeded random priority. Output is in priority (random) order.
    """
    generator = torch.Generator().manual_seed(seed)

    def keyed():
        for chunk in _chunks(candidates, 4096):  # draw the random keys in vectors, not one by one
            keys = torch.rand(len(chunk), generator=generator, dtype=torch.float64).tolist()
            for key, (label, score, payload) in zip(keys, chunk):
                yield label, key, float(score), payload

    return _best_per_label(keyed(), k)


def _chunks(items: Iterable, size: int) -> Iterable[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _best_per_label(keyed: Iterable[tuple[Hashable, float, float, Any]],
                    k: int) -> dict[Hashable, list[tuple[float, Any]]]:
    """Streaming top-k by priority per label; items are (label, priority, score, payload)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    heaps: dict[Hashable, list] = {}
    for order, (label, priority, score, payload) in enumerate(keyed):
        if math.isnan(priority) or math.isnan(score):
            raise ValueError(f"candidate {order} (label {label!r}) has a NaN score")
        # Heap entries compare (priority, -order): the root is the weakest, and among equal
        # priorities the latest, so ties keep earlier candidates. Payloads are never compared.
        entry = (priority, -order, score, payload)
        heap = heaps.setdefault(label, [])
        if len(heap) < k:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)
    return {label: [(score, payload) for _, _, score, payload in sorted(heap, reverse=True)]
            for label, heap in heaps.items()}


# --- model pixels <-> original pixels -----------------------------------------------------------
def _crop_geometry(model_size: int, original_size: Sequence[int], whole: bool = False,
                   multiple: int = 1) -> tuple[float, float, int, int]:
    """Per-axis scale and crop offset of "resize shorter side to R" and, unless `whole`,
    "center-crop R x R" (`data.View`).

    The resized size is `data.resized_size`, the very function that resizes the pixels (for a
    whole view with its sides rounded to `multiple`), so the per-axis scales W'/W and H'/H
    absorb every rounding; the crop offset is ((W' - R) // 2, (H' - R) // 2), or none for the
    whole image. The centre crop ignores `multiple`, as `data.View` does.
    """
    width, height = original_size
    if width <= 0 or height <= 0 or model_size <= 0:
        raise ValueError(f"sizes must be positive, got original {original_size}, model {model_size}")
    resized_w, resized_h = resized_size(original_size, model_size, multiple if whole else 1)
    if whole:
        return resized_w / width, resized_h / height, 0, 0
    return resized_w / width, resized_h / height, (resized_w - model_size) // 2, (resized_h - model_size) // 2


def box_to_original(box: Sequence[float], model_size: int, original_size: Sequence[int], *,
                    whole: bool = False, multiple: int = 1) -> tuple[float, ...]:
    """Model-resolution box -> the same region in the original image's pixels (floats).

    Assumes the scored image was made the way `data.View(model_size, whole, multiple)` makes it:
    the original (W, H) = `original_size` resized so its shorter side is `model_size`, then
    center-cropped to model_size x model_size, or kept whole (`whole`, its sides rounded to
    `multiple`). A fifth element (the score) passes through unchanged. Round outward (floor
    x0/y0, ceil x1/y1) to crop pixels. Inverse: `box_to_model`.
    """
    scale_x, scale_y, left, top = _crop_geometry(model_size, original_size, whole, multiple)
    x0, y0, x1, y1, *rest = box
    return ((x0 + left) / scale_x, (y0 + top) / scale_y, (x1 + left) / scale_x, (y1 + top) / scale_y, *rest)


def box_to_model(box: Sequence[float], model_size: int, original_size: Sequence[int], *,
                 whole: bool = False, multiple: int = 1) -> tuple[float, ...]:
    """The inverse of `box_to_original`: original-image pixels -> model-resolution pixels.

    Regions outside the center crop map outside [0, model_size); they are not clipped.
    """
    scale_x, scale_y, left, top = _crop_geometry(model_size, original_size, whole, multiple)
    x0, y0, x1, y1, *rest = box
    return (x0 * scale_x - left, y0 * scale_y - top, x1 * scale_x - left, y1 * scale_y - top, *rest)


def model_top_left(stored_box: Sequence[int], model_size: int, original_size: Sequence[int],
                   patch_size: int, *, whole: bool = False,
                   multiple: int = 1) -> tuple[int, int]:
    """The k x k box's top-left on the model grid from its stored (outward-rounded) original box.

    Rounding outward loses up to an original pixel, more than half a model pixel when the
    original is smaller than the model's view, so `round(box_to_model(...))` can land one off;
    the neighbour whose own outward rounding reproduces the stored box is the one.
    """
    x, y = box_to_model(stored_box[:4], model_size, original_size, whole=whole, multiple=multiple)[:2]
    for dy in (0, 1, -1):
        for dx in (0, 1, -1):
            top_left = (round(x) + dx, round(y) + dy)
            x0, y0, x1, y1 = box_to_original((*top_left, top_left[0] + patch_size, top_left[1] + patch_size),
                                             model_size, original_size, whole=whole, multiple=multiple)
            if (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)) == tuple(stored_box[:4]):
                return top_left
    return round(x), round(y)


def scores_at_boxes(maps: torch.Tensor, boxes: Sequence[Sequence[int]], original_sizes: Sequence[Sequence[int]],
                    *, view_size: int, patch_size: int, whole: bool = False, multiple: int = 1) -> torch.Tensor:
    """The k x k pooled score of each stored (original-pixel) box under every map:
    maps [L, h, w] of one image -> [len(boxes), L]."""
    grid = patch_scores(maps, image_shape_of(maps.shape[-2:], view_size), patch_size)  # [L, Hs, Ws]
    cells = []
    for box, size in zip(boxes, original_sizes):
        x, y = model_top_left(box, view_size, size, patch_size, whole=whole, multiple=multiple)
        cells.append(grid[:, min(max(y, 0), grid.shape[1] - 1), min(max(x, 0), grid.shape[2] - 1)])
    return torch.stack(cells) if cells else grid.new_zeros(0, len(maps))
