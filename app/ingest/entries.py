"""What every source yields: one image with its labels, read lazily."""
from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.ingest.errors import IngestError


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
    #: what the holdout draw sorts the image by (default: its pixels' sha256): a source whose
    #: images can be made at several sizes gives a key that stays, so the same images are held
    #: out at every size
    holdout_key: Callable[[], str] | None = field(default=None)


@dataclass
class LabelSetSpec:
    """How a source wants a label set typed; inferred from the labels when absent."""
    kind: str = "categorical"  # categorical | ordinal | multi
    #: explicit label order (ordinal sets); default: numeric order if numeric, else by name
    order: list[str] | None = None


#: The longest label (and label-set) name accepted. A label becomes part of a text prompt, and
#: Stable Diffusion's text encoder reads at most 77 tokens: 100 characters of English are about
#: 25 tokens, which leaves room for the prompt template and for several labels of one image.
MAX_LABEL_CHARS = 100


def label_name(name: str, *, path: str, what: str = "label") -> str:
    """A label or label-set name as stored: Unicode NFC (so "café" typed precomposed and "café"
    with a combining accent, as macOS writes file names, are one label), and not over the limit."""
    name = unicodedata.normalize("NFC", name)
    if len(name) > MAX_LABEL_CHARS:
        raise IngestError(f"{what} {name[:40] + '…'!r} is {len(name)} characters, more than the "
                          f"limit of {MAX_LABEL_CHARS}", path=path)
    return name
