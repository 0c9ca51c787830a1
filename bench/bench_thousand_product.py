"""The 1,000-image target through the product, with the planted mark as its check (issue 13, item 7).

    python bench/bench_thousand_product.py --keep /tmp/thousand        # ~45 min on 2 cores
    python bench/bench_thousand_product.py --remine /tmp/thousand/home --run 1   # mining again, timed
    python bench/bench_thousand_product.py --quick                     # a smoke run (minutes)

One fresh home, the real command line in subprocesses, wall seconds on an otherwise idle machine
(the target is wall time):

* `diffmine ingest builtin:twemoji --render-size 128 --limit-per-label 116`: about 1,000 emoji
  (9 categories, up to 116 each), rendered from their SVGs at 128 px, with
  `--plant-mark "Animals & Nature" --plant-fraction 1 --plant-size 0.0625`: an 8 px mark (a red
  square with a yellow cross, app/ingest/plant.py) at a random place in every image of that
  category;
* `diffmine run --label-set category --image-size 128 --resolution 32 --steps 1500 --draws 8`
  (plus --flags): the train, score and mine jobs in one, as a user runs it. A thread reads the
  job's stage from the database every second, so each stage's wall seconds are printed;
* `diffmine evaluate RUN`: how much of the marked category's top cluster and of all its patches
  lie on the mark (`mark_overlap`), and the AUC-PR of its maps against the mark.

`--split N` asks the planted-mark question without the categories' own content competing with
the mark: N emoji drawn from every category (seeded), rendered at 128 px and flattened on white,
split at random into two labels, "marked" and "plain", in a folder per label; `diffmine ingest
FOLDER --plant-mark marked --plant-fraction 1` puts the mark in every "marked" image, so the mark
is all that tells the labels apart (as in the engine-level measurement of session 4, on real
images instead of smooth colour fields). Then the same `diffmine run` (its label set is the
folder's) and `diffmine evaluate`.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKED = "Animals & Nature"
RUN_FLAGS = ["--label-set", "category", "--image-size", "128", "--resolution", "32", "--steps", "1500",
             "--draws", "8"]


def diffmine(home: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home), "--json"],
                          capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"diffmine {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


class StageClock(threading.Thread):
    """Wall seconds of each (job kind, stage) of the running jobs, read from the database."""

    def __init__(self, database: Path):
        super().__init__(daemon=True)
        self.database, self.seconds, self.stopped = database, {}, threading.Event()

    def run(self) -> None:
        last, since = None, time.perf_counter()
        while not self.stopped.wait(1.0):
            try:
                with sqlite3.connect(self.database, timeout=5) as connection:
                    row = connection.execute("SELECT kind, stage FROM jobs WHERE status = 'running' "
                                             "ORDER BY id DESC LIMIT 1").fetchone()
            except sqlite3.Error:
                continue
            now = time.perf_counter()
            if last is not None:
                self.seconds[last] = self.seconds.get(last, 0.0) + now - since
            last, since = (row and f"{row[0]}:{row[1]}"), now

    def stop(self) -> dict:
        self.stopped.set()
        self.join()
        return {stage: round(seconds, 1) for stage, seconds in self.seconds.items() if stage}


def timed(home: Path, *args: str) -> tuple[dict, float, dict]:
    clock = StageClock(home / "diffmine.sqlite")
    clock.start()
    started = time.perf_counter()
    out = diffmine(home, *args)
    return out, time.perf_counter() - started, clock.stop()


def mark_found(home: Path, run: int, marked: str = MARKED) -> dict:
    evaluated = diffmine(home, "evaluate", str(run), "--draws", "2", "--max-images", "8")
    overlap = evaluated["mark_overlap"][marked]
    return dict(top_cluster=overlap["top_cluster"], all_patches=overlap["all_patches"],
                box_auc_pr=evaluated.get("box_auc_pr"), box_positive_rate=evaluated.get("box_positive_rate"))


def split_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` emoji of every category at 128 px, RGB on white, half in marked/ and half in plain/."""
    import random

    sys.path.insert(0, str(ROOT))
    from app.ingest.builtin import twemoji_entries

    entries, _ = twemoji_entries(128)
    chosen = random.Random(seed).sample(entries, count)
    for number, entry in enumerate(chosen):
        folder = root / ("marked" if number % 2 == 0 else "plain")
        folder.mkdir(parents=True, exist_ok=True)
        on_white(entry).save(folder / f"{number:05d}.png")
    return root


def on_white(entry):
    """An emoji entry's rendered RGBA image flattened on white (a PIL RGB image)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(entry.read())) as image:
        rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-label", type=int, default=116, help="emoji per category (116: about 1,000)")
    parser.add_argument("--flags", default="--tile-stride full --lr 1e-3",
                        help="more `diffmine run` flags, after the target's")
    parser.add_argument("--quick", action="store_true", help="8 emoji a category, 30 steps")
    parser.add_argument("--split", type=int, metavar="N",
                        help="N emoji split into marked / plain instead of the categories")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it")
    parser.add_argument("--remine", type=Path, metavar="HOME", help="mine RUN of this kept home again, timed")
    parser.add_argument("--run", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.remine:
        mined, wall, stages = timed(args.remine, "mine", str(args.run))
        result = dict(remine=args.run, wall_seconds=round(wall, 1), stages=stages, patches=mined["patches"],
                      **mark_found(args.remine, args.run))
    else:
        folder = args.keep or Path(tempfile.mkdtemp(prefix="thousand-"))
        home = folder / "home"
        per_label, steps = (8, "30") if args.quick else (args.per_label, "1500")
        marked = "marked" if args.split else MARKED
        if args.split:
            source = str(split_folder(folder / "split", 16 if args.quick else args.split))
            ingested = diffmine(home, "ingest", source, "--name", "tw", "--holdout", "0.1",
                                "--plant-mark", marked, "--plant-fraction", "1", "--plant-size", "0.0625")
        else:
            ingested = diffmine(home, "ingest", "builtin:twemoji", "--name", "tw", "--render-size", "128",
                                "--limit-per-label", str(per_label), "--min-per-label", "1", "--holdout", "0.1",
                                "--plant-mark", MARKED, "--plant-fraction", "1", "--plant-size", "0.0625")
        flags = [*RUN_FLAGS, *args.flags.split()]
        if args.split:  # the folder's one label set
            del flags[flags.index("--label-set"):flags.index("--label-set") + 2]
        flags[flags.index("--steps") + 1] = steps
        ran, wall, stages = timed(home, "run", "tw", *flags)
        result = dict(images=ingested.get("images"), flags=" ".join(flags), wall_seconds=round(wall, 1),
                      wall_minutes=round(wall / 60, 1), stages=stages, run=ran.get("run"),
                      **mark_found(home, ran["run"], marked))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
