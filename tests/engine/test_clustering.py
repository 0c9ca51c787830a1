"""Clustering mined patches: k-means, ordering rules, near-duplicate merge, artifacts, trends."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from worker.engine.clustering import (
    cluster_features,
    coherence,
    distances_to_centroids,
    exclude_lookalikes,
    merge_near_duplicates,
    order_clusters,
    peak_labels,
    trend,
    trend_direction,
)


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def blobs(per_blob: int = 50, blobs: int = 4, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """Well-separated unit-norm clusters (each near a distinct random direction) and their truth."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(blobs, dim)))
    truth = np.repeat(np.arange(blobs), per_blob)
    return unit(centers[truth] + spread * rng.normal(size=(len(truth), dim))), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --- k-means ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_kmeans_recovers_separated_blobs(backend):
    features, truth = blobs()
    result = cluster_features(features, k=4, seed=0, backend=backend)
    assert result.k == 4 and result.requested_k == 4 and result.trained_on == len(features)
    assert same_partition(result.assignments, truth)
    np.testing.assert_allclose(result.distances,
                               np.linalg.norm(features - result.centroids[result.assignments], axis=1), atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_same_seed_gives_same_clusters_and_order(backend):
    features, _ = blobs(per_blob=30, blobs=6, spread=0.4, seed=1)  # overlapping: init matters
    typicality = np.random.default_rng(2).normal(size=len(features))
    runs = [cluster_features(features, k=8, seed=11, backend=backend) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].assignments, runs[1].assignments)
    np.testing.assert_array_equal(runs[0].centroids, runs[1].centroids)
    orders = [order_clusters(r.assignments, r.distances, typicality) for r in runs]
    assert [c.cluster for c in orders[0]] == [c.cluster for c in orders[1]]
    assert all(np.array_equal(a.members, b.members) for a, b in zip(*orders))


def test_fewer_points_than_clusters_is_explicit():
    features, _ = blobs(per_blob=1, blobs=5)
    with pytest.warns(UserWarning, match="5 features for 32 clusters"):
        result = cluster_features(features, k=32)
    assert result.k == 5 and result.requested_k == 32
    assert sorted(result.assignments.tolist()) == list(range(5))
    with pytest.raises(ValueError):
        cluster_features(np.zeros((0, 8), dtype=np.float32))


def test_duplicate_points_leave_no_empty_cluster():
    features = np.repeat(unit(np.eye(3)), 4, axis=0)  # 12 rows, 3 distinct
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn/FAISS may note the duplicates
        result = cluster_features(features, k=6, seed=0)
    assert result.k == len(np.unique(result.assignments)) <= 6
    assert result.assignments.max() == result.k - 1


def test_large_sets_train_on_a_subsample_then_assign_everything():
    features, truth = blobs(per_blob=100)
    result = cluster_features(features, k=4, seed=0, max_points_per_centroid=10)
    assert result.trained_on == 40
    assert len(result.assignments) == 400 and same_partition(result.assignments, truth)


# --- ordering -----------------------------------------------------------------------------------
def test_order_clusters_by_median_typicality_then_members_by_distance():
    assignments = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    distances = np.array([0.3, 0.1, 0.2, 0.5, 0.5, 0.9, 0.0, 0.4, 0.2])
    typicality = np.array([1.0, 1.0, 100.0, 5.0, 5.0, 0.0, 2.0, 9.0, 5.0])
    ranked = order_clusters(assignments, distances, typicality)
    # medians: c0 = 1 (one outlier of 100 does not lift it), c1 = 5, c2 = 2, c3 = 5; ties -> lower id
    assert [c.cluster for c in ranked] == [1, 3, 2, 0]
    assert [c.median_typicality for c in ranked] == [5.0, 5.0, 2.0, 1.0]
    by_id = {c.cluster: c.members.tolist() for c in ranked}
    assert by_id[0] == [1, 2, 0] and by_id[2] == [6, 7, 5]
    assert by_id[1] == [3, 4]  # equal distances -> lower row first


def test_order_clusters_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        order_clusters(np.zeros(3, dtype=int), np.zeros(3), np.zeros(2))


# --- merging, coherence, artifacts --------------------------------------------------------------
def test_merge_near_duplicates_is_transitive_and_count_weighted():
    a = unit([[1.0, 0.0, 0.0]])[0]
    a_prime = unit([[1.0, 0.12, 0.0]])[0]  # cos(a, a') ~ 0.993
    a_second = unit([[1.0, 0.24, 0.0]])[0]  # cos(a', a'') ~ 0.993, cos(a, a'') ~ 0.972
    b = unit([[0.0, 0.0, 1.0]])[0]
    centroids = np.stack([a, b, a_prime, a_second])
    assignments = np.array([0, 0, 0, 1, 2, 3])
    merged, new_assignments, old_to_new = merge_near_duplicates(centroids, assignments, threshold=0.99)
    assert old_to_new.tolist() == [0, 1, 0, 0]  # a ~ a' ~ a'' chain merges, b stays
    assert new_assignments.tolist() == [0, 0, 0, 1, 0, 0]
    expected = (3 * a + a_prime + a_second) / 5  # weighted by member counts (3, 1, 1)
    np.testing.assert_allclose(merged[0], expected, atol=1e-6)
    np.testing.assert_allclose(merged[1], b, atol=1e-6)
    same, _, mapping = merge_near_duplicates(centroids, assignments, threshold=0.999)
    assert mapping.tolist() == [0, 1, 2, 3] and np.allclose(same, centroids)


def test_merged_clusters_can_be_reordered_with_recomputed_distances():
    features, truth = blobs(per_blob=20, blobs=3)
    split = np.where(truth == 0, np.arange(len(truth)) % 2 * 3, truth)  # blob 0 split into ids 0 and 3
    centroids = np.stack([features[split == c].mean(axis=0) for c in range(4)])
    merged, assignments, _ = merge_near_duplicates(centroids, split, threshold=0.95)
    assert len(merged) == 3 and same_partition(assignments, truth)
    distances = distances_to_centroids(features, merged, assignments)
    ranked = order_clusters(assignments, distances, typicality=np.zeros(len(truth)))
    assert sorted(len(c.members) for c in ranked) == [20, 20, 20]


def test_coherence_is_high_for_pure_and_low_for_mixed_clusters():
    features, truth = blobs(per_blob=20, blobs=2, spread=0.01)
    pure = coherence(features, truth)
    mixed = coherence(features, np.arange(len(truth)) % 2)  # each cluster half of each blob
    assert (pure > 0.99).all() and (mixed < pure).all()
    assert np.isnan(coherence(features, np.where(truth == 0, 0, 2))[1])  # an empty id


def test_exclude_lookalikes_flags_near_copies_of_marked_artifacts():
    features, truth = blobs(per_blob=10, blobs=3, spread=0.01)
    artifact = features[truth == 1][:1] + 0.001
    mask = exclude_lookalikes(features, artifact, threshold=0.9)
    np.testing.assert_array_equal(mask, truth == 1)
    assert not exclude_lookalikes(features, np.zeros((0, 16)), threshold=0.9).any()
    assert exclude_lookalikes(features, artifact, threshold=-1.1).all()
    with pytest.raises(ValueError):
        exclude_lookalikes(features, np.ones((1, 3)))


# --- trends over ordered labels -----------------------------------------------------------------
def test_trend_medians_peaks_and_direction():
    per_label = np.array([[0.0, 1.0, 2.0, 3.0],   # cluster 0 rises
                          [0.0, 2.0, 4.0, 6.0],
                          [9.0, 0.0, 0.0, 0.0],   # an outlier: the median ignores it
                          [3.0, 2.0, 1.0, 0.0],   # cluster 1 falls
                          [0.0, 5.0, 0.0, 0.0]])  # cluster 2 peaks at label 1
    assignments = np.array([0, 0, 0, 1, 2])
    curves = trend(per_label, assignments)
    np.testing.assert_allclose(curves[0], [0.0, 1.0, 2.0, 3.0])
    assert peak_labels(curves).tolist() == [3, 0, 1]
    np.testing.assert_allclose(trend_direction(curves[:2]), [1.0, -1.0])
    assert trend_direction([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    np.testing.assert_allclose(trend(per_label), np.median(per_label, axis=0))


def test_a_zero_feature_row_is_no_ones_lookalike():
    """Centred on the run's mean, a run of one patch has a zero feature row: no error, no match."""
    from worker.engine.clustering import exclude_lookalikes

    features = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    assert exclude_lookalikes(features, features[1:]).tolist() == [False, True]
    assert exclude_lookalikes(features, features[:1]).tolist() == [False, False]
