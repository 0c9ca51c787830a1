"""What the holdout classifier should show a model trained on crops of larger images (issue 13).

    python bench/bench_holdout_view.py /tmp/k1/home --images 48 --draws 8 --threads 2

A pixel model trained with `--image-size N --resolution R` (R < N) has seen R x R crops of
images at N. The diffusion classifier (argmin loss over labels, docs/method.md section 2) on
its holdout images can show it each image three ways:

* squeeze: the shorter side resized to R, the centre R x R crop: the whole image at R/N of
  the scale the model learnt (what the train job measured before session 8);
* crop: the image at N, its centre R x R crop: the scale it learnt, a 1/(N/R)^2 part of the image;
* tiles: the image at N, whole, through R x R tiles side by side (the score job's
  `--tile-stride full`), the losses averaged over the tiles: the scale it learnt and every
  pixel, for about (N/R)^2 times the passes.

One kept home (for example `bench_thousand_product.py --keep`), its first trained model, the
same `--images` holdout images for every view, the fast preset at `--draws`. Each view draws
at its own seed (`--seed`, `--seed` + 1, ...), so the spread between views is not one draw's
noise told three times. Printed: accuracy, chance, the denoiser passes per image, seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import session_scope  # noqa: E402
from app.models import TrainedModel  # noqa: E402
from app.services.runs import examples  # noqa: E402
from app.settings import Settings  # noqa: E402
from worker.engine.data import ImageDataset, View, load_view_groups  # noqa: E402
from worker.engine.presets import FAST  # noqa: E402
from worker.engine.registry import load_denoiser  # noqa: E402
from worker.engine.tiles import label_scores_as_trained, passes_per_draw  # noqa: E402
from worker.handlers.evaluate import spread_sample  # noqa: E402

VIEWS = ("squeeze", "crop", "tiles")


def holdout_of(home: Path, images: int):
    settings = Settings(home=home)
    with session_scope(settings) as session:
        model = session.query(TrainedModel).order_by(TrainedModel.id).first()
        holdout = examples(session, settings, label_set_id=model.label_set_id, split="holdout")
        config, weights = dict(model.config), model.weights_dir
    weights = Path(weights) if Path(weights).is_absolute() else settings.home_dir / weights
    return spread_sample(holdout, images), config, weights  # the train job's own choice of images


def view_batches(view: str, paths: list[str], *, resolution: int, image_size: int):
    """[(indices into paths, images [B, 3, H, W])] as `view` shows them."""
    if view == "tiles":
        return load_view_groups(paths, View(image_size))
    dataset = ImageDataset(paths, torch.zeros(len(paths), 1), resolution=resolution, train=False,
                           image_size=image_size if view == "crop" else resolution)
    return [(list(range(len(paths))), torch.stack([dataset[i][0] for i in range(len(paths))]))]


def accuracy(denoiser, holdout, view: str, *, config: dict, draws: int, seed: int) -> dict:
    preset = FAST.with_(name=f"classifier-{draws}", draws=draws)
    started, correct, passes = time.perf_counter(), 0, 0
    for indices, images in view_batches(view, [e.path for e in holdout], resolution=config["resolution"],
                                        image_size=config["image_size"]):
        for start in range(0, len(indices), 16):
            chunk, batch = indices[start:start + 16], images[start:start + 16]
            predicted = label_scores_as_trained(denoiser, batch, preset, seed=seed, tile_stride="full").predicted
            correct += sum(int(p) in holdout[i].label_indices for i, p in zip(chunk, predicted.tolist()))
            passes += len(chunk) * draws * (denoiser.num_labels + 1) * passes_per_draw(denoiser, batch, "full")
    return dict(view=view, seed=seed, accuracy=round(correct / len(holdout), 3),
                chance=round(1 / denoiser.num_labels, 3), passes_per_image=passes // len(holdout),
                seconds=round(time.perf_counter() - started, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("home", type=Path, help="a kept diffmine home with a trained pixel model")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--views", default=",".join(VIEWS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    holdout, config, weights = holdout_of(args.home, args.images)
    if not config.get("image_size") or config["image_size"] <= config["resolution"]:
        raise SystemExit(f"the model was trained on whole images ({config}): nothing to compare")
    denoiser = load_denoiser(weights, device="cpu")
    rows = []
    for offset, view in enumerate(args.views.split(",")):
        rows.append(accuracy(denoiser, holdout, view, config=config, draws=args.draws, seed=args.seed + offset))
        print(json.dumps(rows[-1]), flush=True)
    result = dict(home=str(args.home), images=len(holdout), draws=args.draws, config=config, rows=rows)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
