"""How settled a result is: per-box standard errors from the draws, the chance to stay in the
label's top K, cluster stability, and ranking that needs support."""
import math

import numpy as np
import pytest
import torch

from worker.engine.clustering import coherence, order_clusters, supported_median
from worker.engine.patches import patch_scores, top_boxes
from worker.engine.presets import PAPER
from worker.engine.settled import box_draw_values, box_standard_errors, cluster_stability, stay_probabilities
from worker.engine.tiles import tiled_typicality
from worker.engine.typicality import typicality


def test_box_values_per_draw_average_to_the_box_score_and_give_its_stderr(tiny_denoiser, images):
    preset = PAPER.with_(draws=12, forward_batch=48)
    conditions = tiny_denoiser.condition([0, 1, 0])
    result = typicality(tiny_denoiser, images, conditions, preset, seed=3, draw_maps=True)
    assert result.draw_maps.shape == (3, 12, 32, 32)
    # The draw maps are the draws behind the mean map and the image-level differences.
    torch.testing.assert_close(result.draw_maps.mean(dim=1), result.maps)
    torch.testing.assert_close(result.draw_maps.mean(dim=(2, 3)), result.differences)

    scores = patch_scores(result.maps[0], 32, 6)
    boxes = top_boxes(scores, 6, 3)
    # Stored boxes of a 32 x 32 original seen at 32 px: original pixels are model pixels.
    values = box_draw_values(result.draw_maps[0], [b[:4] for b in boxes], [(32, 32)] * 3, view_size=32,
                             patch_size=6)
    assert values.shape == (3, 12)
    torch.testing.assert_close(values.mean(dim=1), torch.tensor([b.score for b in boxes]), atol=1e-6, rtol=1e-5)
    stderr = box_standard_errors(values, 12)
    expected = values.double().std(dim=1) / math.sqrt(12)
    torch.testing.assert_close(stderr, expected.float())
    # A box averages fewer locations than the image: its score is noisier than the image's.
    assert (stderr > result.stderr[0]).all()
    # Without asking, nothing extra is kept.
    assert typicality(tiny_denoiser, images[:1], conditions[:1], preset, seed=3).draw_maps is None


def test_tiled_draw_maps_assemble_like_the_mean_map(tiny_denoiser):
    large = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    preset = PAPER.with_(draws=4, forward_batch=64)
    result = tiled_typicality(tiny_denoiser, large, tiny_denoiser.condition([0]), preset, seed=0, tile=32,
                              draw_maps=True)
    assert result.draw_maps.shape == (1, 4, 48, 48)
    torch.testing.assert_close(result.draw_maps.mean(dim=1), result.maps)


def test_box_values_of_an_original_larger_than_the_view_and_early_stops_use_only_taken_draws():
    draw_maps = torch.randn(20, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        box_draw_values(draw_maps[0], [(0, 0, 4, 4)], [(16, 16)], view_size=16, patch_size=4)
    assert box_draw_values(draw_maps, [], [], view_size=16, patch_size=4).shape == (0, 20)
    # A 64 px original seen at 16 px: its 16 px box at (48, 48) is the model's 4 px box at (12, 12);
    # 20 draws go through in chunks and come back in order.
    values = box_draw_values(draw_maps, [(0, 0, 16, 16), (48, 48, 64, 64)], [(64, 64)] * 2, view_size=16,
                             patch_size=4)
    torch.testing.assert_close(values[1], draw_maps[:, 12:16, 12:16].mean(dim=(1, 2)))
    values = values[:, :5]
    stopped = torch.cat([values[:, :3], torch.zeros(2, 2)], dim=1)  # an image that stopped after 3 draws
    torch.testing.assert_close(box_standard_errors(stopped, 3), box_standard_errors(values[:, :3], 3))
    with pytest.raises(ValueError):
        box_standard_errors(values, 1)


def test_stay_probability_follows_the_margin_over_the_cut():
    scores = np.array([1.0, 0.5, 0.3, 0.3])
    stderrs = np.array([0.1, 0.1, 0.1, 0.0])
    stay = stay_probabilities(scores, stderrs, cut=0.3)
    assert stay[0] > 0.999 and 0.97 < stay[1] < 0.98  # 2 standard errors above the cut
    assert stay[2] == pytest.approx(0.5) and stay[3] == pytest.approx(0.5)  # on the cut
    # The cut's own noise makes a patch near it less settled.
    assert stay_probabilities(scores, stderrs, 0.3, cut_stderr=0.1)[1] < stay[1]
    # Nothing left out: everything stays. The "-T" baseline keeps the lowest.
    assert (stay_probabilities(scores, stderrs, None) == 1).all()
    assert stay_probabilities(np.array([0.1]), np.array([0.1]), 0.3, lowest=True)[0] > 0.97
    assert stay_probabilities(np.array([0.5]), np.array([0.0]), 0.3)[0] == 1.0
    with pytest.raises(ValueError):
        stay_probabilities(scores, -stderrs, 0.3)


def test_stay_probability_predicts_how_many_stay_under_new_draws():
    """Simulated redraws: the predicted share of kept patches staying in the top K matches the
    share that does stay when every candidate's score is drawn again."""
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 1, 2000)
    noise = 0.3
    k = 200
    observed = truth + rng.normal(0, noise, truth.shape)
    order = np.argsort(-observed)
    kept, cut = order[:k], observed[order[k]]
    predicted = stay_probabilities(observed[kept], np.full(k, noise), cut, cut_stderr=noise).mean()
    stayed = []
    for _ in range(50):
        again = truth + rng.normal(0, noise, truth.shape)
        stayed.append(np.isin(kept, np.argsort(-again)[:k]).mean())
    assert abs(predicted - np.mean(stayed)) < 0.1


def test_cluster_stability_is_the_mean_stay_of_members():
    stability = cluster_stability(np.array([0, 0, 2, 2, 2]), np.array([1.0, 0.5, 0.2, 0.4, 0.6]))
    assert stability[0] == pytest.approx(0.75) and stability[2] == pytest.approx(0.4)
    assert np.isnan(stability[1])
    with pytest.raises(ValueError):
        cluster_stability(np.array([0, 1]), np.array([1.0]))


def test_a_small_cluster_needs_support_to_rank_first():
    # Cluster 0: 2 patches with a high median; cluster 1: 20 patches, a little lower.
    assignments = np.array([0] * 2 + [1] * 20 + [2] * 30)
    typicality = np.array([5.0, 5.0] + [4.5] * 20 + [1.0] * 30)
    distances = np.zeros(len(assignments))
    plain = order_clusters(assignments, distances, typicality)
    assert [c.cluster for c in plain] == [0, 1, 2]
    assert [c.ranking_typicality for c in plain] == [c.median_typicality for c in plain]
    supported = order_clusters(assignments, distances, typicality, prior_size=0.05 * len(typicality))
    assert [c.cluster for c in supported] == [1, 0, 2]
    assert supported[1].median_typicality == 5.0  # the median shown stays the plain one
    # label median 1 (52 rows, 30 of them at 1), n0 = 0.05 * 52 = 2.6
    assert supported[1].ranking_typicality == pytest.approx((2 * 5 + 2.6 * 1) / 4.6)
    assert supported[0].ranking_typicality == pytest.approx((20 * 4.5 + 2.6 * 1) / 22.6)
    assert supported_median(3.0, 10, 1.0, 0) == 3.0
    with pytest.raises(ValueError):
        supported_median(3.0, 0, 1.0, 1.0)


def test_coherence_on_centred_features_separates_what_raw_features_do_not():
    """DIFT-like features: a large shared component plus small differences. Raw, a mixed and a
    pure cluster both score ~1; centred on the mean feature, the mixed one drops."""
    rng = np.random.default_rng(0)
    common = rng.normal(size=64)
    directions = rng.normal(size=(2, 64))
    truth = np.repeat([0, 1], 30)
    features = 10 * common + directions[truth] + 0.3 * rng.normal(size=(60, 64))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    mixed = np.arange(60) % 2
    raw_pure, raw_mixed = coherence(features, truth), coherence(features, mixed)
    assert (raw_pure > 0.98).all() and (raw_mixed > 0.98).all()
    centred = features - features.mean(axis=0)
    pure, mixed_centred = coherence(centred, truth), coherence(centred, mixed)
    assert (pure > 0.8).all() and (mixed_centred < 0.5).all()
    # A patch equal to the mean (a one-patch run, centred) has no direction and counts as 0.
    assert coherence(np.zeros((1, 4)), np.array([0]))[0] == 0


def test_fresh_iid_draws_stand_in_for_the_papers_hundred():
    from worker.engine.presets import ADAPTIVE, FAST
    from worker.engine.settled import SETTLE_DRAWS, settle_preset

    preset, score_draws = settle_preset(PAPER)
    assert preset.draws == SETTLE_DRAWS and score_draws == 100
    assert settle_preset(FAST) == (FAST, None)  # stratified: its own draws, all of them
    assert settle_preset(PAPER.with_(draws=16)) == (PAPER.with_(draws=16), None)
    # adaptive: its mined rows got the paper's 100 i.i.d. draws; the stages are not the draws' law
    adaptive, adaptive_draws = settle_preset(ADAPTIVE)
    assert adaptive.draws == SETTLE_DRAWS and adaptive.stages is None and adaptive_draws == 100
    # The spread of 24 draws over sqrt(100) estimates the error of a 100-draw mean.
    rng = torch.Generator().manual_seed(0)
    values = torch.randn(2000, 24, generator=rng) * 3.0
    errors = box_standard_errors(values, 24, score_draws=100)
    assert errors.mean().item() == pytest.approx(3.0 / 10, rel=0.05)
    with pytest.raises(ValueError):
        box_standard_errors(values, 24, "stratified", score_draws=100)


def test_block_maps_keep_box_means_of_aligned_boxes_and_edge_blocks_average_their_own_pixels():
    from worker.engine.settled import pool_draw_maps, unpool_draw_maps

    maps = torch.arange(2 * 3 * 10 * 13, dtype=torch.float32).reshape(2, 3, 10, 13)
    assert torch.equal(pool_draw_maps(maps, 1), maps)
    blocks = pool_draw_maps(maps, 4)
    assert blocks.shape == (2, 3, 3, 4)
    assert blocks[0, 0, 0, 0] == maps[0, 0, :4, :4].mean()
    assert blocks[1, 2, 2, 3] == maps[1, 2, 8:, 12:].mean()  # a 2 x 1 edge block
    back = unpool_draw_maps(blocks, 4, (10, 13))
    assert back.shape == maps.shape
    # a box on block edges pools to the same mean from the blocks as from the maps
    assert back[..., 4:8, 0:8].mean(dim=(-2, -1)).allclose(maps[..., 4:8, 0:8].mean(dim=(-2, -1)))
    with pytest.raises(ValueError, match="do not cover"):
        unpool_draw_maps(blocks, 4, (13, 13))
