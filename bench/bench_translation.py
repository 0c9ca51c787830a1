"""Translation benchmark: click-to-result seconds and fidelity of the fast and reference settings.

    python bench/bench_translation.py [--images 4] [--model FOLDER] [--threads 1] [--out results.json]

A click on a patch runs, in the worker (model already loaded, as the worker keeps it between
jobs), exactly what worker/handlers/translate.py runs: DDIM inversion of the 32 px view under
its own label, regeneration under every label in one batch, typicality of every translation
under its target label (8 stratified draws; the map's mean over the box), and a PNG per label.
That whole path is timed per setting; the model load (first click only) is timed apart.

Fidelity, per setting:
* reconstruction RMSE (pixels in [0, 1]) of the source label's own regeneration - with the
  setting's guidance (what the user sees in the row), and with guidance 1 (the inversion's own
  exactness: sampling then undoes inversion up to discretisation error);
* agreement with the reference: RMSE between the setting's translations and the reference
  setting's, over all labels;
* mean typicality of the translated crops under their target labels, and of the source crop
  under the same labels (how much translating raised it).

Model: the "small" 32 px pixel model (the demo model's architecture), trained briefly on
Animal-MNIST by bench/bench_typicality.py's recipe and cached in --model-dir (shared with that
bench), or any saved pixel model given with --model (e.g. the shipped demo weights).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.patches import default_patch_size  # noqa: E402
from worker.engine.registry import load_denoiser  # noqa: E402
from worker.engine.translation import FAST, REFERENCE, TranslationPreset, rmse, translate  # noqa: E402
from worker.handlers.translate import box_typicality, crop_box, save_png  # noqa: E402


def click(model, image, label: int, box, preset: TranslationPreset, folder: Path, *, guidance=None) -> dict:
    """One click, as the handler runs it (minus the database): seconds and what it produced."""
    start = time.perf_counter()
    source = model.condition([label])[0]
    result = translate(model, image, source, torch.eye(model.num_labels), invert_steps=preset.invert_steps,
                       sample_steps=preset.sample_steps,
                       guidance=preset.guidance if guidance is None else guidance)
    translated, before = box_typicality(model, result.images, image, box, draws=8, seed=0)
    x0, y0, x1, y1 = crop_box(box, image.shape[-1])
    for m in range(model.num_labels):
        save_png(result.images[m], folder / f"{m}.full.png")
        save_png(result.images[m][:, y0:y1, x0:x1], folder / f"{m}.png")
    return {"seconds": time.perf_counter() - start, "images": result.images,
            "reconstruction_error": result.reconstruction_error,
            "typicality": statistics.fmean(translated), "source_typicality": statistics.fmean(before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4, help="held-out images clicked per setting (up to 5)")
    parser.add_argument("--model", help="a saved pixel model folder (default: train or reuse the bench model)")
    parser.add_argument("--model-dir", default="/tmp/diffmine-bench")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import bench_typicality as typicality_bench

    images, labels = typicality_bench.animal_mnist()
    if args.model:
        source = args.model
    else:
        model, _ = typicality_bench.trained_model(images[:9000], labels[:9000], args)
        source = f"{args.model_dir}/animal-mnist-small-{args.train_steps}steps-seed{args.seed}"
        if not (Path(source) / "diffmine.json").exists():
            model.save(source)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        model = load_denoiser(source)  # what a worker's first click pays
        load_seconds = time.perf_counter() - start
        model.eval()
        resolution, k = model.resolution, default_patch_size(model.resolution)
        box = ((resolution - k) / 2, (resolution - k) / 2, (resolution + k) / 2, (resolution + k) / 2)
        # bench_typicality trains on all but the last 96 images: click on those
        held_out = [len(images) - 1 - 17 * i for i in range(min(args.images, 5))]
        # (name, preset, guidance override, the setting it is compared with)
        settings = [("reference", REFERENCE, None, "reference"), ("fast", FAST, None, "reference"),
                    ("reference, guidance 1", REFERENCE, 1.0, "reference, guidance 1"),
                    ("fast, guidance 1", FAST, 1.0, "reference, guidance 1"),
                    ("fast, guidance 3", FAST, 3.0, None)]
        rows = {name: [] for name, *_ in settings}
        print(f"model {source}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{model.num_labels} labels, {resolution} px, loaded in {load_seconds:.2f} s; box {k} px; "
              f"{args.threads} thread(s)", flush=True)
        for index in held_out:
            outputs = {}
            for name, preset, guidance, _ in settings:
                outputs[name] = click(model, images[index], int(labels[index]), box, preset, Path(scratch),
                                      guidance=guidance)
                print(f"  image {index} {name}: {outputs[name]['seconds']:.2f} s, reconstruction RMSE "
                      f"{outputs[name]['reconstruction_error']:.3f}", flush=True)
            for name, _, _, compared in settings:
                agreement = rmse(outputs[name]["images"], outputs[compared]["images"]) if compared else None
                rows[name].append(dict({k: v for k, v in outputs[name].items() if k != "images"},
                                       vs_reference=agreement))

    summary = {}
    for name, preset, guidance, compared in settings:
        data = rows[name]
        summary[name] = {
            "invert_steps": preset.invert_steps, "sample_steps": preset.sample_steps,
            "guidance": preset.guidance if guidance is None else guidance,
            "seconds_median": statistics.median(r["seconds"] for r in data),
            "seconds_max": max(r["seconds"] for r in data),
            "reconstruction_rmse": statistics.fmean(r["reconstruction_error"] for r in data),
            "vs_reference_rmse": statistics.fmean(r["vs_reference"] for r in data) if compared else None,
            "typicality": statistics.fmean(r["typicality"] for r in data),
            "source_typicality": statistics.fmean(r["source_typicality"] for r in data)}
    print("\n| setting | inversion / sampling steps | guidance | click to result, s (median, max) "
          "| reconstruction RMSE | RMSE vs reference | crop typicality under target (source) |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['invert_steps']} / {s['sample_steps']} | {s['guidance']:g} "
              f"| {s['seconds_median']:.2f}, {s['seconds_max']:.2f} | {s['reconstruction_rmse']:.3f} "
              f"| {'-' if s['vs_reference_rmse'] is None else format(s['vs_reference_rmse'], '.3f')} "
              f"| {s['typicality']:+.4f} ({s['source_typicality']:+.4f}) |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": platform.platform(),
            "torch": torch.__version__, "threads": args.threads, "model": source,
            "load_seconds": load_seconds, "images": held_out, "settings": summary}, indent=2))


if __name__ == "__main__":
    main()
