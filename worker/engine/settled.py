"""How settled a mined result is (docs/method.md section 3, "How settled").

A patch's score is a mean over the run's draws, so it has a standard error, and a label's top K
is a cut through noisy scores: near-tied patches change places under other draws. Measured on a
small model, `paper` at seed 0 and at seed 1 shared only ~40% of each label's top 50.

    values = box_draw_values(draw_maps, boxes, sizes, view_size=..., patch_size=k)  # [boxes, N]
    stderr = box_standard_errors(values, draws, timesteps, round_size)         # [boxes]
    stay = stay_probabilities(scores, stderr, cut, cut_stderr)                 # [boxes]
    stability = cluster_stability(assignments, stay)                           # [clusters]

A box's per-draw values are its pooled per-draw difference maps; their mean is the box's score
(pooling is linear, worker/engine/patches.py), so the standard error is that of the score itself.
`stay` is the chance that a kept patch is still in its label's top K when the draws are drawn
again; a cluster's stability is the mean over its members: the share of its members expected to
stay.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import ndtr

from .patches import scores_at_boxes
from .presets import TypicalityPreset
from .typicality import standard_error

#: Draws behind a standard error when the score used more i.i.d. draws: the spread of 24 draws
#: is known to ~15% (1 / sqrt(2 (n - 1))), at a quarter of the paper's 100 draws' cost.
SETTLE_DRAWS = 24
#: Draw maps pooled per call in `box_draw_values`: bounds the pooled grids' memory (8 draws of a
#: 512 px image: 8 x 512^2 float64 summed-area tables, ~17 MB).
DRAWS_PER_CHUNK = 8


def settle_preset(preset: TypicalityPreset) -> tuple[TypicalityPreset, int | None]:
    """The draws to measure a score's standard error with, and the `score_draws` to pass to
    `box_standard_errors` (None: the very draws of the score).

    The paper's 100 i.i.d. draws are more than a spread needs: `SETTLE_DRAWS` i.i.d. draws of the
    same distribution estimate it (the preset cut to 24 draws: the score's first 24 timesteps
    with other noise, which does not matter to a spread). Stratified
    draws and early stopping are redone in full: their standard error is a property of the
    whole scheme.
    """
    if preset.draws <= SETTLE_DRAWS or preset.timesteps != "uniform" or preset.target_stderr is not None:
        return preset, None
    # An adaptive preset's stages are how its score was reached, not part of the draws' law
    return preset.with_(draws=SETTLE_DRAWS, round_size=None, stages=None, prefix=None, skip=0), preset.draws


def block_size(patch_size: int) -> int:
    """Side of the blocks a run's per-draw maps are kept at for standard errors: a quarter of
    the box side, so a box spans four blocks or more a side and its per-draw value from blocks
    is within an edge block of the exact one (a spread needs no more)."""
    return max(1, patch_size // 4)


def pool_draw_maps(draw_maps: torch.Tensor, block: int) -> torch.Tensor:
    """Per-draw maps [..., h, w] -> block means [..., ceil(h / block), ceil(w / block)]; edge
    blocks are means over the pixels they hold."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    *lead, height, width = draw_maps.shape
    flat = draw_maps.reshape(-1, 1, height, width).float()
    pad = (0, -width % block, 0, -height % block)
    sums = F.avg_pool2d(F.pad(flat, pad), block, divisor_override=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(flat[:1]), pad), block, divisor_override=1)
    return (sums / counts).reshape(*lead, *sums.shape[-2:])


def unpool_draw_maps(blocks: torch.Tensor, block: int, shape: Sequence[int]) -> torch.Tensor:
    """`pool_draw_maps` undone as far as it can be: [..., hb, wb] -> [..., h, w], each pixel its
    block's mean, so that `box_draw_values` pools boxes from them as from the maps."""
    height, width = map(int, shape)
    grown = blocks.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    if grown.shape[-2] < height or grown.shape[-1] < width:
        raise ValueError(f"blocks {tuple(blocks.shape[-2:])} of {block} px do not cover {height}x{width}")
    return grown[..., :height, :width]


def box_draw_values(draw_maps: torch.Tensor, boxes: Sequence[Sequence[int]], original_sizes: Sequence[Sequence[int]],
                    *, view_size: int, patch_size: int, whole: bool = False, multiple: int = 1) -> torch.Tensor:
    """[boxes, N]: each stored (original-pixel) box's score under each draw, from one image's draw
    maps [N, h, w]: `patches.scores_at_boxes` over the draws, `DRAWS_PER_CHUNK` at a time.

    Pooled as the score was, so the mean over the draws is the box's score.
    """
    if draw_maps.ndim != 3:
        raise ValueError(f"draw_maps must be [N, h, w], got shape {tuple(draw_maps.shape)}")
    return torch.cat([scores_at_boxes(chunk, boxes, original_sizes, view_size=view_size, patch_size=patch_size,
                                      whole=whole, multiple=multiple).cpu()
                      for chunk in draw_maps.split(DRAWS_PER_CHUNK)], dim=1)


def box_standard_errors(draw_values: torch.Tensor, draws: int, timesteps: str = "uniform",
                        round_size: int | None = None, *, score_draws: int | None = None) -> torch.Tensor:
    """[boxes] standard error of each box's score from its first `draws` per-draw values (an
    image that stopped early has zeros after its last draw), with the preset's estimator.

    `score_draws`: the score is a mean over that many i.i.d. draws, of which these values are a
    sample (other draws of the same distribution): the error of the score is then the sample's
    spread over sqrt(score_draws), i.e. this sample's standard error x sqrt(draws / score_draws).
    """
    if not 2 <= draws <= draw_values.shape[-1]:
        raise ValueError(f"need 2 to {draw_values.shape[-1]} draws for a standard error, got {draws}")
    errors = standard_error(draw_values[..., :draws].double(), timesteps, round_size)
    if score_draws is not None:
        if timesteps != "uniform":
            raise ValueError("only i.i.d. (uniform) draws can stand in for other draws")
        errors = errors * math.sqrt(draws / score_draws)
    return errors.float()


def stay_probabilities(scores: np.ndarray, stderrs: np.ndarray, cut: float | None,
                       cut_stderr: float = 0.0, *, lowest: bool = False) -> np.ndarray:
    """[n] chance that each kept patch stays on its side of the label's top-K cut under new draws.

    `cut` is the score of the best patch left out (the K+1-th); None when nothing was left out,
    and then every patch stays. A patch stays when its new score still beats the cut's new score,
    both normal around their observed values: P = Phi((s - cut) / sqrt(se^2 + cut_se^2)).
    `lowest` is for the "-T" baseline, whose top K are the lowest scores.

    The observed scores of kept patches are biased upward (they were kept for being high), so
    this leans optimistic for patches just above the cut; the cut's own noise (`cut_stderr`,
    the handler passes the median stderr of the label's patches) leans the other way.
    """
    scores = np.asarray(scores, dtype=np.float64)
    stderrs = np.asarray(stderrs, dtype=np.float64)
    if scores.shape != stderrs.shape:
        raise ValueError(f"{scores.shape} scores but {stderrs.shape} standard errors")
    if np.isnan(scores).any() or np.isnan(stderrs).any() or (stderrs < 0).any():
        raise ValueError("scores and standard errors must be numbers, standard errors >= 0")
    if cut is None:
        return np.ones_like(scores)
    margin = (cut - scores) if lowest else (scores - cut)
    spread = np.sqrt(stderrs ** 2 + float(cut_stderr) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(spread > 0, margin / np.where(spread > 0, spread, 1.0), np.sign(margin) * np.inf)
    # Exactly on the cut with no noise: a coin toss, as ndtr(0) would give.
    return ndtr(np.nan_to_num(z, nan=0.0))


def cluster_stability(assignments: np.ndarray, stay: np.ndarray) -> np.ndarray:
    """Per cluster id: the mean stay probability of its members, i.e. the share of them expected
    to remain in the label's top K under new draws. NaN for empty ids."""
    assignments = np.asarray(assignments, dtype=np.int64)
    stay = np.asarray(stay, dtype=np.float64)
    if assignments.shape != stay.shape:
        raise ValueError(f"{len(assignments)} assignments but {len(stay)} stay probabilities")
    k = int(assignments.max()) + 1 if len(assignments) else 0
    counts = np.bincount(assignments, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(assignments, weights=stay, minlength=k) / counts
