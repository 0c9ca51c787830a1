"""What every source yields: one image with its labels, read lazily."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Entry:
    #: path relative to the source root, with forward slashes; shown to users and in exports
    path: str
    #: returns the file's bytes; called once, so a large dataset is never held in memory
    read: Callable[[], bytes]
    #: label set name -> the image's labels in it (several for multi-label sets)
    labels: dict[str, list[str]]
    #: for in-place datasets: the file stays here and is referenced, not copied
    in_place_path: Path | None = None
    #: extra annotations (region boxes, a title) kept with the image
    extra: dict | None = field(default=None)


@dataclass
class LabelSetSpec:
    """How a source wants a label set typed; inferred from the labels when absent."""
    kind: str = "categorical"  # categorical | ordinal | multi
    #: explicit label order (ordinal sets); default: numeric order if numeric, else by name
    order: list[str] | None = None
