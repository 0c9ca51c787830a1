"""Adaptive draws against the paper: agreement on what is mined, at independent seeds, and passes.

    python bench/bench_adaptive.py --dataset twemoji --images-per-label 30 --per-label 15 --clusters 3
    python bench/bench_adaptive.py --dataset animals --images-per-label 30 --per-label 15 --clusters 3

The product's own jobs in a real worker process (`diffmine worker`): a builtin dataset ingested
with `--limit-per-label`, a model (twemoji: the demo's shipped category weights, demo/weights;
animals: `diffmine train --size small` (or --size), trained once and kept in --home), then for each of
--runs (preset:seed) a score job and a mine job with the given per-label count and clusters.
Reported against `paper` at seed 0 (the reference), `paper` at seed 1 being the floor: the
rank correlation of the image scores, the same top patch (all rows, and the rows either run
mined), the overlap of each label's top-K patches and the adjusted Rand index of the clusters
over shared patches (bench/agreement.py), the denoiser passes the score job counted and its
seconds. Runs and models are kept in --home, so a second call reuses what is done.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from agreement import cluster_agreement, same_top_patch, spearman, top_k_overlap  # noqa: E402
from gpu_fast_options import job_seconds, run_scores  # noqa: E402


def diffmine(home: Path, env: dict, *command: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "app.cli", *command, "--home", str(home), "--json"], env=env,
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"diffmine {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout) if done.stdout.strip() else {}


def work(home: Path, env: dict) -> None:
    """One worker process until the queue is empty (the job runs as it does in the product)."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--exit-when-idle", "--home", str(home),
                           "--poll", "0.2"], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the worker failed:\n{done.stderr[-3000:]}")


def prepare(args, env: dict) -> int:
    """The dataset and the model; returns the model id."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import TrainedModel
    from app.services.runs import find_dataset, find_label_set
    from app.settings import Settings

    settings = Settings(home=args.home)
    if not (args.home / "diffmine.sqlite").exists():
        diffmine(args.home, env, "ingest", f"builtin:{args.dataset}", "--name", args.dataset,
                 "--limit-per-label", str(args.images_per_label), "--min-per-label", "1")
    with session_scope(settings) as session:
        model = session.scalar(select(TrainedModel).where(TrainedModel.status == "ready"))
        if model is not None:
            return model.id
        if args.dataset == "twemoji":
            from app.services.demo import shipped_model

            dataset = find_dataset(session, "twemoji")
            model = shipped_model(session, settings, find_label_set(session, dataset, "category"))
            session.flush()
            return model.id
    began = time.perf_counter()
    trained = diffmine(args.home, env, "train", args.dataset, "--size", args.size, "--steps", str(args.train_steps),
                       "--batch-size", "32", "--lr", "1e-3")
    print(f"trained model {trained['model']} in {time.perf_counter() - began:.0f} s", flush=True)
    return trained["model"]


def scored_and_mined(args, env: dict, model_id: int, preset: str, seed: int) -> dict:
    """The run of (preset, seed), scored and mined (reused if --home has it)."""
    from app.db import session_scope
    from app.models import Job, MiningRun
    from app.params import MineOptions, RunParams
    from app.services.runs import launch_mine, launch_score
    from app.settings import Settings

    settings = Settings(home=args.home)
    ledger = args.home / "bench-runs.json"
    runs = json.loads(ledger.read_text()) if ledger.exists() else {}
    key = f"{preset}:{seed}:{args.per_label}:{args.clusters}"
    if key in runs:
        return runs[key]
    mine = MineOptions(per_label=args.per_label, clusters=args.clusters)
    with session_scope(settings) as session:
        run, score_job = launch_score(session, model_id=model_id,
                                      params=RunParams(preset=preset, seed=seed, shard_size=args.shard_size, mine=mine))
        run_id, score_job_id = run.id, score_job.id
    work(args.home, env)
    with session_scope(settings) as session:
        mine_job_id = launch_mine(session, run_id=run_id, mine=mine).id
    work(args.home, env)
    with session_scope(settings) as session:
        result = session.get(Job, score_job_id).result
        assert session.get(MiningRun, run_id).status == "ready", "the run was not mined"
    runs[key] = {"run": run_id, "score_seconds": job_seconds(args.home, score_job_id),
                 "mine_seconds": job_seconds(args.home, mine_job_id), "passes": result["passes"],
                 "stages": result.get("stages")}
    ledger.write_text(json.dumps(runs, indent=2))
    return runs[key]


def mined_patches(home: Path, run_id: int) -> list[dict]:
    with sqlite3.connect(home / "diffmine.sqlite") as db:
        rows = db.execute("select p.image_id, p.label_id, p.x0, p.y0, p.x1, p.y1, m.cluster_id from patches p "
                          "left join cluster_members m on m.patch_id = p.id where p.run_id = ?", (run_id,)).fetchall()
    return [{"image": r[0], "label": r[1], "box": r[2:6], "cluster": r[6]} for r in rows]


def draws_of(home: Path, run_id: int) -> dict:
    with sqlite3.connect(home / "diffmine.sqlite") as db:
        rows = db.execute("select image_id, label_id, draws from image_scores where run_id = ?", (run_id,)).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def first_stage_openness(home: Path, run_id: int, per_label: int) -> dict:
    """From an adaptive run's first-stage bounds (12 draws): the share of rows still open at each
    confidence z, and the fewest passes two stages (12, then 88 more for the open rows) would spend,
    as a ratio to the paper's 100. What a less careful bound would save, before any agreement."""
    import numpy as np

    from worker.engine.adaptive import open_rows

    rows = {}
    for path in sorted((home / "runs" / str(run_id) / "maps" / "adaptive").glob("*.stage-0.npz")):
        with np.load(path) as data:
            rows.update({key: (int(key.split("_")[1]), data[key]) for key in data.files if ":" not in key})
    best = np.array([bounds[0, 0] for _, bounds in rows.values()])
    errors = np.array([bounds[1, 0] for _, bounds in rows.values()])
    curve = {}
    for z in (0.0, 0.5, 1.0, 2.0, 3.0):
        share = len(open_rows(rows, per_label, z)) / len(rows)
        curve[z] = {"open": share, "fewer_passes_at_best": 100 / (12 + 88 * share)}
    return {"rows": len(rows), "best_box_spread_over_stderr": float(best.std() / np.median(errors)),
            "by_confidence": curve}


def compare(args, runs: dict) -> list[dict]:
    import torch

    reference = runs["paper:0"]
    ref_scores, ref_maps = (torch.from_numpy(x) for x in run_scores(args.home, reference["run"]))
    ref_patches = mined_patches(args.home, reference["run"])
    keys = sorted(draws_of(args.home, reference["run"]))
    patch = max(2, round(50 / 256 * ref_maps.shape[-1]))
    rows = []
    for name, run in runs.items():
        scores, maps = (torch.from_numpy(x) for x in run_scores(args.home, run["run"]))
        patches = mined_patches(args.home, run["run"])
        mined = {(p["image"], p["label"]) for p in patches + ref_patches}
        on_mined = torch.tensor([key in mined for key in keys])
        draws = draws_of(args.home, run["run"])
        at_full = sum(1 for p in patches if (draws[(p["image"], p["label"])] or 0) >= 100) / max(1, len(patches))
        rows.append({
            "run": name, "images_scored": len(keys), "passes": run["passes"],
            "passes_ratio": reference["passes"] / run["passes"], "score_seconds": run["score_seconds"],
            "time_ratio": reference["score_seconds"] / run["score_seconds"],
            "mean_draws": sum(d or 0 for d in draws.values()) / len(draws),
            "rho": spearman(ref_scores, scores), "same_top_patch": same_top_patch(ref_maps, maps, patch),
            "same_top_patch_mined": same_top_patch(ref_maps[on_mined], maps[on_mined], patch),
            "top_k_overlap": top_k_overlap(ref_patches, patches),
            "cluster_ari": cluster_agreement(ref_patches, patches),
            "mined_patches_at_paper_draws": at_full, "stages": run.get("stages")})
    return rows


def mined_share(home: Path) -> None:
    """For every mined run in a data folder (e.g. a full `diffmine demo`): the share of its
    (image, own label) rows that gave a patch, and the most an adaptive preset that gives those
    rows the paper's 100 draws and the others 12 could save, even knowing them in advance."""
    with sqlite3.connect(f"file:{home / 'diffmine.sqlite'}?mode=ro", uri=True) as db:
        runs = db.execute("select id, preset, params from mining_runs where status = 'ready'").fetchall()
        for run_id, preset, params in runs:
            rows = db.execute("select count(*) from image_scores s join image_labels l on l.image_id = s.image_id "
                              "and l.label_id = s.label_id where s.run_id = ?", (run_id,)).fetchone()[0]
            mined, patches = db.execute("select count(distinct image_id || '_' || label_id), count(*) from patches "
                                        "where run_id = ?", (run_id,)).fetchone()
            share = mined / rows
            print(f"run {run_id} ({preset}, {params}): {patches} patches from {mined} of {rows} rows ({share:.0%}); "
                  f"an oracle adaptive preset: at most {100 / (12 + 88 * share):.2f}x fewer passes "
                  f"({100 / (100 * share):.2f}x with a free first look)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mined-share", type=Path, metavar="HOME",
                        help="only report the share of rows that gave a patch in HOME's mined runs")
    parser.add_argument("--dataset", choices=("twemoji", "animals"))
    parser.add_argument("--images-per-label", type=int, default=30, help="ingest --limit-per-label")
    parser.add_argument("--per-label", type=int, default=15, help="patches mined per label (K)")
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=400, help="animals: training steps")
    parser.add_argument("--size", choices=("tiny", "small"), default="small", help="animals: the model's width")
    parser.add_argument("--runs", default="paper:0,paper:1,adaptive:0,adaptive:1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--home", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mined_share:
        return mined_share(args.mined_share)
    if not args.dataset:
        parser.error("--dataset is needed")
    args.home = args.home or Path(f"/tmp/bench-adaptive-{args.dataset}-{args.images_per_label}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO), DIFFMINE_DEVICE="cpu")
    os.environ["DIFFMINE_HOME"] = str(args.home)
    model_id = prepare(args, env)
    runs = {}
    for spec in args.runs.split(","):
        preset, seed = spec.split(":")
        began = time.perf_counter()
        runs[spec] = scored_and_mined(args, env, model_id, preset, int(seed))
        print(f"{spec}: run {runs[spec]['run']}, score {runs[spec]['score_seconds']:.0f} s, "
              f"{runs[spec]['passes']} passes ({time.perf_counter() - began:.0f} s with mining)", flush=True)
    rows = compare(args, runs)
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{args.threads} torch thread(s)", "command": " ".join(sys.argv), "dataset": args.dataset,
              "images_per_label": args.images_per_label, "per_label": args.per_label, "clusters": args.clusters,
              "rows": rows}
    print(f"\n{report['date']} - {report['machine']}; builtin:{args.dataset}, {args.images_per_label} images per "
          f"label, K = {args.per_label} patches per label, {args.clusters} clusters; reference paper:0\n")
    print("| run | passes | fewer passes | score s | faster | mean draws | rho | same top patch (all / mined) "
          "| top-K overlap | cluster ARI | mined at 100 draws |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['passes']:,} | {r['passes_ratio']:.2f}x | {r['score_seconds']:.0f} | "
              f"{r['time_ratio']:.2f}x | {r['mean_draws']:.1f} | {r['rho']:.3f} | {r['same_top_patch']:.0%} / "
              f"{r['same_top_patch_mined']:.0%} | {r['top_k_overlap']:.0%} | {r['cluster_ari']:.3f} | "
              f"{r['mined_patches_at_paper_draws']:.0%} |")
    for r in rows:
        if r["stages"]:
            print(f"{r['run']} stages: " + "; ".join(f"{s['images']} images at {s['draws']} draws"
                                                    for s in r["stages"]))
    reference = runs["paper:0"]
    mined_rows = {(p["image"], p["label"]) for p in mined_patches(args.home, reference["run"])}
    share = len(mined_rows) / rows[0]["images_scored"]
    report["paper_mined_row_share"] = share
    print(f"\npaper:0 mined patches from {share:.0%} of the rows: an oracle giving exactly those rows 100 draws "
          f"and the others 12 would spend {100 / (12 + 88 * share):.2f}x fewer passes than the paper, at best")
    adaptive = [(name, run) for name, run in runs.items() if name.startswith("adaptive")]
    if adaptive:
        name, run = adaptive[0]
        report["first_stage"] = first_stage_openness(args.home, run["run"], args.per_label)
        first = report["first_stage"]
        print(f"\n{name}, after its first stage (12 draws, {first['rows']} rows): spread of the rows' best box "
              f"scores / their median stderr = {first['best_box_spread_over_stderr']:.2f}")
        print("| confidence z | rows open | fewer passes at best (12 draws, then 88 more for the open rows) |")
        print("|---:|---:|---:|")
        for z, row in first["by_confidence"].items():
            print(f"| {z} | {row['open']:.0%} | {row['fewer_passes_at_best']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
