"""A 2D layout of patch features for a run's patch map: t-SNE of a sample, every other patch
placed among its nearest sampled neighbours.

Why t-SNE: on DIFT features PCA's two largest directions show one blob (the features share a
large common component, and the elements differ along many small directions); t-SNE keeps
neighbourhoods, so a label's clusters appear as islands. Why a sample: scikit-learn's t-SNE has
no transform for new points and costs about 24 s for 5,000 points on one CPU core (growing as
n log n), and the features of a large run do not fit in memory. umap-learn has a transform but
brings numba and llvmlite (64 MB of wheels) and a JIT compile per process.

So: PCA to `PCA_DIMS` fitted on at most `SAMPLE` rows, t-SNE of those rows, then every row,
read batch by batch from the memory-mapped features, goes to the distance-weighted mean position
of its `NEIGHBOURS` nearest sampled rows in the PCA space t-SNE saw (a sampled row lands on its
own t-SNE position). Seeded: the same features and seed give the same layout.
"""
from __future__ import annotations

import faiss
import numpy as np

SAMPLE = 5000
PCA_DIMS = 50
NEIGHBOURS = 5
PERPLEXITY = 30.0
#: Fewer rows than this are laid out by PCA alone: t-SNE's perplexity needs more neighbours.
MIN_TSNE_ROWS = 8
BATCH = 65536


def sample_rows(total: int, sample: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a seeded uniform sample (all rows when there are few)."""
    if total <= sample:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False))


def embed_sample(reduced: np.ndarray, seed: int) -> np.ndarray:
    """[m, k] PCA coordinates -> [m, 2] t-SNE positions (PCA's first two for very few rows)."""
    if len(reduced) < MIN_TSNE_ROWS:
        positions = np.zeros((len(reduced), 2), dtype=np.float32)
        positions[:, :min(2, reduced.shape[1])] = reduced[:, :2]
        return positions
    from sklearn.manifold import TSNE

    tsne = TSNE(n_components=2, perplexity=min(PERPLEXITY, (len(reduced) - 1) / 3), init="pca",
                random_state=seed)
    return tsne.fit_transform(reduced).astype(np.float32)


def layout(features: np.ndarray, *, seed: int, sample: int = SAMPLE, batch: int = BATCH) -> np.ndarray:
    """[n, d] features (a memory map is read `batch` rows at a time) -> [n, 2] float32 positions
    in [0, 1], both axes scaled alike (distances keep their meaning) and centred."""
    total = len(features)
    if total < 2:
        return np.full((total, 2), 0.5, dtype=np.float32)
    from sklearn.decomposition import PCA

    rows = sample_rows(total, sample, seed)
    sampled = np.asarray(features[rows], dtype=np.float32)
    pca = PCA(n_components=min(PCA_DIMS, len(rows) - 1, features.shape[1]), random_state=seed)
    reduced = pca.fit_transform(sampled).astype(np.float32)
    anchors = embed_sample(reduced, seed)
    positions = np.empty((total, 2), dtype=np.float32)
    for start in range(0, total, batch):
        chunk = np.asarray(features[start:start + batch], dtype=np.float32)
        positions[start:start + len(chunk)] = place(pca.transform(chunk).astype(np.float32), reduced, anchors)
    positions[rows] = anchors  # exactly, not a weighted mean that is almost them
    return normalised(positions)


def place(queries: np.ndarray, reduced: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Each query at the inverse-distance-weighted mean position of its nearest sampled rows."""
    k = min(NEIGHBOURS, len(reduced))
    squared, nearest = faiss.knn(np.ascontiguousarray(queries), np.ascontiguousarray(reduced), k)
    weights = 1.0 / (np.sqrt(np.maximum(squared, 0)) + 1e-6)
    return (np.einsum("nk,nkc->nc", weights, anchors[nearest]) / weights.sum(axis=1, keepdims=True)
            ).astype(np.float32)


def normalised(positions: np.ndarray) -> np.ndarray:
    """Positions into [0, 1] x [0, 1] with one scale for both axes, the layout centred."""
    low, high = positions.min(axis=0), positions.max(axis=0)
    span = float((high - low).max()) or 1.0
    centred = (positions - (low + high) / 2) / span + 0.5
    return centred.astype(np.float32)


def z_order(x: np.ndarray, y: np.ndarray, bits: int = 16) -> np.ndarray:
    """Morton codes of positions in [0, 1]: sorting by them keeps neighbours near in the order."""
    scale = (1 << bits) - 1
    code = np.zeros(len(x), dtype=np.uint64)
    xi = np.clip(np.round(np.asarray(x) * scale), 0, scale).astype(np.uint64)
    yi = np.clip(np.round(np.asarray(y) * scale), 0, scale).astype(np.uint64)
    for bit in range(bits):
        code |= ((xi >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit)
        code |= ((yi >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit + 1)
    return code
