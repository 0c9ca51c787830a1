"""The database: every result stays linked to the data, model and parameters that produced it.

Large arrays never live here: typicality maps and features are files under the data directory,
embeddings are FAISS index files; rows hold their paths and the row-to-vector mapping.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(Text)
    # In-place datasets reference images under `root` without copying them.
    in_place: Mapped[bool] = mapped_column(Boolean, default=False)
    root: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    label_sets: Mapped[list[LabelSet]] = relationship(back_populates="dataset",
                                                      order_by="LabelSet.id")


class LabelSet(Base):
    """One way of labeling a dataset (category, year...); a dataset can have several."""
    __tablename__ = "label_sets"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    # categorical | ordinal (years, decades: labels have a meaningful order) | multi (several per image)
    kind: Mapped[str] = mapped_column(String(20), default="categorical")

    dataset: Mapped[Dataset] = relationship(back_populates="label_sets")
    labels: Mapped[list[Label]] = relationship(back_populates="label_set",
                                               order_by="Label.position")


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("label_set_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    label_set_id: Mapped[int] = mapped_column(ForeignKey("label_sets.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(500))
    position: Mapped[int] = mapped_column(Integer, default=0)
    image_count: Mapped[int] = mapped_column(Integer, default=0)

    label_set: Mapped[LabelSet] = relationship(back_populates="labels")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "sha256"),
                      Index("ix_images_dataset_split", "dataset_id", "split"))
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    # Relative to the data directory, or absolute for in-place datasets.
    stored_path: Mapped[str] = mapped_column(Text)
    thumb_path: Mapped[str] = mapped_column(Text)
    original_path: Mapped[str] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(10), default="train")  # train | holdout
    # Region annotations from a manifest, e.g. {"boxes": [[x0, y0, x1, y1, "label"], ...]}.
    extra: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class ImageLabel(Base):
    __tablename__ = "image_labels"
    __table_args__ = (Index("ix_image_labels_label", "label_id", "image_id"),)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"),
                                          primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"),
                                          primary_key=True)


class TrainedModel(Base):
    __tablename__ = "trained_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    label_set_id: Mapped[int] = mapped_column(ForeignKey("label_sets.id", ondelete="CASCADE"))
    backend: Mapped[str] = mapped_column(String(40))  # pixel | stable-diffusion
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    weights_dir: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="training")  # training | ready | failed
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class MiningRun(Base):
    __tablename__ = "mining_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("trained_models.id", ondelete="CASCADE"))
    preset: Mapped[str] = mapped_column(String(40), default="paper")
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # scoring | scored | mining | ready | failed
    status: Mapped[str] = mapped_column(String(20), default="scoring")
    # Stages already finished, so a resumed job skips them.
    stages_done: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # {label id: score of the best candidate left out of its top K}: where the cut lies, for
    # each patch's chance to stay in the top K under new draws. Labels that kept all are absent.
    top_k_cuts: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ImageScore(Base):
    """Typicality of one image under one label; the per-location map is a file."""
    __tablename__ = "image_scores"
    __table_args__ = (Index("ix_image_scores_label", "run_id", "label_id", "typicality"),)
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"),
                                        primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"),
                                          primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"),
                                          primary_key=True)
    typicality: Mapped[float] = mapped_column(Float)
    std_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Mean denoising loss under this label (the diffusion classifier takes the argmin).
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    map_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The draws the map and score were computed with (adaptive runs give rows different numbers;
    # NULL: a row from before migration 0004).
    draws: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Patch(Base):
    __tablename__ = "patches"
    __table_args__ = (Index("ix_patches_run_label_score", "run_id", "label_id", "score"),
                      Index("ix_patches_image", "image_id"),
                      # "More like this": FAISS answers feature rows, looked up per run.
                      Index("ix_patches_run_feature", "run_id", "feature_row"))
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"))
    # Box in original image pixels.
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    # Standard error of `score` over the run's draws, and the chance that the patch stays in its
    # label's top K under new draws (worker/engine/settled.py); None before they are computed.
    score_stderr: Mapped[float | None] = mapped_column(Float, nullable=True)
    stay: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Row of this patch's feature in the run's FAISS index.
    feature_row: Mapped[int | None] = mapped_column(Integer, nullable=True)
    crop_path: Mapped[str | None] = mapped_column(Text, nullable=True)


class Cluster(Base):
    __tablename__ = "clusters"
    __table_args__ = (Index("ix_clusters_run_label_rank", "run_id", "label_id", "rank"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"))
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    median_typicality: Mapped[float] = mapped_column(Float)
    # Mean cosine of the members' centred DIFT features to their mean (docs/method.md section 4).
    coherence: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What the rank follows: the median shrunk toward the label's median by the cluster's size.
    ranking_typicality: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Share of the members expected to stay in the label's top K under new draws.
    stability: Mapped[float | None] = mapped_column(Float, nullable=True)
    is_artifact: Mapped[bool] = mapped_column(Boolean, default=False)
    # For ordered labels: {label name: typicality of this cluster's members under it}.
    trend: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ClusterMember(Base):
    __tablename__ = "cluster_members"
    __table_args__ = (Index("ix_cluster_members_order", "cluster_id", "position"),
                      # Which clusters a patch belongs to (the patch page).
                      Index("ix_cluster_members_patch", "patch_id"))
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"),
                                            primary_key=True)
    patch_id: Mapped[int] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"),
                                          primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    distance: Mapped[float] = mapped_column(Float)


class Translation(Base):
    __tablename__ = "translations"
    __table_args__ = (Index("ix_translations_cache", "model_id", "image_id", "settings_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("trained_models.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    patch_id: Mapped[int | None] = mapped_column(ForeignKey("patches.id", ondelete="SET NULL"),
                                                 nullable=True)
    box: Mapped[list | None] = mapped_column(JSON, nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # Hash of (box, params): a repeated click reuses the cached result.
    settings_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    result_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Per target label: {"label": name, "crop": path, "typicality": float}.
    results: Mapped[list | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "status", "priority", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(30))  # ingest | train | score | mine | ... | pipeline
    # queued | running | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(20), default="queued")
    # Higher runs first: interactive work (a clicked translation) overtakes batch work.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    stage: Mapped[str | None] = mapped_column(String(40), nullable=True)
    progress_done: Mapped[float] = mapped_column(Float, default=0)
    progress_total: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    log: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"),
                                                  nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
