"""Models and mining runs as rows: creating them (before their job runs) and the queries the
worker needs to feed the engine. Nothing here imports torch."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import (Cluster, Dataset, Image, ImageLabel, Job, Label, LabelSet, MiningRun,
                        TrainedModel)
from app.settings import Settings

BACKENDS = ("pixel", "stable-diffusion")
TRAIN_DEFAULTS = {"pixel": dict(resolution=32, steps=1500, batch_size=32, size="small"),
                  "stable-diffusion": dict(resolution=512, steps=5000, batch_size=8)}


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
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    config = {**TRAIN_DEFAULTS[backend], **{k: v for k, v in config.items() if v is not None}}
    check_processes(config)
    model = TrainedModel(dataset_id=dataset.id, label_set_id=label_set.id, backend=backend,
                         config=config, weights_dir="", status="queued")
    session.add(model)
    session.flush()
    model.weights_dir = f"models/{model.id}/weights"
    return model


def check_processes(config: dict) -> None:
    """`processes` (launched training, worker/launched_training.py) must split the global batch
    evenly: every process takes an equal slice of it."""
    processes = config.get("processes")
    if processes is None:
        return
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if config["batch_size"] % processes:
        raise ValueError(f"batch size {config['batch_size']} does not split evenly over "
                         f"{processes} processes")


def create_run(session: Session, *, model: TrainedModel, preset: str, params: dict) -> MiningRun:
    run = MiningRun(model_id=model.id, preset=preset, params=params, status="queued")
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
             after_id: int = 0, limit: int | None = None) -> list[Example]:
    """Images with their label indices in one label set, in image-id order. `after_id` and
    `limit` read a dataset shard by shard, never all of it at once."""
    labels = labels_of(session, label_set_id)
    index = {label.id: i for i, label in enumerate(labels)}
    ids = (select(ImageLabel.image_id).join(Image, Image.id == ImageLabel.image_id)
           .where(ImageLabel.label_id.in_(index), ImageLabel.image_id > after_id)
           .group_by(ImageLabel.image_id).order_by(ImageLabel.image_id))
    if split:
        ids = ids.where(Image.split == split)
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


# --- launching work: rows first, then the job that fills them --------------------------------
def new_model(session: Session, settings: Settings, *, dataset: str | int, label_set: str | None,
              backend: str = "pixel", seed: int = 0, **config) -> TrainedModel:
    ds = find_dataset(session, dataset)
    ls = find_label_set(session, ds, label_set)
    return create_model(session, settings, dataset=ds, label_set=ls, backend=backend,
                        config=dict(config, seed=seed))


#: Denoiser precision while scoring. fp16/bf16 autocast is for GPUs: on this project's CPUs it ran
#: 2-4x slower than fp32; on an H200, fp16 scored Stable Diffusion 4.9x faster (docs/benchmarks.md).
PRECISIONS = ("fp32", "fp16", "bf16")


def new_run(session: Session, *, model_id: int, preset: str = "paper", draws: int | None = None,
            all_labels: bool = False, seed: int = 0, mine: dict | None = None,
            shard_size: int | None = None, precision: str = "fp32") -> MiningRun:
    model = session.get(TrainedModel, model_id)
    if model is None:
        raise NotFound(f"no model {model_id}")
    if preset not in ("paper", "fast"):
        raise ValueError(f"unknown preset {preset!r}; choose paper or fast")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    params = {"preset": preset, "draws": draws, "all_labels": all_labels, "seed": seed,
              "precision": precision,
              "mine": {k: v for k, v in (mine or {}).items() if v is not None},
              "shard_size": shard_size}
    return create_run(session, model=model, preset=preset, params=params)


def launch_train(session: Session, settings: Settings, **options) -> tuple[TrainedModel, Job]:
    from app.jobs import enqueue

    model = new_model(session, settings, **options)
    return model, enqueue(session, kind="train", params={"model_id": model.id})


def launch_score(session: Session, **options) -> tuple[MiningRun, Job]:
    from app.jobs import enqueue

    run = new_run(session, **options)
    return run, enqueue(session, kind="score", params={"run_id": run.id, "model_id": run.model_id})


def launch_mine(session: Session, *, run_id: int, mine: dict) -> Job:
    from app.jobs import enqueue

    run = session.get(MiningRun, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    if "score" not in (run.stages_done or []):
        raise ValueError(f"run {run_id} is not scored yet (status {run.status})")
    # New mining parameters redo the mining stages, never the scoring.
    run.params = {**run.params, "mine": {k: v for k, v in mine.items() if v is not None}}
    run.stages_done = [s for s in run.stages_done if s == "score"]
    return enqueue(session, kind="mine", params={"run_id": run.id})


def launch_recluster(session: Session, *, run_id: int, lookalike_threshold: float | None = None) -> Job:
    """Clusters (and trends) again, leaving out look-alikes of the run's artifact clusters
    (cosine above `lookalike_threshold`, if given, else the run's or the default 0.6).

    Patches, features and crops are kept: no image is rescored or re-embedded."""
    from app.jobs import enqueue

    run = session.get(MiningRun, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    if "features" not in (run.stages_done or []):
        raise ValueError(f"run {run_id} has no features yet (status {run.status}); run: diffmine mine")
    if lookalike_threshold is not None:
        if not -1 < lookalike_threshold < 1:
            raise ValueError(f"lookalike threshold is a cosine in (-1, 1), got {lookalike_threshold}")
        run.params = {**run.params, "mine": {**run.params.get("mine", {}),
                                             "lookalike_threshold": lookalike_threshold}}
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
                    label_set: str | None, backend: str = "pixel", seed: int = 0,
                    preset: str = "paper", draws: int | None = None, all_labels: bool = False,
                    mine: dict | None = None, shard_size: int | None = None, precision: str = "fp32",
                    **train_config) -> tuple[TrainedModel, MiningRun, Job]:
    """Model and run rows, and one pipeline job that trains, scores and mines."""
    from app.jobs import enqueue

    model = new_model(session, settings, dataset=dataset, label_set=label_set, backend=backend,
                      seed=seed, **train_config)
    run = new_run(session, model_id=model.id, preset=preset, draws=draws, all_labels=all_labels,
                  seed=seed, mine=mine, shard_size=shard_size, precision=precision)
    # Three long stages in one job: allow a lost worker in each, and one more.
    job = enqueue(session, kind="pipeline", params={"model_id": model.id, "run_id": run.id},
                  max_attempts=5)
    return model, run, job
