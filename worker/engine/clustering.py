"""Clustering mined patches into visual elements (docs/method.md section 4), and tools against its
known weaknesses (mixed or near-duplicate clusters, dataset artifacts).

Paper recipe: k-means with 32 clusters on one label's top 1000 DIFT features; clusters ordered by
the median typicality of their members, descending; members by distance to their centroid,
ascending::

    result = cluster_features(features, k=32, seed=0)
    ranked = order_clusters(result.assignments, result.distances, typicality)

diffmine ranks by that median shrunk toward the label's median by the cluster's size
(`order_clusters(..., prior_size=n0)`, `supported_median`), so a cluster needs support to
rank first.

The reference code runs scikit-learn's `KMeans(n_clusters=32, random_state=10)` (greedy k-means++
init, Lloyd iterations to convergence, n_init="auto" = one run in scikit-learn >= 1.4);
`backend="sklearn", seed=10, nredo=1` reproduces it. The default FAISS backend runs k-means++ init
(where the installed FAISS has it) and Lloyd iterations, keeping the best of `nredo=3` runs:
plain k-means++ (without sklearn's greedy trials) lands in a bad local minimum now and then, and
the restarts make that rare at little cost on 1000 points. It is much faster on large sets.

Features are float32 rows, L2-normalised (DIFT features are). All functions are seeded or
deterministic: the same inputs give the same clusters in the same order.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
from scipy.stats import rankdata

#: Paper: 32 clusters per label.
PAPER_CLUSTERS = 32
#: k-means trains on at most this many points per centroid (FAISS's own default); larger sets are
#: subsampled for training and every point is then assigned to its nearest centroid.
MAX_POINTS_PER_CENTROID = 256
#: Rows per chunk in distance and similarity computations (bounds temporary memory at ~64 MB).
CHUNK = 65536


@dataclass
class Clustering:
    centroids: np.ndarray  # [k, d] float32
    assignments: np.ndarray  # [n] int64 cluster of each row, in [0, k)
    distances: np.ndarray  # [n] float32 Euclidean distance of each row to its centroid
    requested_k: int  # k asked for; `k` is smaller when there were fewer points or empty clusters
    trained_on: int  # rows k-means was trained on (all of them unless subsampled)

    @property
    def k(self) -> int:
        return len(self.centroids)


def cluster_features(features: np.ndarray, k: int = PAPER_CLUSTERS, *, seed: int = 0,
                     backend: str = "faiss", niter: int = 50, nredo: int = 3,
                     max_points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> Clustering:
    """k-means on [n, d] features -> centroids, assignments, distances to the assigned centroid.

    Fewer points than clusters (n < k): k-means runs with n clusters and warns; `requested_k`
    keeps what was asked for. Clusters left empty by the final assignment (duplicate points, or
    subsampled training) are dropped and the rest renumbered in order. Above
    k * `max_points_per_centroid` rows, k-means trains on a seeded uniform subsample and then
    assigns every row (`trained_on` says how many rows it trained on).
    """
    features = _as_float32_rows(features, "features")
    n, dim = features.shape
    if n == 0:
        raise ValueError("cannot cluster zero features")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if backend not in ("faiss", "sklearn"):
        raise ValueError(f"backend must be 'faiss' or 'sklearn', got {backend!r}")
    k_used = min(k, n)
    if k_used < k:
        warnings.warn(f"{n} features for {k} clusters: clustering into {n} clusters instead", stacklevel=2)

    rng = np.random.default_rng(seed)
    train_size = min(n, k_used * max_points_per_centroid)
    train_rows = np.sort(rng.choice(n, train_size, replace=False)) if train_size < n else slice(None)
    train = features[train_rows]
    if backend == "faiss":
        centroids = _faiss_kmeans(train, k_used, seed=seed, niter=niter, nredo=nredo)
    else:
        centroids = _sklearn_kmeans(train, k_used, seed=seed, niter=niter, nredo=nredo)

    assignments, _ = nearest_centroids(features, centroids)
    centroids, assignments = _drop_empty(centroids, assignments)
    distances = distances_to_centroids(features, centroids, assignments)
    return Clustering(centroids=centroids, assignments=assignments, distances=distances,
                      requested_k=k, trained_on=train_size)


@contextmanager
def _faiss_threads(count: int) -> Iterator[None]:
    """Run FAISS with `count` OpenMP threads inside the block (a process-wide setting, restored)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _faiss_kmeans(train: np.ndarray, k: int, *, seed: int, niter: int, nredo: int) -> np.ndarray:
    options = dict(niter=niter, nredo=nredo, seed=seed, verbose=False,
                   # we subsample ourselves; silence FAISS's "too few points per centroid" notice
                   max_points_per_centroid=len(train), min_points_per_centroid=1)
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):  # FAISS >= 1.12; older: random init
        options["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    kmeans = faiss.Kmeans(train.shape[1], k, **options)
    # One thread for default-sized training sets (<= k * MAX_POINTS_PER_CENTROID rows): too little
    # work per iteration to pay for OpenMP synchronisation. On a busy 2-core machine two threads
    # made an 8192-row training 10x slower (0.6 s -> 6 s); on an idle one they gain little.
    small = len(train) <= k * MAX_POINTS_PER_CENTROID
    with _faiss_threads(1 if small else faiss.omp_get_max_threads()):
        kmeans.train(train)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _sklearn_kmeans(train: np.ndarray, k: int, *, seed: int, niter: int, nredo: int) -> np.ndarray:
    from sklearn.cluster import KMeans  # imported here: the FAISS path should not pay for it

    # max_iter is a cap here (Lloyd stops at convergence), so allow more than FAISS's fixed niter.
    kmeans = KMeans(n_clusters=k, random_state=seed, n_init=nredo, max_iter=max(niter, 300))
    kmeans.fit(train)
    return np.ascontiguousarray(kmeans.cluster_centers_, dtype=np.float32)


def nearest_centroids(features: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid (Euclidean; ties to the lowest id) and the distance to it."""
    features = _as_float32_rows(features, "features")
    centroids = _as_float32_rows(centroids, "centroids")
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    squared, nearest = index.search(features, 1)
    return nearest[:, 0].astype(np.int64), np.sqrt(np.maximum(squared[:, 0], 0))


def distances_to_centroids(features: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """[n] Euclidean distance of each row to its assigned centroid (computed in chunks)."""
    features = _as_float32_rows(features, "features")
    assignments = np.asarray(assignments)
    distances = np.empty(len(features), dtype=np.float32)
    for start in range(0, len(features), CHUNK):
        stop = start + CHUNK
        distances[start:stop] = np.linalg.norm(features[start:stop] - centroids[assignments[start:stop]], axis=1)
    return distances


def _drop_empty(centroids: np.ndarray, assignments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(assignments, minlength=len(centroids))
    kept = np.flatnonzero(counts)
    if len(kept) == len(centroids):
        return centroids, assignments
    renumber = np.full(len(centroids), -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    return centroids[kept], renumber[assignments]


# --- ordering -----------------------------------------------------------------------------------
@dataclass
class RankedCluster:
    cluster: int  # the cluster's id in `assignments`
    median_typicality: float
    members: np.ndarray  # row indices, nearest to the centroid first
    #: what the cluster is ranked by: its median shrunk toward the label's median by its size
    #: (`supported_median`); equal to `median_typicality` when `prior_size` is 0 (the paper)
    ranking_typicality: float = float("nan")


def supported_median(median: float, size: int, label_median: float, prior_size: float) -> float:
    """A cluster's median typicality shrunk toward its label's median by the cluster's size:
    (n m + n0 M) / (n + n0), with n0 = `prior_size` patches' worth of the label's median.

    A 2-patch cluster's median is a noisy number: ranked raw, such clusters come first by luck
    (on the demo the 2010 label's top cluster had 2 patches). Shrunk, a cluster needs support
    to rank first: at n = n0 it keeps half of its lead over the label. n0 = 0 is the paper's
    plain median.
    """
    if size < 1 or prior_size < 0:
        raise ValueError(f"need size >= 1 and prior_size >= 0, got {size}, {prior_size}")
    return (size * median + prior_size * label_median) / (size + prior_size)


def order_clusters(assignments: np.ndarray, distances: np.ndarray, typicality: np.ndarray, *,
                   prior_size: float = 0.0) -> list[RankedCluster]:
    """Clusters by `supported_median` (the median member typicality, shrunk toward the median of
    all rows by `prior_size`), descending; members by distance to centroid, ascending.

    `prior_size=0` ranks by the plain median (the paper). Ties (equal keys, equal distances) go
    to the lower cluster id / row index, so the order is a pure function of the inputs. Empty
    cluster ids are skipped.
    """
    assignments = np.asarray(assignments)
    distances = np.asarray(distances)
    typicality = np.asarray(typicality, dtype=np.float64)
    if not len(assignments) == len(distances) == len(typicality):
        raise ValueError(f"need one assignment, distance and typicality per row, got "
                         f"{len(assignments)}, {len(distances)}, {len(typicality)}")
    if np.isnan(typicality).any() or np.isnan(distances).any():
        raise ValueError("typicality and distances must not contain NaN")
    label_median = float(np.median(typicality)) if len(typicality) else 0.0
    # Rows sorted by (cluster, distance, row): each cluster's members become one contiguous run.
    rows = np.lexsort((np.arange(len(assignments)), distances, assignments))
    ids, starts = np.unique(assignments[rows], return_index=True)
    ranked = []
    for cluster, members in zip(ids.tolist(), np.split(rows, starts[1:])):
        median = float(np.median(typicality[members]))
        ranked.append(RankedCluster(cluster=cluster, median_typicality=median, members=members,
                                    ranking_typicality=supported_median(median, len(members), label_median,
                                                                        prior_size)))
    ranked.sort(key=lambda c: (-c.ranking_typicality, c.cluster))
    return ranked


# --- fighting near-duplicate and mixed clusters -------------------------------------------------
def merge_near_duplicates(centroids: np.ndarray, assignments: np.ndarray,
                          threshold: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge clusters whose centroids have cosine similarity > `threshold`.

    Merging is transitive (single linkage: if A~B and B~C, all three merge). A merged centroid is
    the member-count-weighted mean of its parts' centroids, which equals the mean of the union of
    their members when each centroid is its members' mean (as after k-means). New ids are
    contiguous, ordered by each group's lowest old id. Returns (centroids [m, d], assignments [n],
    old_to_new [k]); recompute distances with `distances_to_centroids`.
    """
    centroids = _as_float32_rows(centroids, "centroids")
    assignments = np.asarray(assignments, dtype=np.int64)
    k = len(centroids)
    unit = _normalise(centroids)
    similar = np.triu(unit @ unit.T > threshold, k=1)

    parent = np.arange(k)  # union-find over clusters

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(similar)):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(k)])
    _, old_to_new = np.unique(roots, return_inverse=True)  # roots are each group's lowest id

    counts = np.bincount(assignments, minlength=k).astype(np.float64)
    weights = np.where(counts > 0, counts, 1e-12)  # a group of empty clusters: a plain mean
    merged = np.zeros((old_to_new.max() + 1, centroids.shape[1]))
    np.add.at(merged, old_to_new, centroids * weights[:, None])
    merged /= np.bincount(old_to_new, weights=weights)[:, None]
    return merged.astype(np.float32), old_to_new[assignments], old_to_new


def coherence(features: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """Per cluster id: mean cosine similarity of its members to their (normalised) mean, in [-1, 1].

    1 for a cluster of identical patches; low values flag mixed clusters. NaN for empty ids.
    Pass DIFT features centred on the run's mean feature: raw, they share a large common
    component and every cluster scores ~0.99. A zero row (a patch equal to that mean) has no
    direction and counts as 0.
    """
    unit = _normalise(_as_float32_rows(features, "features"), allow_zero=True)
    assignments = np.asarray(assignments, dtype=np.int64)
    k = int(assignments.max()) + 1 if len(assignments) else 0
    sums = np.zeros((k, unit.shape[1]))
    np.add.at(sums, assignments, unit)
    means = _normalise(sums, allow_zero=True)  # empty ids have zero sums
    cosines = np.einsum("nd,nd->n", unit, means[assignments])
    counts = np.bincount(assignments, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(assignments, weights=cosines, minlength=k) / counts


def exclude_lookalikes(features: np.ndarray, artifact_features: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """[n] bool: True for rows whose cosine similarity to any marked artifact exceeds `threshold`.

    Marking a few patches as artifacts (scanner borders, watermarks) then drops every look-alike
    from every label's ranking and re-clustering, without rescoring any image.
    """
    # Centred features can be zero (a run of one patch, or a patch at the run's mean): such a row
    # has no direction, so it is no one's look-alike.
    unit = _normalise(_as_float32_rows(features, "features"), allow_zero=True)
    artifacts = _normalise(_as_float32_rows(artifact_features, "artifact_features"), allow_zero=True)
    if len(artifacts) == 0:
        return np.zeros(len(unit), dtype=bool)
    if artifacts.shape[1] != unit.shape[1]:
        raise ValueError(f"features have {unit.shape[1]} dims but artifacts {artifacts.shape[1]}")
    mask = np.empty(len(unit), dtype=bool)
    for start in range(0, len(unit), CHUNK):
        mask[start:start + CHUNK] = (unit[start:start + CHUNK] @ artifacts.T).max(axis=1) > threshold
    return mask


# --- ordered labels (decades, ...) --------------------------------------------------------------
def trend(per_label_typicality: np.ndarray, assignments: np.ndarray | None = None) -> np.ndarray:
    """Median typicality under every label: [n, L] -> [L], or per cluster [n_clusters, L].

    Row i of `per_label_typicality` is patch i's typicality under each label (e.g. every decade);
    with `assignments`, row c of the result is cluster c's curve (NaN for empty ids). For ordered
    labels this shows when an element was typical; see `trend_direction` and `peak_labels`.
    """
    values = np.asarray(per_label_typicality, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"per_label_typicality must be [n, L], got shape {values.shape}")
    if assignments is None:
        return np.median(values, axis=0)
    assignments = np.asarray(assignments, dtype=np.int64)
    if len(assignments) != len(values):
        raise ValueError(f"{len(values)} rows but {len(assignments)} assignments")
    k = int(assignments.max()) + 1 if len(assignments) else 0
    curves = np.full((k, values.shape[1]), np.nan)
    for cluster in np.unique(assignments):
        curves[cluster] = np.median(values[assignments == cluster], axis=0)
    return curves


def peak_labels(curves: np.ndarray) -> np.ndarray:
    """Index of the label where each curve ([L] or [k, L]) is highest (first one on ties)."""
    return np.argmax(np.asarray(curves), axis=-1)


def trend_direction(curves: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each curve with the label order, in [-1, 1].

    +1: typicality rises monotonically with the label (e.g. later decades), -1: falls,
    near 0: peaked or flat. NaN for a constant curve.
    """
    single = np.ndim(curves) == 1
    curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    ranks = rankdata(curves, axis=1)
    order = np.arange(curves.shape[1], dtype=np.float64)
    ranks -= ranks.mean(axis=1, keepdims=True)
    order -= order.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        result = (ranks @ order) / (np.linalg.norm(ranks, axis=1) * np.linalg.norm(order))
    return float(result[0]) if single else result


# --- helpers ------------------------------------------------------------------------------------
def _as_float32_rows(array: np.ndarray, name: str) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [n, d], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def _normalise(rows: np.ndarray, allow_zero: bool = False) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms == 0).any():
        if not allow_zero:
            raise ValueError("cannot normalise a zero vector (cosine similarity is undefined)")
        norms = np.where(norms == 0, 1.0, norms)
    return (rows / norms).astype(np.float32)
