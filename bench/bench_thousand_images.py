"""What the 1,000-image target costs per stage (issue 13, item 7): `diffmine run` at
`--image-size 128 --resolution 32 --steps 1500 --draws 8` in 30 minutes on 2 CPU cores.

    nice python bench/bench_thousand_images.py --out thousand.json

Measured in this process with the product's engine calls, in CPU seconds (user + system of this
process, `time.process_time`) at --threads torch threads (default 1), so that others' load on a
shared machine does not count; wall seconds are printed beside them:

* train: seconds per step of the default small UNet, batch 32, random 32 px crops of 128 px
  images decoded from PNG (`worker.engine.training.train`, as the train job calls it);
* score: seconds per 128 x 128 image at 8 draws, the score job's preset on a CPU
  (`worker.handlers.score.preset_for`: 64 rows per call, channels_last), images in batches of
  16 as a shard groups them, through `typicality_as_trained` at tile stride half (R/2, the
  default) and full (R); and at 256 rows per call (--rows);
* reference: one 3:2 image at 128 px, 4 draws, one image per call, stride half: the setting
  that docs/benchmarks.md ("Cost against the image size", session 4) timed at 3.28 s wall on
  2 threads, so the ratio of the two says how far 2 threads beat 1 on this machine.

Mining is measured through the CLI by bench/bench_planted_product.py (its seconds per image).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.params import RunParams  # noqa: E402
from worker.engine.data import ImageDataset, View, multi_hot  # noqa: E402
from worker.engine.registry import create_pixel_denoiser  # noqa: E402
from worker.engine.tiles import typicality_as_trained  # noqa: E402
from worker.engine.training import train  # noqa: E402
from worker.handlers.score import preset_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_image_size import synthetic_images  # noqa: E402


def timed(function) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    function()
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_train(folder: Path, steps: int) -> dict:
    images = synthetic_images(folder, 64, (128, 128), seed=0, marked=False)
    dataset = ImageDataset([p for p, _ in images], multi_hot([i % 3 for i in range(len(images))], 3),
                           32, train=True, image_size=128)
    model = create_pixel_denoiser(["a", "b", "c"], resolution=32, seed=0, size="small")
    train(model, dataset, steps=2, batch_size=32, seed=0, lr=1e-3)  # warm-up
    cpu, wall = timed(lambda: train(model, dataset, steps=steps, batch_size=32, seed=1, lr=1e-3))
    return {"steps": steps, "cpu_per_step": cpu / steps, "wall_per_step": wall / steps}


def bench_score(folder: Path, count: int, draws: int) -> list[dict]:
    images = synthetic_images(folder, count, (128, 128), seed=1, marked=False)
    model = create_pixel_denoiser(["a", "b", "c"], resolution=32, seed=0, size="small")
    batch = torch.stack([View(128).load(p) for p, _ in images])
    conditions = multi_hot([i % 3 for i in range(count)], 3)
    preset = preset_for(RunParams(preset="fast", draws=draws), model)
    rows = []
    for stride, forward_batch in (("half", None), ("full", None), ("half", 256), ("full", 256)):
        chosen = preset.with_(forward_batch=forward_batch) if forward_batch else preset
        cpu, wall = timed(lambda p=chosen, s=stride: typicality_as_trained(model, batch, conditions, p, seed=0,
                                                                           tile_stride=s))
        rows.append({"tile_stride": stride, "rows_per_call": chosen.forward_batch, "draws": draws,
                     "cpu_per_image": cpu / count, "wall_per_image": wall / count})
    return rows


def bench_reference(folder: Path) -> dict:
    """docs/benchmarks.md's session-4 setting: a 3:2 image at 128 px, 4 draws, one per call."""
    from worker.engine.presets import FAST

    images = synthetic_images(folder, 3, (384, 256), seed=2, marked=False)
    model = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="small")
    loaded = [View(128).load(p)[None] for p, _ in images]
    preset, condition = FAST.with_(draws=4), multi_hot([0], 2)
    typicality_as_trained(model, loaded[0], condition, preset, seed=0)  # warm-up
    cpu, wall = timed(lambda: [typicality_as_trained(model, x, condition, preset, seed=0) for x in loaded])
    return {"cpu_per_image": cpu / len(loaded), "wall_per_image": wall / len(loaded),
            "session_4_wall_2_threads": 3.28}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--images", type=int, default=16, help="images scored per setting")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"threads": args.threads, "train": bench_train(Path(tmp), args.steps),
                  "score": bench_score(Path(tmp), args.images, args.draws),
                  "reference": bench_reference(Path(tmp))}
    print(json.dumps(result, indent=1))
    per_step = result["train"]["cpu_per_step"]
    print(f"\nCPU seconds at {args.threads} thread(s); extrapolated linearly to 1,500 steps and 1,000 images:")
    print(f"train: {per_step:.3f} s/step -> {1500 * per_step / 60:.1f} min")
    for row in result["score"]:
        print(f"score, stride {row['tile_stride']}, {row['rows_per_call']} rows/call, {row['draws']} draws: "
              f"{row['cpu_per_image']:.2f} s/image -> {1000 * row['cpu_per_image'] / 60:.1f} min")
    reference = result["reference"]
    print(f"reference (session 4: 3.28 s wall on 2 threads): {reference['cpu_per_image']:.2f} CPU s/image "
          f"at {args.threads} thread(s), {reference['cpu_per_image'] / 3.28:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
