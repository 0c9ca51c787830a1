"""Nearest-neighbour search over patch features: "more patches like this one".

An inner-product FAISS index over L2-normalised float32 rows, so scores are cosine similarities.
Rows are identified by their insertion order (row id 0, 1, ...); keep the row -> patch mapping
beside the index.

* Below `EXACT_BELOW` rows: `IndexFlatIP`, exact.
* Above: `IndexIVFFlat` (inner product, ~sqrt(n) lists, `nprobe` of them searched), the default,
  or `IndexHNSWFlat` (inner product, recall set by `ef_search`) on request. Both are approximate.
  Why IVF by default: on 2 CPU cores it builds 1M x 64 rows in seconds (a k-means on a subsample,
  then one assignment per row), where HNSW's graph takes many minutes, and both answer a query in
  about a millisecond (numbers in docs/benchmarks.md, "Mining"). IVF needs training rows before
  it can take any: `add_batches` buffers the first `train_rows` of a stream, trains on them, then
  streams the rest, so the input still never has to be in memory at once.

Restricted search (`allowed_ids`, e.g. one label's rows): a small subset is gathered and searched
exhaustively (exact, and cheaper than scanning or walking the whole index): up to
`EXACT_SUBSET_MAX` rows for IVF/HNSW, up to a `FLAT_SUBSET_FRACTION` of the rows for the flat
index (gathering a row costs about two scans of it). Larger subsets use FAISS's own filtering,
`SearchParameters(sel=IDSelectorBitmap(...))` (`SearchParametersIVF` / `SearchParametersHNSW`),
which the installed faiss-cpu (1.15) supports for all three kinds; a bitmap selector is built
~10x faster than an `IDSelectorBatch` hash set for 100k ids, which matters for single queries.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

#: Below this many rows the exact flat index is used: a flat query scans every row, ~5 ms per
#: 100k x 64 rows on 2 CPU cores, so this keeps exact search within a 10 ms budget.
EXACT_BELOW = 100_000
#: HNSW graph degree, build effort and default search effort.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 96
#: IVF: lists searched per query by default, and training rows per list (FAISS warns below 39).
IVF_NPROBE = 32
IVF_TRAIN_PER_LIST = 64
IVF_SEED = 0
#: Subsets up to this size (IVF, HNSW) or fraction of the rows (flat) are searched exactly from
#: gathered vectors.
EXACT_SUBSET_MAX = 50_000
FLAT_SUBSET_FRACTION = 0.25
#: Rows per `add` call when a single large array is given.
ADD_BATCH = 65_536
#: Tolerance on row norms: rows must be unit vectors for inner product to be cosine similarity.
NORM_TOLERANCE = 1e-3


KINDS = ("flat", "ivf", "hnsw")


def default_nlist(expected_rows: int) -> int:
    """IVF lists for n rows: about sqrt(n), a power of two in [16, 4096] (1M rows -> 1024)."""
    return int(min(4096, max(16, 2 ** round(np.log2(max(expected_rows, 1)) / 2))))


def create_index(dim: int, expected_rows: int = 0, *, kind: str | None = None,
                 exact_below: int = EXACT_BELOW, nlist: int | None = None, hnsw_m: int = HNSW_M,
                 ef_construction: int = HNSW_EF_CONSTRUCTION) -> faiss.Index:
    """An empty inner-product index for `dim`-dimensional rows.

    `kind` is "flat", "ivf" or "hnsw"; by default "flat" below `exact_below` expected rows and
    "ivf" above. IVF gets `nlist` lists (default `default_nlist(expected_rows)`).
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    kind = kind or ("flat" if expected_rows < exact_below else "ivf")
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        if nlist is None and expected_rows < 1:
            raise ValueError("an IVF index needs expected_rows (or nlist) to size its lists")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist or default_nlist(expected_rows), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = IVF_SEED  # seeded k-means: the same rows give the same lists
        index.nprobe = IVF_NPROBE
        index.make_direct_map()  # row id -> vector, for exact search over small subsets
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def index_kind(index: faiss.Index) -> str:
    """"flat", "ivf" or "hnsw" (the kinds this module builds)."""
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    raise TypeError(f"not an index this module builds: {type(index).__name__}")


def add_batches(index: faiss.Index, batches: Iterable[np.ndarray] | np.ndarray) -> int:
    """Append rows batch by batch (any iterable of [n_i, d] arrays, or one array); returns rows added.

    Only one batch is converted at a time, so the input may be a generator over a dataset.
    Rows get ids index.ntotal, index.ntotal + 1, ... in order. An untrained IVF index first
    buffers nlist * `IVF_TRAIN_PER_LIST` rows (or the whole stream, if shorter), trains on them,
    then adds them and the rest.
    """
    if isinstance(batches, np.ndarray):
        array = batches
        batches = (array[start:start + ADD_BATCH] for start in range(0, len(array), ADD_BATCH))
    pending: list[np.ndarray] = []  # rows waiting for an IVF index to be trained
    pending_rows = added = 0
    for batch in batches:
        rows = _unit_rows(batch, index.d, "batch")
        if index.is_trained:
            index.add(rows)
            added += len(rows)
            continue
        pending.append(rows)
        pending_rows += len(rows)
        if pending_rows >= index.nlist * IVF_TRAIN_PER_LIST:
            added += _train_and_add(index, pending)
            pending = []
    if pending:
        added += _train_and_add(index, pending)
    return added


def _train_and_add(index: faiss.Index, pending: list[np.ndarray]) -> int:
    rows = np.concatenate(pending)
    if len(rows) < index.nlist:
        raise ValueError(f"an IVF index with {index.nlist} lists needs at least {index.nlist} rows "
                         f"to train, got {len(rows)}; use kind='flat' for so few rows")
    index.train(rows)
    index.add(rows)
    return len(rows)


def build_index(batches: Iterable[np.ndarray] | np.ndarray, dim: int, expected_rows: int = 0,
                **options) -> faiss.Index:
    """`create_index` + `add_batches`. Pass `expected_rows` (or `kind`) when `batches` is a stream."""
    if isinstance(batches, np.ndarray):
        expected_rows = max(expected_rows, len(batches))
    index = create_index(dim, expected_rows, **options)
    add_batches(index, batches)
    return index


def search(index: faiss.Index, query: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, *,
           nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows for each query: (scores [q, k] float32, ids [q, k] int64), best first.

    `query` is [q, d] or [d], unit-norm. `allowed_ids` restricts the results to those row ids
    (see the module docstring for how). When fewer than k rows qualify the tail is padded with
    id -1 and score -inf. `nprobe` (IVF) and `ef_search` (HNSW, raised to at least k) override
    the search effort.
    """
    queries = _unit_rows(np.atleast_2d(query), index.d, "query")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    kind = index_kind(index)
    selector = bitmap = None
    if allowed_ids is not None:
        requested = np.asarray(allowed_ids, dtype=np.int64).ravel()
        if len(requested) and (requested.min() < 0 or requested.max() >= index.ntotal):
            raise ValueError(f"allowed_ids must be row ids in [0, {index.ntotal})")
        # A membership mask dedupes and sorts in O(n) (np.unique's sort is slower at 100k ids).
        member = np.zeros(index.ntotal, dtype=bool)
        member[requested] = True
        allowed = np.flatnonzero(member)
        gather_limit = EXACT_SUBSET_MAX
        if kind == "flat":  # the alternative is a scan of every row, so gather more before giving up
            gather_limit = max(gather_limit, index.ntotal * FLAT_SUBSET_FRACTION)
        if len(allowed) <= gather_limit:
            return _search_subset(index, queries, k, allowed)
        bitmap = np.packbits(member, bitorder="little")  # FAISS reads bit (id & 7) of byte id >> 3
        selector = faiss.IDSelectorBitmap(bitmap)  # holds a pointer into `bitmap`: keep it alive
    if kind == "flat":
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
    elif kind == "ivf":
        params = faiss.SearchParametersIVF(nprobe=nprobe or index.nprobe)
        if selector is not None:
            params.sel = selector
    else:
        params = faiss.SearchParametersHNSW(efSearch=max(ef_search or index.hnsw.efSearch, k))
        if selector is not None:
            params.sel = selector
    scores, ids = index.search(queries, k, params=params)
    del bitmap  # only now may the selector's bitmap go
    return _padded(scores, ids)


def _search_subset(index: faiss.Index, queries: np.ndarray, k: int,
                   allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact search over a few rows: reconstruct them and take inner products."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    if len(allowed) == 0:
        return scores, ids
    vectors = index.reconstruct_batch(allowed)
    found_scores, found = faiss.knn(queries, vectors, min(k, len(allowed)), metric=faiss.METRIC_INNER_PRODUCT)
    scores[:, :found.shape[1]] = found_scores
    ids[:, :found.shape[1]] = np.where(found >= 0, allowed[np.maximum(found, 0)], -1)
    return scores, ids


def _padded(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # FAISS pads missing results with id -1 and, for inner product, score -3.4e38; use -inf.
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    return scores, ids.astype(np.int64)


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write the index (kind, parameters and all rows) to one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))


def load_index(path: str | Path) -> faiss.Index:
    """Read what `save_index` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    index = faiss.read_index(str(path))
    index_kind(index)  # fails loudly on an index this module did not build
    return index


def _unit_rows(rows: np.ndarray, dim: int, name: str) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"{name} must be [n, {dim}], got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1)
    if not np.isfinite(norms).all() or (np.abs(norms - 1) > NORM_TOLERANCE).any():
        raise ValueError(f"{name} rows must be L2-normalised (use faiss.normalize_L2 or crop_features' output)")
    return rows
