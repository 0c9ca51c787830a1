"""A planted 8 px mark in 128 px images, through the whole product (issue 13, item 7).

    nice python bench/bench_planted_product.py --out planted.json   # docs/benchmarks.md's numbers
    python bench/bench_planted_product.py --quick                    # a smoke run (minutes)

Data: Twemoji, the builtin dataset's 72 px PNGs of three categories, flattened on white and
upscaled to 128 px (bicubic) into a folder per category, then `diffmine ingest --plant-mark`
paints an 8 px mark (`--plant-size 0.0625` of the 128 px side: a red square with a yellow cross,
app/ingest/plant.py) at a random place in a share of one category's images.

Everything runs through the real command line in subprocesses, in one fresh home:

* `diffmine train --image-size 128 --resolution 32`: a pixel model on 32 px crops of the images
  at 128 px; `diffmine score` it with `--tile-stride half` (the default: 32 px tiles at stride
  16) and with `--tile-stride full` (stride 32, about 4x fewer tiles), each then `diffmine mine`
  and `diffmine evaluate`;
* the old squeeze: `diffmine train --image-size 32 --resolution 32` (the whole image at 32 px,
  the mark then 2 px), scored, mined and evaluated the same way.

`diffmine run` is these train, score and mine jobs in one (worker/handlers/pipeline.py); they
are run one by one here so that each stage's time is measured. Printed per configuration: the
marked label's top cluster and all its patches on the mark (`diffmine evaluate`'s
mark_overlap), the AUC-PR of its maps against the mark boxes, and each stage's seconds, with
seconds per scored image and per training step for extrapolating to larger datasets. Seconds
are CPU seconds (user + system) of each command at --threads torch threads (default 1), so that
load from others on a shared machine does not count; configurations can run as separate
processes (--configs) at once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATEGORIES = ("Animals & Nature", "Food & Drink", "Smileys & Emotion")
MARKED = "Animals & Nature"
SIZE, MARK = 128, 8
#: name -> (image size, tile stride or None for scoring at the training size)
CONFIGS = {"128 px, tiles at stride 16 (half)": (128, "half"),
           "128 px, tiles at stride 32 (full)": (128, "full"),
           "32 px squeeze": (32, None)}


def twemoji_folder(root: Path, per_label: int, seed: int) -> Path:
    """`per_label` emoji of each of CATEGORIES as 128 px RGB PNGs, a folder per category."""
    import io
    import random

    from PIL import Image

    from app.ingest.builtin import twemoji_entries

    entries, _ = twemoji_entries()
    rng = random.Random(seed)
    for category in CATEGORIES:
        chosen = rng.sample([e for e in entries if e.labels["category"][0] == category], per_label)
        folder = root / category
        folder.mkdir(parents=True)
        for entry in chosen:
            with Image.open(io.BytesIO(entry.read())) as image:
                rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            flat.resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(folder / Path(entry.path).name)
    return root


#: torch threads of each command (OMP_NUM_THREADS): 1 measures a core's work without OpenMP
#: spinning inflating the CPU time on a loaded machine (--threads)
THREADS = {"count": 1}


def diffmine(home: Path, *args: str) -> tuple[dict, float]:
    """`diffmine ARGS --home HOME --json`: its JSON output and the CPU seconds (user + system)
    it took. CPU time, not wall time: the 2 cores of the machine these numbers were taken on are
    shared, and a command's wall time there says more about its neighbours than about it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home), "--json"],
                          capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS["count"])})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"diffmine {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def mine_flags(args) -> list[str]:
    flags = [] if args.per_label is None else ["--per-label", str(args.per_label)]
    return flags + ([] if args.clusters is None else ["--clusters", str(args.clusters)])


def mark_found(home: Path, run: int) -> dict:
    """`diffmine evaluate`'s planted-mark numbers for the marked label of a run."""
    evaluated, _ = diffmine(home, "evaluate", str(run), "--draws", "2", "--max-images", "8")
    overlap = evaluated["mark_overlap"][MARKED]
    return dict(top_cluster=overlap["top_cluster"], all_patches=overlap["all_patches"],
                box_auc_pr=evaluated.get("box_auc_pr"), box_positive_rate=evaluated.get("box_positive_rate"))


def remine(home: Path, runs: list[int], args) -> list[dict]:
    """Mine runs of an earlier --keep home again with other mining options, and evaluate them."""
    rows = []
    for run in runs:
        mined, seconds = diffmine(home, "mine", str(run), *mine_flags(args))
        row = dict(run=run, per_label=args.per_label, clusters=args.clusters, patches=mined["patches"],
                   mine_seconds=seconds, **mark_found(home, run))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def measure(home: Path, args) -> list[dict]:
    train_flags = ["--resolution", "32", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--size", args.size, "--lr", str(args.lr)]
    score_flags = ["--preset", args.preset, "--draws", str(args.draws)]
    models: dict[int, tuple[int, float]] = {}
    rows = []
    chosen = list(CONFIGS.items())
    if args.configs:
        chosen = [chosen[int(i)] for i in args.configs.split(",")]
    for name, (image_size, stride) in chosen:
        if image_size not in models:
            trained, seconds = diffmine(home, "train", "planted", "--image-size", str(image_size), *train_flags)
            models[image_size] = (trained["model"], seconds)
            print(f"trained model {trained['model']} at {image_size} px: {seconds:.0f} s", flush=True)
        model, train_seconds = models[image_size]
        stride_flags = ["--tile-stride", stride] if stride else []
        scored, score_seconds = diffmine(home, "score", str(model), *score_flags, *stride_flags)
        run = scored["run"]
        mined, mine_seconds = diffmine(home, "mine", str(run), *mine_flags(args))
        row = dict(config=name, image_size=image_size, tile_stride=stride, model=model, run=run,
                   **mark_found(home, run), patches=mined["patches"], clusters=mined["clusters"],
                   images=scored["images"],
                   train_seconds=train_seconds, score_seconds=score_seconds, mine_seconds=mine_seconds,
                   seconds_per_step=train_seconds / max(1, args.steps),
                   score_seconds_per_image=score_seconds / scored["images"],
                   mine_seconds_per_image=mine_seconds / scored["images"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def report(rows: list[dict], args) -> None:
    print(f"\nTwemoji at {SIZE} px, {args.per_label_images} per category x {len(CATEGORIES)}, "
          f"8 px mark in {args.plant_fraction:.0%} of {MARKED!r}; {args.size} model, {args.steps} steps, "
          f"batch {args.batch_size}, lr {args.lr}; {args.preset} preset at {args.draws} draws")
    print("| configuration | top cluster on the mark | all patches | AUC-PR (positive rate) "
          "| train CPU s (per step) | score CPU s/image | mine CPU s/image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        top = "-" if r["top_cluster"] is None else f"{r['top_cluster']:.2f}"
        auc = "-" if r["box_auc_pr"] is None else f"{r['box_auc_pr']:.3f} ({r['box_positive_rate']:.4f})"
        print(f"| {r['config']} | {top} | {r['all_patches']:.2f} | {auc} | {r['train_seconds']:.0f} "
              f"({r['seconds_per_step']:.3f}) | {r['score_seconds_per_image']:.2f} "
              f"| {r['mine_seconds_per_image']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-label-images", type=int, default=64, help="emoji per category")
    parser.add_argument("--plant-fraction", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", default="small")
    parser.add_argument("--lr", type=float, default=1e-3, help="a model trained from scratch (docs/cli.md)")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--per-label", type=int, help="mining: patches per label (default the paper's)")
    parser.add_argument("--clusters", type=int, help="mining: clusters per label (default the paper's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 images a category, 20 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", help="comma-separated indices into CONFIGS (default: all)")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (data and home)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per command")
    parser.add_argument("--remine", type=Path, metavar="HOME",
                        help="only mine the --runs of this home (a --keep folder's) again and evaluate them")
    parser.add_argument("--runs", default="1", help="with --remine: comma-separated run ids")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    THREADS["count"] = args.threads
    if args.remine:
        remine(args.remine, [int(r) for r in args.runs.split(",")], args)
        return
    if args.quick:
        args.per_label_images, args.steps, args.draws = 8, 20, 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        source = twemoji_folder(work / "src", args.per_label_images, args.seed)
        home = work / "home"
        _, ingest_seconds = diffmine(home, "ingest", str(source), "--name", "planted", "--plant-mark", MARKED,
                                     "--plant-fraction", str(args.plant_fraction),
                                     "--plant-size", str(MARK / SIZE), "--seed", str(args.seed))
        print(f"ingested {len(CATEGORIES) * args.per_label_images} images: {ingest_seconds:.0f} s", flush=True)
        rows = measure(home, args)
    report(rows, args)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "ingest_seconds": ingest_seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
