"""Image size (issue 13): what scoring whole images at N costs, and whether detail is found.

    python bench/bench_image_size.py --sections steps,scoring     # on this machine's CPU
    python bench/bench_image_size.py --sections planted --device cuda --out planted.json

Sections (ratios are taken within one run, so machine load cancels out):

* steps: training step time at a fixed crop size R = 32 against the image size N (32..256),
  data loading included. Crops are R x R whatever N is, so it should stay flat.
* scoring: seconds per image to score a 3:2 image at N = 32, 64, 128, 256 (fast preset at
  4 draws, one image per call), as the score job does it (tiles of the 32 px training size
  beyond it) and whole: should grow with the pixels, (N / 32)^2.
* planted: an 8 px mark planted in 128 px images of one label. Models trained on 32 px crops of
  the images at 128 px score them whole; the share of the label's top patches lying on the mark
  is the detail found. Compared: the UNet with attention at its coarsest level (as trained on
  32 px, that level is 4x4 times larger at 128 px) and a purely convolutional one, and the old
  squeeze (the images at 32 px, the mark then 2 px).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine.data import ImageDataset, View, multi_hot  # noqa: E402
from worker.engine.patches import default_patch_size, patch_scores, top_boxes, top_per_label  # noqa: E402
from worker.engine.presets import FAST  # noqa: E402
from worker.engine.registry import create_pixel_denoiser  # noqa: E402
from worker.engine.tiles import tiled_typicality, typicality_as_trained  # noqa: E402
from worker.engine.training import train  # noqa: E402
from worker.engine.typicality import typicality  # noqa: E402

SIZES = (32, 64, 128, 256)
MARK = 8
MARK_COLOUR = (255, 0, 255)


def synthetic_images(folder: Path, count: int, size: tuple[int, int], seed: int, marked: bool) -> list[tuple]:
    """Smooth random colour fields with fine noise, PNG files; with `marked`, each carries an
    8 px magenta square somewhere. Returns (path, mark box or None) per image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    out = []
    for i in range(count):
        coarse = torch.from_numpy(rng.random((1, 3, 4, 6)).astype(np.float32))
        field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        pixels = (field.permute(1, 2, 0).numpy() * 160 + 40 + rng.normal(0, 6, (height, width, 3))).clip(0, 255)
        box = None
        if marked:
            x, y = int(rng.integers(0, width - MARK)), int(rng.integers(0, height - MARK))
            pixels[y:y + MARK, x:x + MARK] = MARK_COLOUR
            box = (x, y, x + MARK, y + MARK)
        path = folder / f"{'m' if marked else 'p'}{seed}-{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        out.append((path, box))
    return out


def seconds(function, repeat: int = 1) -> float:
    began = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - began) / repeat


# --- steps ---------------------------------------------------------------------------------------
def bench_steps(folder: Path, device: str, quick: bool) -> list[dict]:
    images = synthetic_images(folder, 16 if quick else 64, (384, 256), seed=0, marked=False)
    steps = 3 if quick else 30
    rows = []
    for size in SIZES:
        dataset = ImageDataset([p for p, _ in images], multi_hot([i % 2 for i in range(len(images))], 2),
                               32, train=True, image_size=size)
        model = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="small").to(device)
        train(model, dataset, steps=2, batch_size=32, seed=0)  # warm-up
        per_step = seconds(lambda m=model, d=dataset: train(m, d, steps=steps, batch_size=32, seed=1)) / steps
        rows.append({"image_size": size, "seconds_per_step": per_step})
    for row in rows:
        row["vs_32"] = row["seconds_per_step"] / rows[0]["seconds_per_step"]
    return rows


# --- scoring -------------------------------------------------------------------------------------
def bench_scoring(folder: Path, device: str, quick: bool) -> list[dict]:
    images = synthetic_images(folder, 2 if quick else 6, (384, 256), seed=1, marked=False)
    model = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="small").to(device)
    preset = FAST.with_(draws=4)
    rows = []
    for size in SIZES[:2] if quick else SIZES:
        view = View(size)
        loaded = [view.load(p)[None].to(device) for p, _ in images]
        condition = multi_hot([0], 2)
        row = {"image_size": size, "shape": list(loaded[0].shape[-2:])}
        # as the score job does it (tiles of the training size beyond it), and the whole image
        for name, score in (("seconds_per_image", typicality_as_trained), ("whole_seconds_per_image", typicality)):
            score(model, loaded[0], condition, preset, seed=0)  # warm-up
            row[name] = seconds(lambda xs=loaded, c=condition, f=score: [f(model, x, c, preset, seed=0)
                                                                           for x in xs]) / len(loaded)
        rows.append(row)
    for row in rows:
        row["vs_32"] = row["seconds_per_image"] / rows[0]["seconds_per_image"]
        row["whole_vs_32"] = row["whole_seconds_per_image"] / rows[0]["whole_seconds_per_image"]
        row["pixels_vs_32"] = (row["shape"][0] * row["shape"][1]) / (rows[0]["shape"][0] * rows[0]["shape"][1])
    return rows


# --- planted -------------------------------------------------------------------------------------
def bench_planted(folder: Path, device: str, quick: bool, steps: int, count: int, draws: int,
                  workers: int = 0, only: str | None = None) -> dict:
    train_marked = synthetic_images(folder, count // 2, (128, 128), seed=2, marked=True)
    train_plain = synthetic_images(folder, count // 2, (128, 128), seed=3, marked=False)
    test_marked = synthetic_images(folder, 8 if quick else 48, (128, 128), seed=4, marked=True)
    paths = [p for p, _ in train_marked + train_plain]
    conditions = multi_hot([0] * len(train_marked) + [1] * len(train_plain), 2)
    variants = {
        "128 px, crops of 32, conv only": dict(image_size=128, attention=False),
        "128 px, crops of 32, attention at 1/8": dict(image_size=128, attention=True),
        "the 32 px squeeze (mark 2 px)": dict(image_size=32, attention=True),
    }
    results = {}
    for name, variant in variants.items():
        if only and not any(word in name for word in only.split(",")):
            continue
        model = create_pixel_denoiser(["marked", "plain"], resolution=32, seed=0, size="tiny" if quick else "small",
                                      attention=variant["attention"]).to(device)
        dataset = ImageDataset(paths, conditions, 32, train=True, image_size=variant["image_size"])
        began = time.perf_counter()
        result = train(model, dataset, steps=steps, batch_size=64, seed=0, lr=1e-3, num_workers=workers)
        trained = time.perf_counter() - began
        results[name] = dict(variant, train_seconds=trained, final_loss=result.final_loss,
                             **mark_found(model, test_marked, variant["image_size"], draws, device))
        print(f"  {name}: {results[name]}", flush=True)
        if variant["image_size"] > 32:
            tiled = f"{name}, scored in 32 px tiles (stride 16)"
            results[tiled] = dict(variant, **mark_found(model, test_marked, variant["image_size"], draws, device,
                                                        tiles=True))
            print(f"  {tiled}: {results[tiled]}", flush=True)
    return {"steps": steps, "train_images": count, "test_images": len(test_marked), "draws": draws,
            "variants": results}


def mark_found(model, images: list[tuple], size: int, draws: int, device: str, tiles: bool = False) -> dict:
    """How much of the detail is found: the share of images whose best box overlaps the mark,
    the share of the label's top patches (5 boxes per image, the best 3 per image's worth kept
    over the label) on the mark, and the median of the map's mean inside the mark over outside."""
    view, scale, patch = View(size), size / 128, default_patch_size(size)
    candidates, ratios, best_on_mark = [], [], []
    preset = FAST.with_(draws=draws)
    for path, box in images:
        score = (lambda *a, **k: tiled_typicality(*a, **k, tile=32)) if tiles else typicality
        result = score(model, view.load(path)[None].to(device), multi_hot([0], 2), preset, seed=0)
        heat = result.maps[0].cpu()
        x0, y0 = (math.floor(v * scale) for v in box[:2])
        x1, y1 = (math.ceil(v * scale) for v in box[2:])
        inside = heat[y0:y1, x0:x1]
        outside = (heat.sum() - inside.sum()) / (heat.numel() - inside.numel())
        ratios.append(float(inside.mean() / outside) if outside > 0 else float("nan"))
        boxes = top_boxes(patch_scores(heat, tuple(heat.shape), patch), patch, 5)
        on = [b.x0 < x1 and x0 < b.x1 and b.y0 < y1 and y0 < b.y1 for b in boxes]
        best_on_mark.append(on[0])
        candidates += [("marked", b.score, on_mark) for b, on_mark in zip(boxes, on)]
    kept = top_per_label(candidates, 3 * len(images))["marked"]
    return {"best_box_on_mark": float(np.mean(best_on_mark)),
            "top_patches_on_mark": float(np.mean([on_mark for _, on_mark in kept])),
            "inside_over_outside": float(np.nanmedian(ratios)), "patch_size": patch}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="steps,scoring,planted")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test")
    parser.add_argument("--steps", type=int, default=3000, help="planted: training steps")
    parser.add_argument("--images", type=int, default=512, help="planted: training images")
    parser.add_argument("--draws", type=int, default=8, help="planted: scoring draws")
    parser.add_argument("--workers", type=int, default=0, help="planted: data-loading processes")
    parser.add_argument("--variants", help="planted: only the variants whose names contain one of these words")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report: dict = {"device": args.device, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for section in args.sections.split(","):
            print(f"== {section}", flush=True)
            if section == "steps":
                report["steps"] = bench_steps(folder, args.device, args.quick)
            elif section == "scoring":
                report["scoring"] = bench_scoring(folder, args.device, args.quick)
            elif section == "planted":
                report["planted"] = bench_planted(folder, args.device, args.quick, args.steps,
                                                  args.images, args.draws, args.workers, args.variants)
            else:
                raise SystemExit(f"unknown section {section!r}")
            print(json.dumps(report[section], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
