"""Plant a known mark in some images of one label: a ground truth for checking that mining
finds what makes a label distinctive (`diffmine ingest ... --plant-mark LABEL`)."""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from app.ingest.entries import Entry
from app.ingest.errors import IngestError
from app.ingest.images import to_rgb


@dataclass(frozen=True)
class Mark:
    label: str
    fraction: float = 0.5
    #: side of the square mark as a fraction of the image's shorter side
    size: float = 0.3
    seed: int = 0


def plant_marks(entries: list[Entry], mark: Mark) -> list[Entry]:
    """Entries of `mark.label` (a seeded `fraction` of them) get the mark painted at a random
    spot; its box is recorded as a region annotation {"boxes": [[x0, y0, x1, y1, "mark"]]}."""
    carriers = [e for e in entries if mark.label in sum(e.labels.values(), [])]
    if not carriers:
        raise IngestError(f"--plant-mark: no image has the label {mark.label!r}")
    rng = random.Random(mark.seed)
    chosen = set(id(e) for e in rng.sample(carriers, max(1, round(mark.fraction * len(carriers)))))
    return [_marked(e, mark.size, rng.random(), rng.random()) if id(e) in chosen else e
            for e in entries]


def _marked(entry: Entry, size: float, u: float, v: float) -> Entry:
    # The box depends on the image's size, known once it is read: read() records it in
    # `extra`, which the ingest writes after every image has been read.
    extra = dict(entry.extra or {})

    def read() -> bytes:
        image = to_rgb(Image.open(io.BytesIO(entry.read())))
        side = max(3, round(size * min(image.size)))
        x0, y0 = round(u * (image.width - side)), round(v * (image.height - side))
        paint(image, (x0, y0, x0 + side, y0 + side))
        extra["boxes"] = [*entry_boxes(entry), [x0, y0, x0 + side, y0 + side, "mark"]]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    return Entry(path=entry.path, read=read, labels=entry.labels, extra=extra)


def entry_boxes(entry: Entry) -> list:
    return list((entry.extra or {}).get("boxes", []))


def paint(image: Image.Image, box: tuple[int, int, int, int]) -> None:
    """A red square with a yellow cross: nothing like it occurs in the builtin datasets."""
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(220, 30, 30))
    mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
    width = max(1, (x1 - x0) // 6)
    draw.line([x0, mid_y, x1 - 1, mid_y], fill=(255, 220, 0), width=width)
    draw.line([mid_x, y0, mid_x, y1 - 1], fill=(255, 220, 0), width=width)
