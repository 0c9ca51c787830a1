"""Scoring in the worker vs on a local Ray instance: wall time, Ray's start-up, same numbers.

    python bench/bench_ray_scoring.py                       # 120 images, fast preset (~4 min)
    python bench/bench_ray_scoring.py --per-label 4 --draws 4 --shard-size 8  # the test's size

Builds a data directory once (builtin animals, a tiny pixel model trained for 20 steps), then
scores it: locally (one process, torch on all cores), and with DIFFMINE_RAY_ADDRESS pointing to
a Ray started here with `ray.init(num_cpus=N)` (N one-thread CPU actors), twice: the first job
pays for starting the actors and loading the model in each, the second shows the same again
(Ray Data starts a fresh actor pool per job). Prints a Markdown table
(the "Scoring on Ray" section of docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from sqlalchemy import select  # noqa: E402

from app.cli import main as diffmine  # noqa: E402
from app.db import session_scope  # noqa: E402
from app.models import ImageScore  # noqa: E402
from app.params import RunParams  # noqa: E402
from app.services.runs import launch_score  # noqa: E402
from app.settings import Settings  # noqa: E402
from worker.runner import Worker  # noqa: E402


def build(home: Path, per_label: int) -> None:
    for argv in (["ingest", "builtin:animals", "--name", "a", "--limit-per-label", str(per_label),
                  "--min-per-label", "2"],
                 ["train", "a", "--size", "tiny", "--steps", "20", "--batch-size", "16"]):
        if diffmine([*argv, "--home", str(home), "--json"]) != 0:
            raise SystemExit(f"building the data directory failed at {argv[0]}")


def score(settings: Settings, args) -> tuple[int, float, float, float]:
    """(run id, wall seconds, seconds to the first shard written, images/s after it)."""
    with session_scope(settings) as session:
        run, _ = launch_score(session, model_id=1, params=RunParams(
            preset="fast", draws=args.draws, seed=0, shard_size=args.shard_size))
        run_id = run.id
    started, wall = time.time(), time.perf_counter()
    assert Worker(settings).run_one()
    wall = time.perf_counter() - wall
    maps = settings.runs_dir / str(run_id) / "maps"
    shards = sorted(p.stat().st_mtime for p in maps.glob("*.npz"))
    images = len(typicality(settings, run_id))
    rest = images - images / len(shards)  # images in the shards written after the first
    return run_id, wall, shards[0] - started, rest / (shards[-1] - shards[0])


def typicality(settings: Settings, run_id: int) -> np.ndarray:
    with session_scope(settings) as session:
        return np.array(session.scalars(select(ImageScore.typicality)
                                        .where(ImageScore.run_id == run_id)
                                        .order_by(ImageScore.image_id, ImageScore.label_id)).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-label", type=int, default=12, help="images per label (10 labels)")
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    import ray
    import torch

    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        build(root / "home", args.per_label)
        local = Settings(home=root / "home")
        local_run, *local_times = score(local, args)
        images = len(typicality(local, local_run))  # one label per animal: a row per image

        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False)
        init_seconds = time.perf_counter() - started
        on_ray = Settings(home=root / "home", ray_address="local")
        ray_runs = [score(on_ray, args) for _ in range(2)]
        ray.shutdown()
        difference = max(np.abs(typicality(local, r) - typicality(local, local_run)).max()
                         for r, *_ in ray_runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}; {images} images, fast preset with {args.draws} draws, "
          f"shards of {args.shard_size}; largest typicality difference Ray vs local: "
          f"{difference:.2g}\n")
    print("| scoring | wall s | first shard written after s | images/s after it |")
    print("|---|---|---|---|")
    rows = [(f"in the worker (torch on {torch.get_num_threads()} threads)", *local_times)]
    rows += [(f"on Ray, {args.cpus} one-thread CPU actors, job {n}", *times)
             for n, (_, *times) in enumerate(ray_runs, 1)]
    for name, wall, first, rate in rows:
        print(f"| {name} | {wall:.1f} | {first:.1f} | {rate:.1f} |")
    print(f"| `ray.init(num_cpus={args.cpus})` alone | {init_seconds:.1f} | | |")


if __name__ == "__main__":
    main()
