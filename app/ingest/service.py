"""Ingest a dataset all-or-nothing: files are staged, rows written in one transaction, and any
error removes both, so a failed upload leaves the database and data folder as they were."""
from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from app.db import open_database, session_scope
from app.ingest.builtin import builtin_source
from app.ingest.entries import Entry, LabelSetSpec, label_name
from app.ingest.errors import IngestError
from app.ingest.images import check_image, content_path, thumb_suffix, write_thumbnail
from app.ingest.manifest import ManifestOptions
from app.ingest.plant import Mark, plant_marks
from app.ingest.sources import open_source, source_limits
from app.ingest.staging import PUBLISHED, PUBLISHED_FOLDERS, claim, discard_if_abandoned, pause_point
from app.models import Dataset, Image, ImageLabel, Label, LabelSet
from app.settings import Settings

Progress = Callable[[int, int], None]
NUMBER_PREFIX = re.compile(r"^-?\d+(\.\d+)?")


@dataclass
class IngestReport:
    dataset: str
    images: int
    duplicates: int
    label_sets: dict[str, dict[str, int]]
    duplicate_paths: list[tuple[str, str]] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"dataset": self.dataset, "images": self.images, "duplicates": self.duplicates,
                "label_sets": self.label_sets,
                "duplicate_paths": [list(p) for p in self.duplicate_paths[:100]]}


@dataclass
class _Kept:
    entry: Entry
    sha256: str
    width: int
    height: int
    stored_path: str
    thumb_path: str
    split: str = "train"


def ingest_dataset(settings: Settings, *, source: str, name: str, manifest: str | None = None,
                   path_column: str | None = None, label_columns: Iterable[str] = (),
                   bin_years: int | None = None, multi_sep: str = "|", holdout: float = 0.1,
                   in_place: bool = False, seed: int = 0, limit_per_label: int | None = None,
                   render_size: int | None = None,
                   min_images_per_label: int | None = None, staging_key: str | None = None,
                   plant_mark: str | None = None, plant_fraction: float = 0.5,
                   plant_size: float = 0.3,
                   progress: Progress | None = None) -> IngestReport:
    name = _check_name(name)
    if not 0 <= holdout < 1:
        raise IngestError(f"holdout fraction must be in [0, 1), got {holdout}")
    with _nothing_new_on_failure(settings):
        with session_scope(settings) as session:
            if session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
                raise IngestError(f"a dataset named {name!r} already exists")

        if source.startswith("builtin:"):
            entries, specs, close = builtin_source(source.removeprefix("builtin:"),
                                                   limit_per_label=limit_per_label, seed=seed,
                                                   render_size=render_size)
        else:
            if render_size is not None:
                raise IngestError("a render size applies to builtin:twemoji only (its SVGs), "
                                  f"not to {source}")
            options = ManifestOptions(path_column=path_column, label_columns=list(label_columns),
                                      bin_years=bin_years, multi_sep=multi_sep)
            entries, specs, close = open_source(Path(source), manifest=Path(manifest) if manifest else None,
                                                options=options, limits=source_limits(settings),
                                                in_place=in_place,
                                                manifest_name=_manifest_name(settings, manifest))
        try:
            entries, specs = _named_labels(entries, specs)
        except BaseException:
            close()
            raise
        if plant_mark:
            entries = plant_marks(entries, Mark(plant_mark, plant_fraction, plant_size, seed))
        # A job passes its own key, so a retry after a killed worker clears the dead attempt's files.
        staging = settings.staging_dir / (staging_key or uuid.uuid4().hex)
        discard_if_abandoned(settings, staging)
        # Ours until removed: a sweep (diffmine doctor) leaves a folder alone while it is held.
        owner = claim(staging, "ingest")
        try:
            kept, duplicates = _stage_images(settings, entries, staging, progress)
            pause_point("staged")
            label_sets = _label_sets(kept, specs, min_images_per_label or settings.min_images_per_label)
            _assign_holdout(kept, next(iter(label_sets)), holdout, seed)
            _check_every_label_trains(kept, label_sets, holdout)
            _commit(settings, name=name, source=source, in_place=in_place, kept=kept,
                    label_sets=label_sets, specs=specs, staging=staging)
        finally:
            close()
            shutil.rmtree(staging, ignore_errors=True)
            owner.release()
        return IngestReport(dataset=name, images=len(kept), duplicates=len(duplicates),
                            duplicate_paths=duplicates,
                            label_sets={s: dict(c) for s, c in label_sets.items()})


def default_dataset_name(source: str) -> str:
    """The name a dataset gets when none is given: builtin:NAME -> NAME, a zip or CSV file -> its
    file name without the suffix, a folder -> the folder's name."""
    if source.startswith("builtin:"):
        return source.removeprefix("builtin:")
    path = Path(source)
    # resolve() so that "." or "photos/" name the folder itself
    return path.resolve().name if path.is_dir() else path.stem


@contextmanager
def _nothing_new_on_failure(settings: Settings) -> Iterator[None]:
    """Bad input leaves nothing behind. The ingest's own staged files go in any case (see
    ingest_dataset). When this process created the database (and perhaps the data folder), it
    holds the database's exclusive lock until the ingest ends, so that nobody else used them
    meanwhile, and a failure removes them (app/db.py open_database); a database or folder that
    another process made, or that was there before, is kept. The staging folder, once empty,
    goes after a successful ingest too."""
    # Only ever removed empty: another ingest may be staging its own files in it meanwhile.
    staging_created = not settings.staging_dir.exists()
    try:
        with open_database(settings, undo_on_error=True):
            yield
    finally:
        if staging_created:
            _remove_if_empty(settings.staging_dir)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (another ingest or an upload is staging there) or already gone


def _manifest_name(settings: Settings, manifest: str | None) -> str | None:
    """What errors call a manifest given by path: the path as given, or for a manifest uploaded
    on the web (staged in the data folder), the file's name as the browser sent it."""
    if manifest is None:
        return None
    if Path(manifest).resolve().is_relative_to(settings.staging_dir):
        return Path(manifest).name
    return manifest


def _named_labels(entries: list[Entry], specs: dict[str, LabelSetSpec]
                  ) -> tuple[list[Entry], dict[str, LabelSetSpec]]:
    """Label and label-set names in Unicode NFC and within MAX_LABEL_CHARS, from every source
    (folder names, manifest cells and columns, builtins), before any image is read."""
    for entry in entries:
        entry.labels = {label_name(set_name, path=entry.path, what="label set"):
                        [label_name(label, path=entry.path) for label in labels]
                        for set_name, labels in entry.labels.items()}
    return entries, {label_name(set_name, path=set_name, what="label set"): spec
                     for set_name, spec in specs.items()}


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 200 or any(ord(ch) < 32 for ch in name):
        raise IngestError("dataset name must be 1-200 printable characters")
    return name


def _stage_images(settings: Settings, entries: list[Entry], staging: Path,
                  progress: Progress | None) -> tuple[list[_Kept], list[tuple[str, str]]]:
    if not entries:
        raise IngestError("no images found")
    kept: dict[str, _Kept] = {}
    duplicates: list[tuple[str, str]] = []
    for number, entry in enumerate(entries, 1):
        data = entry.read()
        checked = check_image(data, path=entry.path, max_pixels=settings.max_image_pixels)
        if checked.sha256 in kept:
            duplicates.append((entry.path, kept[checked.sha256].entry.path))
        else:
            kept[checked.sha256] = _stage_one(settings, entry, data, checked, staging)
        # Let go of this image's pixels and bytes before the next one is read (a rebinding
        # would keep them alive while the next image decodes).
        del data, checked
        if progress:
            progress(number, len(entries))
    return list(kept.values()), duplicates


def _stage_one(settings, entry: Entry, data: bytes, checked, staging: Path) -> _Kept:
    small = max(checked.width, checked.height) <= settings.thumbnail_px
    thumb_rel = "thumbs/" + content_path(checked.sha256, thumb_suffix((checked.width, checked.height)))
    if not (small and entry.in_place_path is None) and not _link_existing(settings, thumb_rel, staging):
        write_thumbnail(checked.rgb, staging / thumb_rel, settings.thumbnail_px)
    if entry.in_place_path is not None:
        # Referenced, not copied: the engine's loader converts to RGB when it reads the file.
        stored = str(entry.in_place_path.resolve())
    else:
        stored = "images/" + content_path(checked.sha256, checked.suffix)
        if not _link_existing(settings, stored, staging):
            target = staging / stored
            target.parent.mkdir(parents=True, exist_ok=True)
            checked.write(target, data)
    # An image already thumbnail-sized (and inside the data folder) is its own thumbnail.
    if small and entry.in_place_path is None:
        thumb_rel = stored
    return _Kept(entry=entry, sha256=checked.sha256, width=checked.width, height=checked.height,
                 stored_path=stored, thumb_path=thumb_rel)


def _link_existing(settings: Settings, relative: str, staging: Path) -> bool:
    """True when the data folder already has this content-addressed file (another dataset's).
    A hard link to it is staged where the file system allows, so that the ingest still has the
    file if a sweep deletes it as unreferenced before this ingest's rows are committed."""
    existing = settings.home_dir / relative
    if not existing.exists():
        return False
    target = staging / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(existing, target)
    except FileNotFoundError:
        return False  # swept just now: stage our own copy
    except OSError:
        pass  # no hard links here: rely on the file (checked again under the lock at publish)
    return True


def _label_sets(kept: list[_Kept], specs: dict[str, LabelSetSpec],
                min_images: int) -> dict[str, Counter]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for item in kept:
        for set_name, labels in item.entry.labels.items():
            counts[set_name].update(set(labels))
    if not counts:
        raise IngestError("no labels found")
    for set_name, counter in counts.items():
        if len(counter) < 2:
            raise IngestError(f"label set {set_name!r} has a single label "
                              f"({', '.join(counter) or 'none'}); typicality compares labels, "
                              f"so at least two are needed")
        few = {label: n for label, n in counter.items() if n < min_images}
        if few:
            raise IngestError(f"label set {set_name!r}: label(s) with fewer than {min_images} "
                              f"images: " + ", ".join(f"{k!r} ({v})" for k, v in sorted(few.items())))
    return dict(counts)


def label_order(labels: Iterable[str], spec: LabelSetSpec | None) -> list[str]:
    labels = list(labels)
    if spec and spec.order:
        return [label for label in spec.order if label in labels] + sorted(set(labels) - set(spec.order))
    if all(NUMBER_PREFIX.match(entry) for entry in labels):
        return sorted(labels, key=lambda label: (float(NUMBER_PREFIX.match(label).group()), label))
    return sorted(labels, key=lambda label: (label.casefold(), label))


def label_set_kind(set_name: str, kept: list[_Kept], spec: LabelSetSpec | None) -> str:
    if any(len(item.entry.labels.get(set_name, [])) > 1 for item in kept):
        return "multi"
    if spec:
        return spec.kind
    labels = {label for item in kept for label in item.entry.labels.get(set_name, [])}
    return "ordinal" if all(NUMBER_PREFIX.match(label) for label in labels) else "categorical"


def _assign_holdout(kept: list[_Kept], primary_set: str, fraction: float, seed: int) -> None:
    """Seeded holdout per label of the first label set, independent of input order."""
    groups: dict[str, list[_Kept]] = defaultdict(list)
    for item in kept:
        groups[min(item.entry.labels.get(primary_set) or [""])].append(item)
    rng = random.Random(seed)
    for label in sorted(groups):
        members = sorted(groups[label], key=lambda k: k.entry.holdout_key() if k.entry.holdout_key else k.sha256)
        rng.shuffle(members)
        count = max(1, round(fraction * len(members))) if fraction > 0 and len(members) > 1 else 0
        for item in members[:count]:
            item.split = "holdout"


def _check_every_label_trains(kept: list[_Kept], label_sets: dict[str, Counter],
                              fraction: float) -> None:
    """A model may be trained on any label set: each of its labels needs a training image."""
    training: dict[str, Counter] = defaultdict(Counter)
    for item in kept:
        if item.split == "train":
            for set_name, labels in item.entry.labels.items():
                training[set_name].update(set(labels))
    for set_name, counter in label_sets.items():
        for label in sorted(counter):
            if not training[set_name][label]:
                raise IngestError(
                    f"holdout fraction {fraction} leaves label {label!r} (label set {set_name!r}) "
                    f"with no training images: all {counter[label]} of its images are held out; "
                    f"use a smaller holdout fraction" + (" or another seed" if len(label_sets) > 1 else ""))


def _commit(settings: Settings, *, name, source, in_place, kept, label_sets, specs, staging) -> None:
    moved: list[Path] = []
    try:
        with _name_unique(settings, name), session_scope(settings) as session:
            dataset = Dataset(name=name, source=source, in_place=in_place,
                              root=str(Path(source).resolve()) if in_place else None,
                              image_count=len(kept))
            session.add(dataset)
            session.flush()
            label_ids = _insert_labels(session, dataset.id, kept, label_sets, specs)
            image_ids = session.scalars(
                insert(Image).returning(Image.id, sort_by_parameter_order=True),
                [dict(dataset_id=dataset.id, sha256=k.sha256, stored_path=k.stored_path,
                      thumb_path=k.thumb_path, original_path=k.entry.path, width=k.width,
                      height=k.height, split=k.split, extra=k.entry.extra) for k in kept]).all()
            links = [{"image_id": image_id, "label_id": label_ids[(set_name, label)]}
                     for image_id, item in zip(image_ids, kept)
                     for set_name, labels in item.entry.labels.items() for label in set(labels)]
            if links:
                session.execute(insert(ImageLabel), links)
            # The rows' inserts hold the database's write lock until the commit: no sweep
            # deletes a file between the move and the commit (app/ingest/staging.py).
            staged = _publish(staging, settings.home_dir, moved)
            _check_present(settings.home_dir, kept, staged)
            pause_point("published")
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise


@contextmanager
def _name_unique(settings: Settings, name: str) -> Iterator[None]:
    """Another ingest of the same name may commit between the check at the start and this one's
    commit: its unique constraint then refuses this one, with the same clear message."""
    try:
        yield
    except IntegrityError:
        with session_scope(settings) as session:
            taken = session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None
        if taken:
            raise IngestError(f"a dataset named {name!r} already exists") from None
        raise


def _insert_labels(session, dataset_id: int, kept, label_sets, specs) -> dict[tuple[str, str], int]:
    ids = {}
    for set_name, counter in label_sets.items():
        spec = specs.get(set_name)
        label_set = LabelSet(dataset_id=dataset_id, name=set_name,
                             kind=label_set_kind(set_name, kept, spec))
        session.add(label_set)
        session.flush()
        for position, label in enumerate(label_order(counter, spec)):
            row = Label(label_set_id=label_set.id, name=label, position=position,
                        image_count=counter[label])
            session.add(row)
            session.flush()
            ids[(set_name, label)] = row.id
    return ids


def _publish(staging: Path, home: Path, moved: list[Path]) -> set[str]:
    """Move staged files into the data folder, adding the ones this ingest created to `moved`;
    return every staged path (relative). The moved ones are listed first (PUBLISHED, in the
    staging folder), so that if this process dies before its commit, the sweep finds the files
    no row references."""
    staged = sorted(p for folder in PUBLISHED_FOLDERS for p in (staging / folder).rglob("*")
                    if p.is_file())
    relative = {p.relative_to(staging).as_posix() for p in staged}
    moving = [path for path in staged if not (home / path.relative_to(staging)).exists()]
    if moving:
        (staging / PUBLISHED).write_text("".join(f"{p.relative_to(staging).as_posix()}\n" for p in moving))
    for path in moving:
        target = home / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        moved.append(target)
    return relative


def _check_present(home: Path, kept: list[_Kept], staged: set[str]) -> None:
    """Every file the new rows reference is in the data folder: the staged ones were moved
    there or found there; the others (where no hard link could be staged) are checked here,
    under the write lock, so they stay until the commit."""
    for item in kept:
        for relative in (item.stored_path, item.thumb_path):
            if relative in staged or Path(relative).is_absolute():
                continue
            if not (home / relative).is_file():
                raise IngestError(f"{relative} was removed from the data folder while this ingest "
                                  f"ran (a sweep found no row for it); ingest again",
                                  path=item.entry.path)
