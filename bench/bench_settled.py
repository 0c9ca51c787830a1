"""How settled a mined result is, and what the galleries rank first (issue 15 item 6, issue 16 item 4).

    python bench/bench_settled.py                 # ~10 min on 2 busy CPU cores
    python bench/bench_settled.py --per-label 16  # a smaller run

One planted-mark dataset (builtin:animals, a mark painted into a share of the Cat images), a
tiny pixel model, scored with the paper preset at seed 0 and at seed 1 (two runs, independent
draws), both mined alike. Prints Markdown tables:

* cost: the "settle" mining stage (each kept patch's standard error) against the score job, in
  wall-clock seconds and denoiser forward rows;
* prediction: each label's mean stay probability in one run (the share of its top K expected
  to stay under new draws) against the share that did stay in the other run;
* ranking: for each rule (plain median = the paper; the median shrunk toward the label's median
  by a share of the label's patches; a minimum-size rule), the top cluster of each label: its
  size, and for Cat the share of its members on the mark; and how many labels' top cluster
  holds under 5% of the label's patches;
* coherence: per cluster, on raw DIFT features and on features centred on the run's mean.
"""
from __future__ import annotations

import os

# As `diffmine` does (app/cli/__init__.py), before torch or FAISS start their thread pools: the
# jobs timed here run in this process, and spinning idle OpenMP threads made them 2x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from app.db import session_scope
from app.jobs import enqueue
from app.models import Cluster, ClusterMember, Image, ImageScore, Job, Label, MiningRun, Patch
from app.settings import Settings
from worker.engine.clustering import coherence, order_clusters
from worker.runner import Worker

REPO = Path(__file__).resolve().parents[1]
SHARES = (0.0, 0.02, 0.05, 0.1)
MIN_SHARE = 0.05


def diffmine(home: Path, *args) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home), "--json"],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"diffmine {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout), time.perf_counter() - start


def settle_again(home: Path, run_id: int) -> float:
    """Wall-clock seconds of the settle stage alone: a mine job with every other stage done, run
    by a worker here (as the tests' resumed jobs are)."""
    with session_scope(Settings(home=home)) as session:
        run = session.get(MiningRun, run_id)
        run.stages_done = sorted(set(run.stages_done) - {"settle"})
    return run_job_here(home, "mine", run_id)


def score_again(home: Path, run_id: int) -> float:
    """Wall-clock seconds of the score job redone (its map files removed; same seed, same numbers)."""
    for shard in (home / "runs" / str(run_id) / "maps").glob("shard-*.npz"):
        shard.unlink()
    return run_job_here(home, "score", run_id)


def run_job_here(home: Path, kind: str, run_id: int) -> float:
    settings = Settings(home=home)
    with session_scope(settings) as session:
        job_id = enqueue(session, kind=kind, params={"run_id": run_id}).id
    start = time.perf_counter()
    Worker(settings).run_one()
    seconds = time.perf_counter() - start
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job.status != "succeeded":
            raise SystemExit(f"the {kind} job of run {run_id} failed: {job.error}")
    return seconds


def forward_rows(home: Path, run_id: int, draws: int, settle_draws: int) -> tuple[int, int]:
    """Denoiser rows (label and null per draw) of the score job and of the settle stage."""
    with session_scope(Settings(home=home)) as session:
        scored = session.scalar(select(func.count()).select_from(ImageScore).where(ImageScore.run_id == run_id))
        groups = session.scalar(select(func.count()).select_from(
            select(Patch.image_id, Patch.label_id).where(Patch.run_id == run_id).distinct().subquery()))
    return scored * draws * 2, groups * settle_draws * 2


def patches_of(home: Path, run_id: int) -> dict[str, list]:
    with session_scope(Settings(home=home)) as session:
        rows = session.execute(select(Label.name, Patch.image_id, Patch.x0, Patch.y0, Patch.x1, Patch.y1,
                                      Patch.score, Patch.stay)
                               .join(Label, Label.id == Patch.label_id).where(Patch.run_id == run_id)).all()
    out = defaultdict(list)
    for name, *rest in rows:
        out[name].append(rest)
    return out


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def stayed_share(mine: list, other: list) -> float:
    """Share of one run's kept patches found (same image, box IoU >= 0.5) in the other's."""
    by_image = defaultdict(list)
    for image, *box in other:
        by_image[image].append(box[:4])
    found = sum(any(iou(p[1:5], q) >= 0.5 for q in by_image[p[0]]) for p in mine)
    return found / len(mine)


def clusters_of(home: Path, run_id: int) -> dict[str, dict]:
    """Per label: each patch's cluster, score, feature row and whether it lies on a mark."""
    with session_scope(Settings(home=home)) as session:
        rows = session.execute(
            select(Label.name, Cluster.id, Patch.score, Patch.feature_row, Patch.x0, Patch.y0, Patch.x1, Patch.y1,
                   Image.extra, Patch.image_id)
            .join(Cluster, Cluster.label_id == Label.id).join(ClusterMember, ClusterMember.cluster_id == Cluster.id)
            .join(Patch, Patch.id == ClusterMember.patch_id).join(Image, Image.id == Patch.image_id)
            .where(Cluster.run_id == run_id, Cluster.is_artifact.is_(False))).all()
    out: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for name, cluster_id, score, row, x0, y0, x1, y1, extra, image_id in rows:
        marks = [b for b in (extra or {}).get("boxes", []) if len(b) > 4 and b[4] == "mark"]
        on_mark = any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in marks)
        for key, value in (("cluster", cluster_id), ("score", score), ("row", row), ("mark", on_mark),
                           ("image", image_id)):
            out[name][key].append(value)
    return out


def top_cluster(label: dict, rule: str, share: float) -> tuple[int, float, set]:
    """(size, share on the mark, member images) of the label's first cluster under a rule."""
    ids = np.unique(label["cluster"], return_inverse=True)[1]
    scores, marks = np.array(label["score"]), np.array(label["mark"])
    if rule == "min-size":  # clusters under MIN_SHARE of the label's patches go last
        big = np.bincount(ids) >= MIN_SHARE * len(ids)
        ranked = order_clusters(ids, np.zeros(len(ids)), scores)
        first = next((c for c in ranked if big[c.cluster]), ranked[0])
    else:
        first = order_clusters(ids, np.zeros(len(ids)), scores, prior_size=share * len(ids))[0]
    return len(first.members), float(marks[first.members].mean()), {label["image"][m] for m in first.members}


def ranking_table(runs: dict[int, dict], marked: str) -> None:
    rules = [("shrunk", s) for s in SHARES] + [("min-size", MIN_SHARE)]
    print("\n| rule | run | top cluster of " + marked + ": size, on the mark | labels whose top cluster "
          "< 5% of its patches | median size of the top clusters | top clusters of runs 1 and 2: "
          "image Jaccard, mean over labels |")
    print("|---|---|---|---|---|---|")
    for rule, share in rules:
        name = "plain median (paper)" if rule == "shrunk" and share == 0 else (
            f"median shrunk, n0 = {share:g} x patches" if rule == "shrunk" else f"min size {share:.0%}")
        tops = {run_id: {label: top_cluster(data, rule, share) for label, data in labels.items()}
                for run_id, labels in runs.items()}
        first, second = tops[1], tops[2]
        jaccard = np.mean([len(first[label][2] & second[label][2]) / len(first[label][2] | second[label][2])
                           for label in first if label in second])
        for run_id, labels in runs.items():
            small = sum(size < 0.05 * len(labels[label]["cluster"]) for label, (size, _, _) in tops[run_id].items())
            size, on_mark, _ = tops[run_id][marked]
            print(f"| {name} | {run_id} | {size}, {on_mark:.0%} | {small} of {len(tops[run_id])} | "
                  f"{np.median([s for s, _, _ in tops[run_id].values()]):g} | {jaccard:.2f} |")


def coherence_table(home: Path, runs: dict[int, dict]) -> None:
    print("\n| run | coherence on | min | median | max |\n|---|---|---|---|---|")
    for run_id, labels in runs.items():
        features = np.load(home / "runs" / str(run_id) / "features.npy")
        centred = features - features.mean(axis=0)
        for kind, matrix in (("raw DIFT features", features), ("centred features", centred)):
            values = []
            for data in labels.values():
                ids = np.unique(data["cluster"], return_inverse=True)[1]
                values += coherence(matrix[data["row"]], ids).tolist()
            print(f"| {run_id} | {kind} | {min(values):.3f} | {np.median(values):.3f} | {max(values):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-label-images", type=int, default=24)
    parser.add_argument("--per-label", type=int, default=40, help="patches kept per label")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--marked", default="Cat")
    parser.add_argument("--home", type=Path, help="keep the data directory here (default: a temporary one)")
    args = parser.parse_args()
    print(f"bench_settled {datetime.date.today()} · {platform.node()} · {platform.processor() or platform.machine()}")
    print(f"`{' '.join(sys.argv)}`")
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        measure(home, args)


def mined_already(home: Path) -> bool:
    if not (home / "diffmine.sqlite").exists():
        return False
    with session_scope(Settings(home=home)) as session:
        run = session.get(MiningRun, 2)
        return run is not None and run.status == "ready"


def measure(home: Path, args) -> None:
    if not mined_already(home):  # a kept --home: the tables again, without the pipeline
        pipeline(home, args)
    report(home, args)


def pipeline(home: Path, args) -> None:
    diffmine(home, "ingest", "builtin:animals", "--name", "planted", "--limit-per-label",
             str(args.per_label_images), "--plant-mark", args.marked, "--plant-fraction", "0.5")
    diffmine(home, "train", "planted", "--size", "tiny", "--steps", str(args.steps), "--batch-size", "16",
             "--lr", "1e-3")
    mine = ["--per-label", str(args.per_label), "--clusters", str(args.clusters)]
    for seed in (0, 1):
        result, _ = diffmine(home, "score", "1", "--preset", "paper", "--draws", str(args.draws),
                             "--seed", str(seed))
        diffmine(home, "mine", str(result["run"]), *mine)


def report(home: Path, args) -> None:
    settle_draws = min(args.draws, 24)
    print("\n| run | score job (s) | settle stage (s) | settle / score | forward rows: score | settle |")
    print("|---|---|---|---|---|---|")
    run_id = 1  # both jobs redone here, one after the other, in the same conditions
    score_seconds, seconds = score_again(home, run_id), settle_again(home, run_id)
    score_rows, settle_rows = forward_rows(home, run_id, args.draws, settle_draws)
    print(f"| {run_id} | {score_seconds:.1f} | {seconds:.1f} | {seconds / score_seconds:.2f} "
          f"| {score_rows:,} | {settle_rows:,} |")
    first, second = patches_of(home, 1), patches_of(home, 2)
    print("\n| label | predicted stay, run 1 | stayed in run 2 | predicted stay, run 2 | stayed in run 1 |")
    print("|---|---|---|---|---|")
    totals = np.zeros(4)
    for label in sorted(first):
        row = np.array([np.mean([p[6] for p in first[label]]), stayed_share(first[label], second[label]),
                        np.mean([p[6] for p in second[label]]), stayed_share(second[label], first[label])])
        totals += row / len(first)
        print(f"| {label} | " + " | ".join(f"{v:.0%}" for v in row) + " |")
    print("| **mean** | " + " | ".join(f"**{v:.0%}**" for v in totals) + " |")
    runs = {run_id: clusters_of(home, run_id) for run_id in (1, 2)}
    ranking_table(runs, args.marked)
    coherence_table(home, runs)


if __name__ == "__main__":
    main()
