"""Vector index: exact search, restricted search, streaming adds, save/load, approximate recall."""
from __future__ import annotations

import numpy as np
import pytest

from app import vector_index
from app.vector_index import (
    add_batches,
    build_index,
    create_index,
    default_nlist,
    index_kind,
    load_index,
    save_index,
    search,
)

DIM = 32


def unit_rows(count: int, seed: int, dim: int = DIM) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered_rows(count: int, seed: int, centers: int = 50, spread: float = 0.3) -> np.ndarray:
    """Unit rows around a few directions: closer to real patch features than i.i.d. noise."""
    rng = np.random.default_rng(seed)
    middles = rng.normal(size=(centers, DIM))
    rows = middles[rng.integers(0, centers, count)] + spread * rng.normal(size=(count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def brute_force(rows: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None):
    ids = np.arange(len(rows)) if allowed is None else np.asarray(allowed)
    scores = queries @ rows[ids].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def rows():
    return unit_rows(3000, seed=0)


@pytest.fixture(scope="module")
def queries():
    return unit_rows(40, seed=1)


@pytest.fixture(scope="module")
def indexes(rows):
    """One index of each kind over the same rows, filled from a stream of batches."""
    def stream():
        for start in range(0, len(rows), 700):
            yield rows[start:start + 700]
    built = {}
    for kind in ("flat", "ivf", "hnsw"):
        index = create_index(DIM, len(rows), kind=kind)
        assert add_batches(index, stream()) == len(rows) and index.ntotal == len(rows)
        built[kind] = index
    return built


def test_default_kind_follows_the_size():
    assert index_kind(create_index(64, 1000)) == "flat"
    big = create_index(64, 1_000_000)
    assert index_kind(big) == "ivf" and big.nlist == default_nlist(1_000_000) == 1024
    with pytest.raises(ValueError):
        create_index(64, kind="ivf")  # cannot size the lists without expected_rows
    with pytest.raises(ValueError):
        create_index(64, kind="pq")


def test_flat_search_equals_brute_force(indexes, rows, queries):
    scores, ids = search(indexes["flat"], queries, 10)
    expected_scores, expected_ids = brute_force(rows, queries, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    one_scores, one_ids = search(indexes["flat"], queries[0], 10)  # a single [d] query
    np.testing.assert_array_equal(one_ids[0], expected_ids[0])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_small_restricted_search_is_exact_for_every_kind(indexes, rows, queries, kind):
    allowed = np.arange(5, len(rows), 7)  # e.g. one label's rows
    scores, ids = search(indexes[kind], queries, 10, allowed_ids=allowed)
    expected_scores, expected_ids = brute_force(rows, queries, 10, allowed)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_large_restricted_search_uses_faiss_selectors(indexes, rows, queries, kind, monkeypatch):
    monkeypatch.setattr(vector_index, "EXACT_SUBSET_MAX", 0)  # force the IDSelector path
    allowed = np.arange(0, len(rows), 2)
    _, ids = search(indexes[kind], queries, 10, allowed_ids=allowed, nprobe=64, ef_search=256)
    assert np.isin(ids, allowed).all()
    _, expected = brute_force(rows, queries, 10, allowed)
    assert recall(ids, expected) > (0.999 if kind == "flat" else 0.8)


def test_restricted_search_pads_when_fewer_rows_qualify(indexes):
    scores, ids = search(indexes["flat"], unit_rows(1, seed=2), 5, allowed_ids=[3, 9, 9, 3])  # duplicates
    assert sorted(ids[0, :2].tolist()) == [3, 9] and ids[0, 2:].tolist() == [-1, -1, -1]
    assert np.isneginf(scores[0, 2:]).all()
    with pytest.raises(ValueError):
        search(indexes["flat"], unit_rows(1, seed=2), 5, allowed_ids=[3000])


def test_hnsw_recall_on_random_data(indexes, rows, queries):
    _, ids = search(indexes["hnsw"], queries, 10)
    assert recall(ids, brute_force(rows, queries, 10)[1]) > 0.9


def test_ivf_recall_on_clustered_data():
    data, probe = clustered_rows(4000, seed=3), clustered_rows(40, seed=4)
    index = build_index(data, DIM, kind="ivf")
    _, ids = search(index, probe, 10)
    assert recall(ids, brute_force(data, probe, 10)[1]) > 0.9


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_roundtrip(indexes, queries, kind, tmp_path):
    path = tmp_path / "nested" / f"{kind}.faiss"
    save_index(indexes[kind], path)
    loaded = load_index(path)
    assert index_kind(loaded) == kind and loaded.ntotal == indexes[kind].ntotal
    for allowed in (None, np.arange(0, 3000, 5)):
        before = search(indexes[kind], queries, 5, allowed_ids=allowed)
        after = search(loaded, queries, 5, allowed_ids=allowed)
        np.testing.assert_array_equal(before[1], after[1])
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "missing.faiss")


def test_ivf_trains_on_a_stream_shorter_than_its_buffer():
    index = create_index(DIM, 10_000, kind="ivf")  # 128 lists -> a 8192-row training buffer
    data = unit_rows(1000, seed=5)
    assert add_batches(index, iter([data[:400], data[400:]])) == 1000 and index.is_trained
    _, ids = search(index, data[:3], 1, nprobe=index.nlist)
    assert ids[:, 0].tolist() == [0, 1, 2]  # ids follow insertion order
    with pytest.raises(ValueError, match="needs at least"):
        add_batches(create_index(DIM, 10_000, kind="ivf"), data[:10])


def test_rows_must_be_unit_norm_and_the_right_width(indexes):
    with pytest.raises(ValueError, match="L2-normalised"):
        add_batches(create_index(DIM), 2 * unit_rows(3, seed=6))
    with pytest.raises(ValueError):
        search(indexes["flat"], unit_rows(1, seed=6, dim=DIM + 1), 3)
