"""Small real datasets for end-to-end tests: a few labels of the builtin Animal-MNIST images,
written as a folder per label (the same files a user would upload)."""
from __future__ import annotations

from pathlib import Path

from app.ingest.builtin import animal_entries


def animal_folder(root: Path, *, labels=("Bird", "Cat", "Elephant"), per_label: int = 16) -> Path:
    entries, _ = animal_entries()
    counts = dict.fromkeys(labels, 0)
    for entry in entries:
        label = entry.labels["animal"][0]
        if label in counts and counts[label] < per_label:
            target = root / label / Path(entry.path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(entry.read())
            counts[label] += 1
    return root
