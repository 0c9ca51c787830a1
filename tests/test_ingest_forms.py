"""Each way of getting a dataset in: label folders (zip or folder), manifests, in place."""
import json

from sqlalchemy import select

from app.db import session_scope
from app.ingest import ingest_dataset
from app.models import Dataset, Image, ImageLabel, Label, LabelSet
from tests.conftest import label_files, png_bytes, write_folder, write_zip


def _labels_of(settings, dataset_name):
    with session_scope(settings) as session:
        rows = session.execute(
            select(Image.original_path, LabelSet.name, Label.name)
            .join(ImageLabel, ImageLabel.image_id == Image.id)
            .join(Label, Label.id == ImageLabel.label_id)
            .join(LabelSet, LabelSet.id == Label.label_set_id)
            .join(Dataset, Dataset.id == Image.dataset_id).where(Dataset.name == dataset_name))
        out = {}
        for path, set_name, label in rows:
            out.setdefault(path, {}).setdefault(set_name, set()).add(label)
        return out


def test_zip_with_one_folder_per_label(settings, tmp_path):
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 5, "dog": 4}))
    report = ingest_dataset(settings, source=str(archive), name="pets", seed=1)
    assert report.images == 9 and report.duplicates == 0
    assert report.label_sets == {"label": {"cat": 5, "dog": 4}}
    labels = _labels_of(settings, "pets")
    assert labels["cat/0.png"] == {"label": {"cat"}}
    with session_scope(settings) as session:
        images = session.scalars(select(Image)).all()
        for image in images:
            assert (settings.home_dir / image.stored_path).is_file()
            assert (settings.home_dir / image.thumb_path).is_file()
            assert (image.width, image.height) == (32, 32)
        # holdout: at least one per label, seeded
        assert sum(i.split == "holdout" for i in images) == 2


def test_zip_wrapped_in_a_top_folder_is_unwrapped(settings, tmp_path):
    files = {f"export/{k}": v for k, v in label_files({"a": 3, "b": 3}).items()}
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "w.zip", files)), name="w")
    assert report.label_sets == {"label": {"a": 3, "b": 3}}


def test_folder_source_and_os_litter_ignored(settings, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files[".DS_Store"] = b"junk"
    files["__MACOSX/a/._0.png"] = b"junk"
    root = write_folder(tmp_path / "src", files)
    report = ingest_dataset(settings, source=str(root), name="f")
    assert report.images == 6


def test_duplicates_are_reported_and_kept_once(settings, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["b/copy.png"] = files["a/0.png"]
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "d.zip", files)), name="d")
    assert report.images == 6 and report.duplicates == 1
    assert report.duplicate_paths == [("b/copy.png", "a/0.png")]


def test_csv_manifest_with_binned_years_and_multi_labels(settings, tmp_path):
    files = {f"img/{i}.png": png_bytes(i) for i in range(8)}
    years = [1951, 1955, 1958, 1962, 1963, 1969, 1971, 1975]
    tags = ["red|old", "red", "blue|old", "blue", "red|blue", "old", "red", "blue|old"]
    rows = ["path,year,tags"] + [f"img/{i}.png,{y},{t}" for i, (y, t) in enumerate(zip(years, tags))]
    files["manifest.csv"] = "\n".join(rows).encode()
    settings.min_images_per_label = 2
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "m.zip", files)), name="m",
                            bin_years=10, label_columns=["year"])
    assert report.label_sets == {"year": {"1950s": 3, "1960s": 3, "1970s": 2}}
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "m.zip", files)), name="m2",
                            label_columns=["tags"])
    assert report.label_sets["tags"] == {"red": 4, "old": 4, "blue": 4}
    with session_scope(settings) as session:
        kinds = dict(session.execute(select(LabelSet.name, LabelSet.kind)).all())
        order = session.scalars(select(Label.name).join(LabelSet).where(LabelSet.name == "year")
                                .order_by(Label.position)).all()
    assert kinds == {"year": "ordinal", "tags": "multi"}
    assert order == ["1950s", "1960s", "1970s"]
    assert _labels_of(settings, "m2")["img/0.png"] == {"tags": {"red", "old"}}


def test_jsonl_manifest_with_two_label_sets_and_boxes(settings, tmp_path):
    files = {f"{i}.png": png_bytes(i) for i in range(6)}
    lines = [json.dumps({"image": f"{i}.png", "country": "JP" if i % 2 else "FR",
                         "scene": "street" if i < 3 else "park",
                         "boxes": [[0, 0, 5, 5, "sign"]]}) for i in range(6)]
    folder = write_folder(tmp_path / "j", files)
    (folder / "labels.jsonl").write_text("\n".join(lines))
    report = ingest_dataset(settings, source=str(folder), name="j")
    assert report.label_sets == {"country": {"FR": 3, "JP": 3}, "scene": {"street": 3, "park": 3}}
    with session_scope(settings) as session:
        assert session.scalars(select(Image.extra)).first() == {"boxes": [[0, 0, 5, 5, "sign"]]}


def test_in_place_folder_is_referenced_not_copied(settings, tmp_path):
    root = write_folder(tmp_path / "big", label_files({"a": 3, "b": 3}))
    ingest_dataset(settings, source=str(root), name="inplace", in_place=True)
    assert not (settings.home_dir / "images").exists()
    with session_scope(settings) as session:
        dataset = session.scalar(select(Dataset))
        assert dataset.in_place and dataset.root == str(root.resolve())
        for image in session.scalars(select(Image)):
            assert image.stored_path.startswith(str(root.resolve()))
            assert (settings.home_dir / image.thumb_path).is_file()


def test_holdout_is_seeded_and_independent_of_file_order(settings, tmp_path):
    files = label_files({"a": 10, "b": 10})
    reversed_files = dict(reversed(list(files.items())))
    splits = []
    for name, source in (("x", files), ("y", reversed_files)):
        ingest_dataset(settings, source=str(write_zip(tmp_path / f"{name}.zip", source)),
                       name=name, seed=7, holdout=0.3)
        with session_scope(settings) as session:
            splits.append(sorted(session.execute(
                select(Image.sha256).join(Dataset).where(Dataset.name == name,
                                                         Image.split == "holdout")).scalars()))
    assert splits[0] == splits[1] and len(splits[0]) == 6


def test_rgba_images_are_composited_on_white(settings, tmp_path):
    import io

    from PIL import Image as PILImage

    files = label_files({"a": 3, "b": 3})
    clear = PILImage.new("RGBA", (16, 16), (0, 0, 0, 0))
    buffer = io.BytesIO()
    clear.save(buffer, format="PNG")
    files["a/clear.png"] = buffer.getvalue()
    ingest_dataset(settings, source=str(write_zip(tmp_path / "r.zip", files)), name="r")
    with session_scope(settings) as session:
        stored = session.scalar(select(Image.stored_path).where(Image.original_path == "a/clear.png"))
    assert PILImage.open(settings.home_dir / stored).convert("RGB").getpixel((3, 3)) == (255, 255, 255)
