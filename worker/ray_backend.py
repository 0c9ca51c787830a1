"""Scoring and DIFT features on a Ray cluster, when `DIFFMINE_RAY_ADDRESS` is set.

The worker process stays in charge of the job: it lists the pieces not done yet (scoring
shards of the image list, parts of the features stage of mining), Ray Data makes each piece a
block and `map_batches` hands it to a `DenoiserActor` (one denoiser per actor: one actor per GPU
of the cluster, or CPU actors where it has none), and the worker writes each result as it comes
back with the very function the local path writes with, reporting progress and checking for a
cancel between pieces. Results are computed by the same functions as locally with the same seeds,
so they are the same numbers (within float rounding of thread counts and devices), and a resumed
job sends only the pieces whose files are still missing.

Actors read the images and the model weights by the paths the worker sees: on a cluster of
several machines the data directory must be mounted at the same path on every node (NFS or the
like), and diffmine installed there.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from app.settings import Settings
from worker.context import JobContext, TransientError
from worker.pieces import Executor


def connect(settings: Settings) -> None:
    """Join the configured cluster once per process ('local' starts one here); a Ray that the
    process already initialised is used as it is."""
    import ray
    import ray.data

    if not ray.is_initialized():
        address = None if settings.ray_address == "local" else settings.ray_address
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def actor_plan(settings: Settings) -> dict:
    """How many actors, and what each holds: a GPU per actor when the cluster has any (and the
    device setting does not ask for the CPU), else one CPU per actor."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if settings.device != "cpu" else 0
    if gpus:
        return dict(actors=settings.ray_actors or gpus, num_gpus=1, num_cpus=1, device="cuda")
    return dict(actors=settings.ray_actors or max(1, int(resources.get("CPU", 1))), num_gpus=0,
                num_cpus=1, device="cpu")


class DenoiserActor:
    """The callable class of `map_batches`: loads the denoiser once, then runs
    `compute(denoiser, task, **options)` on every task it is given."""

    def __init__(self, weights: str, device: str, compute: Callable, options: dict):
        from worker.engine.registry import load_denoiser

        self.denoiser = load_denoiser(weights, device=device)
        self.compute, self.options = compute, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [pickle.dumps(self.compute(self.denoiser, pickle.loads(task), **self.options))
                   for task in batch["task"]]
        return {"key": batch["key"], "result": np.array(results, dtype=object)}


def on_ray(context: JobContext, weights: Path, compute: Callable, options: dict,
           name: str) -> Executor:
    """The Ray executor of `worker.pieces.run_pieces`: every pending piece one block of a Ray
    dataset, computed by `DenoiserActor`s, results streamed back as they finish. The pending
    tasks are all the worker holds (about 10 KB per scoring shard of 64 images). Actor deaths
    and lost nodes raise TransientError: the job is retried and resumes from the files written."""
    def execute(pending_pieces):
        pending = dict(enumerate(pending_pieces))
        if pending:
            for key, result in _stream(context, weights, pending, compute, options, name):
                path, task = pending.pop(key)
                yield path, task, result
    return execute


def _stream(context: JobContext, weights: Path, pending: dict, compute: Callable, options: dict,
            name: str) -> Iterator[tuple[int, object]]:
    import ray

    connect(context.settings)
    plan = actor_plan(context.settings)
    context.log(f"ray: {len(pending)} {name} tasks on {plan['actors']} {plan['device']} actor(s)")
    items = [{"key": key, "task": pickle.dumps(task)} for key, (_, task) in pending.items()]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        DenoiserActor, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(weights=str(weights), device=plan["device"], compute=compute,
                                   options=options),
        compute=ray.data.ActorPoolStrategy(size=min(plan["actors"], len(items))),
        num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"])
    del items
    lost = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)
    try:
        for row in dataset.iter_rows():
            yield int(row["key"]), pickle.loads(row["result"])
    except lost as error:
        raise TransientError(f"the Ray cluster lost work: {error}") from error
