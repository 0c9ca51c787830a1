"""On a lent GPU: is half-precision scoring the fast option that meets the paper's own bar, and
does the product run on CUDA end to end?

    python bench/gpu_fast_options.py --out DIR                  # on a CUDA machine, ~6 minutes
    python bench/gpu_fast_options.py --cpu --quick --out DIR    # the same code on CPU, tiny sizes

Two parts (`--parts sd,cli`), each writing DIR/<part>.json as soon as it ends:

* sd: an SD-1.5-shaped denoiser (random init, 256 px, bench/gpu_check.py's) trained briefly in
  bf16 on planted blobs, then typicality of held-out images with the paper preset in fp32 under
  seed 0 (the reference) and seed 1 (the bar: the reference against itself), the paper preset in
  fp16 autocast, and the fast preset (24 stratified draws) in fp16. For each: images/s, speed-up,
  Spearman rho of the image ranking and the share of images whose top patch (docs/method.md section 3)
  is the reference's.
  Each preset draws from its own random stream (worker/engine/streams.py), so `fast` at seed 0
  shares no noise with `paper` at seed 0; the fp16 rows share the fp32 reference's draws on
  purpose: they measure what the precision alone changes. (Before session 5, `fast` repeated
  about half of the paper's eps at the same seed, which flattered its agreement.)
* cli: the real `diffmine` command line in subprocesses on builtin animals, device auto (CUDA):
  ingest, train, score (paper fp32 seeds 0 and 1, paper fp16, fast fp16), mine, translate a
  patch, and a training through `accelerate launch`; wall seconds per command and the same
  agreement table, read from the runs' scores and map files.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests" / "engine")]


def agreement_row(name: str, scores, maps, seconds: float, reference: dict | None) -> dict:
    """Speed and agreement of one scoring against the reference (scores [N], maps [N, h, w]).
    Top patch: a window of 50/256 of the map's side (docs/method.md section 3)."""
    from bench_typicality import spearman, top_patches

    patch = max(1, round(50 / 256 * maps.shape[-1]))
    row = {"option": name, "images": len(scores), "seconds": seconds, "images_per_s": len(scores) / seconds}
    if reference is None:
        row.update(speedup=1.0, spearman=1.0, same_top_patch=1.0)
    else:
        row.update(speedup=row["images_per_s"] / reference["images_per_s"],
                   spearman=spearman(reference["scores"], scores),
                   same_top_patch=float((top_patches(reference["maps"], patch) ==
                                         top_patches(maps, patch)).float().mean()))
    print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in row.items() if k != "option"), flush=True)
    return row


def options(quick: bool):
    from worker.engine.presets import FAST, PAPER

    draws = 8 if quick else 100
    return [("paper fp32, seed 0 (reference)", PAPER.with_(draws=draws), 0),
            ("paper fp32, seed 1 (the bar)", PAPER.with_(draws=draws), 1),
            ("paper fp16, seed 0", PAPER.with_(draws=draws, autocast="fp16"), 0),
            ("fast fp16 (24 stratified draws), seed 0", FAST.with_(draws=4 if quick else 24, autocast="fp16"), 0)]


# --- part 1: Stable Diffusion, engine level ------------------------------------------------------
def sd_part(args, device) -> dict:
    import torch
    from gpu_check import planted_blobs, sd_model

    from worker.engine.training import make_accelerator, train
    from worker.engine.typicality import typicality_stream

    start = time.perf_counter()
    args.images = 16 if args.quick else 64  # training images of the planted blobs
    model, data, _, _, batch = sd_model(args, device)
    resolution = data.tensors[0].shape[-1]
    steps = 2 if args.quick else args.sd_steps
    train(model, data, steps=steps, batch_size=batch, seed=0, lr=1e-4,
          accelerator=make_accelerator("no" if args.cpu else "bf16", cpu=args.cpu))
    trained = time.perf_counter() - start
    print(f"sd: built and trained {steps} steps in {trained:.0f} s", flush=True)
    images, conditions = planted_blobs(4 if args.quick else args.sd_images, resolution, seed=1)
    batches = [(images[i:i + 16], conditions[i:i + 16]) for i in range(0, len(images), 16)]
    rows, reference = [], None
    for name, preset, seed in options(args.quick):
        preset = preset.with_(forward_batch=64)
        list(typicality_stream(model, batches[:1], preset.with_(draws=2, round_size=None), seed=seed))  # warm-up
        _sync()
        began = time.perf_counter()
        results = list(typicality_stream(model, batches, preset, seed=seed))
        _sync()
        seconds = time.perf_counter() - began
        scores = torch.cat([r.scores for r in results]).float().cpu()
        maps = torch.cat([r.maps for r in results]).float().cpu()
        rows.append(agreement_row(name, scores, maps, seconds, reference))
        if reference is None:
            reference = dict(rows[0], scores=scores, maps=maps)
    return {"train_steps": steps, "train_and_build_s": trained, "images": len(images), "rows": rows}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- part 2: the product's command line on the GPU -----------------------------------------------
def cli_part(args) -> dict:
    import torch

    home = Path(tempfile.mkdtemp(prefix="diffmine-gpu-"))
    env = dict(os.environ, DIFFMINE_HOME=str(home), PYTHONUNBUFFERED="1")
    if args.cpu:
        env["DIFFMINE_DEVICE"] = "cpu"
    timings: dict[str, float] = {}

    def diffmine(name: str, *command: str) -> dict:
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "app.cli", *command, "--json"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        timings[name] = time.perf_counter() - began
        if done.returncode:
            raise RuntimeError(f"diffmine {' '.join(command)} failed:\n{done.stderr[-3000:]}")
        print(f"  {name}: {timings[name]:.1f} s", flush=True)
        return json.loads(done.stdout)

    quick = args.quick
    per_label = "20" if quick else "200"
    diffmine("ingest", "ingest", "builtin:animals", "--name", "animals", "--limit-per-label", per_label)
    model = diffmine("train", "train", "animals", "--size", "tiny" if quick else "small",
                     "--steps", "4" if quick else "600", "--batch-size", "8" if quick else "128",
                     "--lr", "1e-3")["model"]
    runs = []
    for name, flags in [("score paper fp32 seed 0", ["--preset", "paper", "--seed", "0"]),
                        ("score paper fp32 seed 1", ["--preset", "paper", "--seed", "1"]),
                        ("score paper fp16 seed 0", ["--preset", "paper", "--precision", "fp16"]),
                        ("score fast fp16 seed 0", ["--preset", "fast", "--precision", "fp16"])]:
        if args.cpu and "fp16" in flags:
            continue  # a CPU worker refuses half precision (tested in tests/test_mining_run.py)
        result = diffmine(name, "score", str(model), *flags, *(["--draws", "4"] if quick else []))
        runs.append((name, result["run"], job_seconds(home, result["job"])))
    mined = diffmine("mine", "mine", str(runs[0][1]), "--per-label", "20" if quick else "100",
                     "--clusters", "2" if quick else "8")
    with sqlite3.connect(home / "diffmine.sqlite") as db:
        patch = db.execute("select id from patches where run_id = ? order by score desc limit 1",
                           (runs[0][1],)).fetchone()[0]
    diffmine("translate", "translate", "--patch", str(patch))
    diffmine("train through accelerate launch", "train", "animals", "--size", "tiny", "--steps",
             "4" if quick else "100", "--batch-size", "8" if quick else "128", "--processes", "1")

    rows, reference = [], None
    for name, run, seconds in runs:  # the job's own time: model load and scoring, no process start
        scores, maps = run_scores(home, run)
        row = agreement_row(name, torch.from_numpy(scores), torch.from_numpy(maps), seconds, reference)
        rows.append(row)
        if reference is None:
            reference = dict(row, scores=torch.from_numpy(scores), maps=torch.from_numpy(maps))
    return {"timings_s": timings, "mined": mined, "rows": rows}


def job_seconds(home: Path, job: int) -> float:
    from datetime import datetime

    with sqlite3.connect(home / "diffmine.sqlite") as db:
        started, finished = db.execute("select started_at, finished_at from jobs where id = ?", (job,)).fetchone()
    return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()


def run_scores(home: Path, run: int):
    """A run's image scores and maps, in (image, label) order, from the database and map files."""
    import numpy as np

    with sqlite3.connect(home / "diffmine.sqlite") as db:
        # Own labels only: an --all-labels run keeps maps under every label.
        rows = db.execute("select s.image_id, s.label_id, s.typicality, s.map_path from image_scores s "
                          "join image_labels l on l.image_id = s.image_id and l.label_id = s.label_id "
                          "where s.run_id = ? and s.map_path is not null order by s.image_id, s.label_id",
                          (run,)).fetchall()
    files: dict[str, dict] = {}
    maps = []
    for _, _, _, map_path in rows:
        file, key = map_path.rsplit(":", 1)  # "runs/R/maps/shard-N.npz:image_label"
        if file not in files:
            files[file] = dict(np.load(home / file))
        maps.append(files[file][key].astype(np.float32))
    return np.array([r[2] for r in rows], dtype=np.float32), np.stack(maps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU (to test this script)")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps and draws")
    parser.add_argument("--parts", default="sd,cli")
    parser.add_argument("--sd-steps", type=int, default=200)
    parser.add_argument("--sd-images", type=int, default=48)
    parser.add_argument("--out", required=True, help="folder for <part>.json")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --cpu to test the script")
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    for part in args.parts.split(","):
        began = time.perf_counter()
        try:
            result = sd_part(args, device) if part == "sd" else cli_part(args)
        except Exception as error:  # report and go on to the other part
            import traceback
            traceback.print_exc()
            result, failed = {"error": f"{type(error).__name__}: {error}"[:4000]}, True
        result.update(device=name, torch=torch.__version__, seconds=time.perf_counter() - began)
        (out / f"{part}.json").write_text(json.dumps(result, indent=2, default=float))
        print(f"{part}: {result['seconds']:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
