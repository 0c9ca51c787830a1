"""The patch map's layout: t-SNE of a sample, the other rows placed among sampled neighbours."""
from __future__ import annotations

import numpy as np

from worker.engine.projection import layout, sample_rows, z_order


def separated_blobs(per_blob: int, blobs: int = 4, dim: int = 32, seed: int = 0):
    """Unit-norm rows near `blobs` random directions, and which blob each row is from."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(blobs, dim))
    truth = np.repeat(np.arange(blobs), per_blob)
    rows = centres[truth] + rng.normal(scale=0.15, size=(len(truth), dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32), truth


def test_blobs_stay_apart_also_for_rows_placed_outside_the_sample(tmp_path):
    features, truth = separated_blobs(150)
    stored = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=features.shape)
    stored[:] = features
    # A sample of 200 of 600 rows, read 64 rows at a time: both paths of the layout are used.
    positions = layout(stored, seed=3, sample=200, batch=64)
    assert positions.shape == (600, 2) and positions.dtype == np.float32
    assert positions.min() >= 0 and positions.max() <= 1 + 1e-6
    assert np.isclose(positions.min(axis=0), 0, atol=1e-6).any() and np.isclose(positions.max(axis=0), 1).any()
    sampled = np.zeros(600, dtype=bool)
    sampled[sample_rows(600, 200, 3)] = True
    centres = np.stack([positions[truth == b].mean(axis=0) for b in range(4)])
    nearest = np.argmin(((positions[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    # Every row, sampled or placed, lies nearest its own blob's centre on the map.
    assert (nearest == truth)[sampled].all() and (nearest == truth)[~sampled].all()
    assert np.array_equal(positions, layout(stored, seed=3, sample=200, batch=64))  # seeded
    assert not np.array_equal(positions, layout(stored, seed=4, sample=200, batch=64))


def test_few_rows():
    assert layout(np.zeros((0, 8), np.float32), seed=0).shape == (0, 2)
    assert np.array_equal(layout(np.ones((1, 8), np.float32), seed=0), [[0.5, 0.5]])
    features, _ = separated_blobs(2, blobs=2)  # too few for t-SNE: PCA places them
    positions = layout(features, seed=0)
    assert positions.shape == (4, 2) and np.isfinite(positions).all()
    assert len({tuple(p) for p in positions.round(4)}) == 4


def test_z_order_keeps_neighbours_near():
    grid = np.array([(x, y) for y in range(4) for x in range(4)], dtype=np.float64) / 3
    order = np.argsort(z_order(grid[:, 0], grid[:, 1]))
    # The first four in Z-order are the 2 x 2 square in the corner, then the next square.
    assert {tuple(p) for p in (grid[order[:4]] * 3).astype(int)} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert {tuple(p) for p in (grid[order[4:8]] * 3).astype(int)} == {(2, 0), (3, 0), (2, 1), (3, 1)}
