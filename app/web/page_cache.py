"""An in-process cache for the gallery's cluster pages (and label menus, sample thumbnails),
bounded by bytes (DIFFMINE_PAGE_CACHE_BYTES) and kept right across processes.

A ready run's clusters change in two ways only: the mining job rebuilds them (which rewrites the
run's index.faiss, and the run is not "ready" meanwhile), or someone marks a cluster as an
artifact (which adds a byte to the run's `gallery.stamp`). The index's modification time and the
stamp's size are part of
every key, so any server process sees a change at its next request; nothing is cached while a run
is not ready.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path

STAMP = "gallery.stamp"


def run_version(runs_dir: Path, run: dict) -> tuple | None:
    """What a cached page of this run depends on, or None when the run may still change."""
    if run["status"] != "ready":
        return None
    folder = runs_dir / str(run["id"])
    try:
        index = os.stat(folder / "index.faiss").st_mtime_ns
    except FileNotFoundError:
        index = 0
    try:
        stamp = os.stat(folder / STAMP).st_size  # grows by a byte at each change
    except FileNotFoundError:
        stamp = 0
    return (run["id"], index, stamp)


def touch(runs_dir: Path, run_id: int) -> None:
    """Tell every server process that this run's clusters changed."""
    folder = runs_dir / str(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / STAMP, "ab") as stamp:
        stamp.write(b".")


def approximate_size(value) -> int:
    """Roughly the bytes `value` holds in memory: sys.getsizeof of it and of everything in its
    dicts, lists, tuples and sets, each object counted once."""
    seen: set[int] = set()
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return total


class PageCache:
    """An LRU bounded by the bytes it holds (`approximate_size` of each key and value), not by
    its number of entries: a gallery page of 50 clusters with 200 members each takes about
    10 MB, one of 5 with 10 a few tens of KB. A value larger than `max_fraction` of the bound is
    not kept (it would push out most of the rest for one page); a bound of 0 keeps nothing."""

    def __init__(self, max_bytes: int = 64 * 2**20, *, max_fraction: float = 0.25):
        self.max_bytes = max_bytes
        self.max_entry_bytes = int(max_bytes * max_fraction)
        self.items: OrderedDict = OrderedDict()  # key -> (value, its size)
        self.bytes = 0  # the sum of the sizes held: never above max_bytes
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            entry = self.items.get(key)
            if entry is None:
                return None
            self.items.move_to_end(key)
            return entry[0]

    def put(self, key, value) -> bool:
        """Keep `value` under `key` (pushing out the least recently used entries as needed);
        False when it is too large to keep."""
        size = approximate_size(key) + approximate_size(value)
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_entry_bytes:
                return False
            self.items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self.items.popitem(last=False)
                self.bytes -= dropped
            return True
