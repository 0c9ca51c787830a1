"""Read-side queries about datasets, shared by the CLI and the web views."""
from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, selectinload

from app.db import session_scope, upgrade
from app.models import Dataset, Image, ImageLabel, Label, LabelSet
from app.settings import Settings


def _label_set_json(label_set: LabelSet) -> dict:
    return {"id": label_set.id, "name": label_set.name, "kind": label_set.kind,
            "labels": [{"id": label.id, "name": label.name, "images": label.image_count}
                       for label in label_set.labels]}


def dataset_json(dataset: Dataset) -> dict:
    return {"id": dataset.id, "name": dataset.name, "images": dataset.image_count,
            "source": dataset.source, "in_place": dataset.in_place,
            "created_at": dataset.created_at.isoformat(timespec="seconds"),
            "label_sets": [_label_set_json(s) for s in dataset.label_sets]}


def _with_labels():
    return selectinload(Dataset.label_sets).selectinload(LabelSet.labels)


def datasets_query():
    return select(Dataset).options(_with_labels()).order_by(Dataset.id)


def list_datasets(settings: Settings) -> list[dict]:
    upgrade(settings)
    with session_scope(settings) as session:
        rows = session.scalars(datasets_query())
        return [dataset_json(d) for d in rows]


def dataset_by_name(settings: Settings, name: str) -> dict | None:
    upgrade(settings)
    with session_scope(settings) as session:
        dataset = session.scalar(select(Dataset).options(_with_labels())
                                 .where(Dataset.name == name))
        return dataset_json(dataset) if dataset else None


def load_dataset(session: Session, dataset_id: int) -> Dataset | None:
    return session.scalar(select(Dataset).options(_with_labels()).where(Dataset.id == dataset_id))


#: One statement, compiled once, run per label with Core rows (no ORM objects per image).
_LABEL_SAMPLES = (select(Image.id, Image.thumb_path.label("thumb"), Image.original_path.label("path"))
                  .join(ImageLabel, ImageLabel.image_id == Image.id)
                  .where(ImageLabel.label_id == bindparam("label_id"))
                  .order_by(Image.id).limit(bindparam("limit")))


def label_samples(session: Session, label_ids: list[int], *, per_label: int = 8) -> dict[int, list[dict]]:
    """The first `per_label` images (id, thumb, path) of each label, each an index range scan.
    One query per label on purpose: one window-function query over all labels would read every
    image-label row of the dataset to keep 8 per label."""
    connection = session.connection()
    return {label_id: [row._asdict() for row in connection.execute(
        _LABEL_SAMPLES, {"label_id": label_id, "limit": per_label})] for label_id in label_ids}


def dataset_samples(session: Session, dataset_id: int, *, limit: int) -> list[Image]:
    return list(session.scalars(select(Image).where(Image.dataset_id == dataset_id)
                                .order_by(Image.id).limit(limit)))


def label_images(session: Session, label_id: int, *, offset: int, limit: int) -> list[Image]:
    return list(session.scalars(
        select(Image).join(ImageLabel, ImageLabel.image_id == Image.id)
        .where(ImageLabel.label_id == label_id).order_by(Image.id).offset(offset).limit(limit)))


def get_label(session: Session, label_id: int) -> Label | None:
    return session.get(Label, label_id)


def dataset_id_by_name(session: Session, name: str) -> int | None:
    return session.scalar(select(Dataset.id).where(Dataset.name == name))
