"""Models and mining runs as rows: creating them (before their job runs) and the queries the
worker needs to feed the engine. Nothing here imports torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs import enqueue, lock_queue, pending_job
from app.models import Cluster, Dataset, Image, ImageLabel, Job, Label, LabelSet, MiningRun, TrainedModel
from app.params import MineOptions, RunParams, TrainConfig, check_side_multiple
from app.settings import Settings


class NotFound(LookupError):
    pass


def find_dataset(session: Session, ref: str | int) -> Dataset:
    query = select(Dataset).where(Dataset.id == int(ref) if str(ref).isdigit() else Dataset.name == ref)
    dataset = session.scalar(query)
    if dataset is None:
        raise NotFound(f"no dataset {ref!r} (see: diffmine datasets)")
    return dataset


def find_label_set(session: Session, dataset: Dataset, name: str | None) -> LabelSet:
    sets = {s.name: s for s in dataset.label_sets}
    if name is None and len(sets) == 1:
        return next(iter(sets.values()))
    if name not in sets:
        raise NotFound(f"dataset {dataset.name!r} has no label set {name!r}; "
                       f"choose one of {sorted(sets)}")
    return sets[name]


def create_model(session: Session, settings: Settings, *, dataset: Dataset, label_set: LabelSet,
                 backend: str, config: dict) -> TrainedModel:
    """A model row; `config` is TrainConfig's fields, None or absent for the backend's default."""
    recipe = TrainConfig.for_backend(backend, **config)
    model = TrainedModel(dataset_id=dataset.id, label_set_id=label_set.id, backend=backend,
                         config=stored_config(recipe),
                         weights_dir="", status="queued")
    session.add(model)
    session.flush()
    model.weights_dir = f"models/{model.id}/weights"
    return model


def create_run(session: Session, *, model: TrainedModel, params: RunParams) -> MiningRun:
    if params.image_size is not None:
        check_side_multiple(model.backend, params.image_size, "image size")
    run = MiningRun(model_id=model.id, preset=params.preset, params=params.given(), status="queued")
    session.add(run)
    session.flush()
    return run


def labels_of(session: Session, label_set_id: int) -> list[Label]:
    return list(session.scalars(select(Label).where(Label.label_set_id == label_set_id)
                                .order_by(Label.position)))


@dataclass
class Example:
    image_id: int
    path: str
    label_indices: list[int]


def examples(session: Session, settings: Settings, *, label_set_id: int, split: str | None = None,
             after_id: int = 0, limit: int | None = None, per_label: int | None = None,
             seed: int = 0) -> list[Example]:
    """Images with their label indices in one label set, in image-id order. `after_id` and
    `limit` read a dataset shard by shard, never all of it at once; `per_label`: only the images
    of a seeded sample of at most that many per label (`sampled_ids`)."""
    labels = labels_of(session, label_set_id)
    index = {label.id: i for i, label in enumerate(labels)}
    ids = (select(ImageLabel.image_id).join(Image, Image.id == ImageLabel.image_id)
           .where(ImageLabel.label_id.in_(index), ImageLabel.image_id > after_id)
           .group_by(ImageLabel.image_id).order_by(ImageLabel.image_id))
    if split:
        ids = ids.where(Image.split == split)
    if per_label is not None:
        ids = ids.where(ImageLabel.image_id.in_(sampled_ids(list(index), per_label, seed)))
    if limit is not None:
        ids = ids.limit(limit)
    rows = session.execute(
        select(Image.id, Image.stored_path, ImageLabel.label_id)
        .join(ImageLabel, ImageLabel.image_id == Image.id)
        .where(Image.id.in_(ids.scalar_subquery()), ImageLabel.label_id.in_(index))
        .order_by(Image.id, ImageLabel.label_id))
    grouped: dict[int, Example] = {}
    for image_id, stored, label_id in rows:
        example = grouped.setdefault(image_id, Example(image_id, str(settings.home_dir / stored), []))
        example.label_indices.append(index[label_id])
    return list(grouped.values())


def sampled_ids(label_ids: list[int], per_label: int, seed: int):
    """A query of the ids of at most `per_label` images of each label, in an order that is a
    seeded hash of the image id: the same seed picks the same images, computed in the database
    (a window per label), so no id list is held in memory."""
    # A multiplicative hash modulo a prime below 2^32, its multiplier drawn from the seed (an
    # added seed would only rotate the order); below 2^32 both, so the product fits in SQLite's
    # 64-bit integers for any image id under 2^31.
    multiplier = (2654435761 + seed * 2246822519) % 4294967291 or 1
    shuffled = (ImageLabel.image_id * multiplier) % 4294967291
    ranked = (select(ImageLabel.image_id, func.row_number().over(
                  partition_by=ImageLabel.label_id, order_by=(shuffled, ImageLabel.image_id)).label("rank"))
              .where(ImageLabel.label_id.in_(label_ids)).subquery())
    return select(ranked.c.image_id).where(ranked.c.rank <= per_label)


# --- launching work: rows first, then the job that fills them --------------------------------
# A launch that asks for what a queued or running job already does (a double-clicked form, a
# command run twice) gets that job and its rows back, not a second set: the check and the new
# rows are made under the queue's write lock (app/jobs.py), so concurrent requests agree.
def new_model(session: Session, settings: Settings, *, dataset: str | int, label_set: str | None,
              backend: str = "pixel", **config) -> TrainedModel:
    ds = find_dataset(session, dataset)
    ls = find_label_set(session, ds, label_set)
    return create_model(session, settings, dataset=ds, label_set=ls, backend=backend, config=config)


def new_run(session: Session, *, model_id: int, params: RunParams) -> MiningRun:
    model = session.get(TrainedModel, model_id)
    if model is None:
        raise NotFound(f"no model {model_id}")
    return create_run(session, model=model, params=params)


def stored_config(recipe: TrainConfig) -> dict:
    """A model's config as stored: what differs from the defaults, with its seed and its view
    always written (a later change of a default never reinterprets a stored model)."""
    return recipe.given() | {"seed": recipe.seed, "view": recipe.view}


def _same_model(session: Session, model_id: int | None, *, dataset: str | int, label_set: str | None,
                backend: str, config: dict) -> bool:
    """Whether model `model_id` is the one these options would create."""
    model = session.get(TrainedModel, model_id) if model_id else None
    if model is None:
        return False
    ds = find_dataset(session, dataset)
    ls = find_label_set(session, ds, label_set)
    recipe = TrainConfig.for_backend(backend, **config)
    return (model.dataset_id, model.label_set_id, model.backend, model.config) == \
        (ds.id, ls.id, backend, stored_config(recipe))


def _same_run(session: Session, run_id: int | None, *, model_id: int, params: RunParams) -> bool:
    run = session.get(MiningRun, run_id) if run_id else None
    return run is not None and run.model_id == model_id and run.params == params.given()


def launch_train(session: Session, settings: Settings, **options) -> tuple[TrainedModel, Job]:
    lock_queue(session)
    job = pending_job(session, "train", lambda p: _same_model(session, p.get("model_id"), **_model_options(options)))
    if job is not None:
        return session.get(TrainedModel, job.params["model_id"]), job
    model = new_model(session, settings, **options)
    return model, enqueue(session, kind="train", params={"model_id": model.id})


def _model_options(options: dict) -> dict:
    """new_model's options split into _same_model's keywords."""
    options = dict(options)
    return {"dataset": options.pop("dataset"), "label_set": options.pop("label_set", None),
            "backend": options.pop("backend", "pixel"), "config": options}


def launch_score(session: Session, *, model_id: int, params: RunParams) -> tuple[MiningRun, Job]:
    lock_queue(session)
    job = pending_job(session, "score", lambda p: p.get("model_id") == model_id
                      and _same_run(session, p.get("run_id"), model_id=model_id, params=params))
    if job is not None:
        return session.get(MiningRun, job.params["run_id"]), job
    run = new_run(session, model_id=model_id, params=params)
    return run, enqueue(session, kind="score", params={"run_id": run.id, "model_id": run.model_id})


def run_past(session: Session, run_id: int, stage: str, missing: str) -> MiningRun:
    """The run, once `stage` is done; else a ValueError saying what is `missing`."""
    run = session.get(MiningRun, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    if stage not in (run.stages_done or []):
        raise ValueError(f"run {run_id} {missing} (status {run.status})")
    return run


def _mining_job(session: Session, run: MiningRun, params: dict) -> Job | None:
    """The active job mining `run` already: returned when it mines with the same `params`
    (the run's params after this launch); a ValueError when it mines otherwise, since two jobs
    would rewrite the same run's patches and clusters."""
    for kind in ("mine", "pipeline"):
        job = pending_job(session, kind, lambda p: p.get("run_id") == run.id)
        if job is None:
            continue
        if kind == "mine" and run.params == params:
            return job
        raise ValueError(f"run {run.id} is already being mined by job {job.id} ({job.status}); "
                         f"wait for it, or cancel it first (diffmine cancel {job.id})")
    return None


def launch_mine(session: Session, *, run_id: int, mine: MineOptions) -> Job:
    lock_queue(session)
    run = run_past(session, run_id, "score", "is not scored yet")
    params = {**run.params, "mine": mine.given()}
    if (job := _mining_job(session, run, params)) is not None:
        return job
    # New mining parameters redo the mining stages, never the scoring.
    run.params = params
    run.stages_done = [s for s in run.stages_done if s == "score"]
    return enqueue(session, kind="mine", params={"run_id": run.id})


def launch_recluster(session: Session, *, run_id: int, lookalike_threshold: float | None = None,
                     support_share: float | None = None) -> Job:
    """Clusters (and trends) again, leaving out look-alikes of the run's artifact clusters
    (cosine above `lookalike_threshold`, if given, else the run's or the default 0.6), and ranked
    with `support_share` if given (else the run's).

    Patches, features and crops are kept: no image is rescored or re-embedded."""
    lock_queue(session)
    run = run_past(session, run_id, "features", "has no features yet; run: diffmine mine")
    params = run.params
    changes = {name: value for name, value in (("lookalike_threshold", lookalike_threshold),
                                               ("support_share", support_share)) if value is not None}
    if changes:
        mine = MineOptions.model_validate({**run.params.get("mine", {}), **changes})
        params = {**run.params, "mine": mine.given()}
    if (job := _mining_job(session, run, params)) is not None:
        return job
    run.params = params
    run.stages_done = [s for s in run.stages_done if s not in ("clusters", "trends")]
    return enqueue(session, kind="mine", params={"run_id": run.id})


def mark_artifact(session: Session, *, cluster_id: int, artifact: bool = True) -> Cluster:
    """Mark (or unmark) a cluster as a dataset artifact; it leaves the galleries at once and
    its look-alikes leave every label's clusters at the next `launch_recluster`."""
    cluster = session.get(Cluster, cluster_id)
    if cluster is None:
        raise NotFound(f"no cluster {cluster_id}")
    cluster.is_artifact = artifact
    return cluster


def launch_pipeline(session: Session, settings: Settings, *, dataset: str | int,
                    label_set: str | None, run: RunParams, backend: str = "pixel",
                    **train_config) -> tuple[TrainedModel, MiningRun, Job]:
    """Model and run rows, and one pipeline job that trains, scores and mines. The model is
    trained with the run's seed. The same request while its job is queued or running gets that
    job and its rows back."""
    lock_queue(session)
    config = dict(train_config, seed=run.seed)

    def same(p: dict) -> bool:
        return (_same_model(session, p.get("model_id"), dataset=dataset, label_set=label_set,
                            backend=backend, config=config)
                and _same_run(session, p.get("run_id"), model_id=p["model_id"], params=run))

    job = pending_job(session, "pipeline", same)
    if job is not None:
        return (session.get(TrainedModel, job.params["model_id"]),
                session.get(MiningRun, job.params["run_id"]), job)
    model = new_model(session, settings, dataset=dataset, label_set=label_set, backend=backend,
                      **config)
    mining_run = new_run(session, model_id=model.id, params=run)
    # Three long stages in one job: allow a lost worker in each, and one more.
    job = enqueue(session, kind="pipeline", params={"model_id": model.id, "run_id": mining_run.id},
                  max_attempts=5)
    return model, mining_run, job


# --- what handlers read ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """A run with its model and labels, read once by every handler that works on a run."""

    run_id: int
    params: RunParams
    stages_done: frozenset[str]
    model_id: int
    #: the model's backend ("pixel", "stable-diffusion"): how its whole views are sized
    backend: str
    config: TrainConfig
    weights: Path
    label_set_id: int
    #: (label id, name) in label order
    labels: tuple[tuple[int, str], ...]
    ordinal: bool

    @property
    def view_size(self) -> int:
        """The shorter side images are scored at: the run's image size, else the model's."""
        return self.params.image_size or self.config.scoring_size

    @property
    def whole_view(self) -> bool:
        """Scored whole (every pixel, any shape), or through the old centre square."""
        return self.config.view == "whole"

    @property
    def label_ids(self) -> list[int]:
        return [label_id for label_id, _ in self.labels]


def load_run(session: Session, settings: Settings, run_id: int) -> RunRecord:
    run = session.get(MiningRun, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    model = session.get(TrainedModel, run.model_id)
    label_set = session.get(LabelSet, model.label_set_id)
    return RunRecord(run_id=run.id, params=RunParams.model_validate(run.params),
                     stages_done=frozenset(run.stages_done or []), model_id=model.id,
                     backend=model.backend,
                     config=TrainConfig.model_validate(model.config),
                     weights=settings.home_dir / model.weights_dir, label_set_id=label_set.id,
                     labels=tuple((label.id, label.name) for label in labels_of(session, label_set.id)),
                     ordinal=label_set.kind == "ordinal")
