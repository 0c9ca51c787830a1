"""A small in-process cache for the gallery's cluster pages, kept right across processes.

A ready run's clusters change in two ways only: the mining job rebuilds them (which rewrites the
run's index.faiss, and the run is not "ready" meanwhile), or someone marks a cluster as an
artifact (which adds a byte to the run's `gallery.stamp`). The index's modification time and the
stamp's size are part of
every key, so any server process sees a change at its next request; nothing is cached while a run
is not ready.
"""
from __future__ import annotations

import os
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


class PageCache:
    def __init__(self, size: int = 2048):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
