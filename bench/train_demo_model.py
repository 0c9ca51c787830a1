"""Train the shipped demo models (the Twemoji dataset, one model per label set) with the engine
alone: no database, so it runs on a bare GPU machine with only torch and diffusers.

    python bench/train_demo_model.py --data DIR --label-set category --out demo/weights/twemoji-category

DIR holds the images and a manifest.json written by `--export HOME` (from a diffmine data
directory that ingested builtin:twemoji). The recipe is the reference one (AdamW 1e-4, betas
0.9/0.999, weight decay 1e-2, grad clip 1.0, 10% label dropout, uniform t) on the "small" pixel
model, trained on random R x R crops (--resolution) of the images resized to shorter side N
(--image-size); the numbers used for the shipped weights are in docs/demo.md and in each
weights folder's training.json. On a CPU, run one torch thread per model (--threads 1) and
`nice` it on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def export(home: Path, target: Path, dataset: str = "twemoji") -> None:
    """Copy a diffmine dataset's images and labels into a self-contained folder."""
    import sqlite3

    db = sqlite3.connect(home / "diffmine.sqlite")
    (dataset_id,) = db.execute("select id from datasets where name = ?", (dataset,)).fetchone()
    sets = {}
    for set_id, set_name in db.execute("select id, name from label_sets where dataset_id = ?", (dataset_id,)):
        sets[set_name] = [n for (n,) in db.execute(
            "select name from labels where label_set_id = ? order by position", (set_id,))]
    images = {}
    query = """select i.id, i.stored_path, i.split, s.name, l.name from images i
               join image_labels il on il.image_id = i.id join labels l on l.id = il.label_id
               join label_sets s on s.id = l.label_set_id where i.dataset_id = ? order by i.id"""
    (target / "images").mkdir(parents=True, exist_ok=True)
    for image_id, stored, split, set_name, label in db.execute(query, (dataset_id,)):
        name = f"images/{image_id}{Path(stored).suffix}"
        if image_id not in images:
            shutil.copyfile(home / stored, target / name)
            images[image_id] = {"path": name, "split": split, "labels": {}}
        images[image_id]["labels"].setdefault(set_name, []).append(label)
    (target / "manifest.json").write_text(json.dumps({"label_sets": sets, "images": list(images.values())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, help="write --data from this diffmine home and stop")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--label-set")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--max-seconds", type=float, help="stop earlier at a checkpoint boundary")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=32, help="R: the side of the training crops")
    parser.add_argument("--image-size", type=int, help="N: crops are taken from the images resized to "
                                                       "shorter side N (default: R, the whole image)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--base", type=Path, help="start from this saved pixel model: all of it when "
                                                  "its labels are the label set's, else its UNet only")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--size", default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    args = parser.parse_args()
    if args.export:
        export(args.export, args.data)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from worker.engine.data import ImageDataset, multi_hot
    from worker.engine.registry import create_pixel_denoiser
    from worker.engine.training import train

    manifest = json.loads((args.data / "manifest.json").read_text())
    labels = manifest["label_sets"][args.label_set]
    index = {name: i for i, name in enumerate(labels)}
    train_rows = [im for im in manifest["images"] if im["split"] == "train" and args.label_set in im["labels"]]
    dataset = ImageDataset([args.data / im["path"] for im in train_rows],
                           multi_hot([[index[label] for label in im["labels"][args.label_set]] for im in train_rows],
                                     len(labels)), resolution=args.resolution, train=True,
                           image_size=args.image_size)
    denoiser = create_pixel_denoiser(labels, resolution=args.resolution, seed=args.seed, size=args.size)
    if args.base:
        from worker.engine.registry import load_denoiser

        base = load_denoiser(args.base)
        if base.labels == labels:
            denoiser = base
        else:  # another label set: the UNet's knowledge of the images, new label embeddings
            denoiser.unet.load_state_dict(base.unet.state_dict())
    denoiser = denoiser.to(args.device)
    started = time.time()
    deadline = started + args.max_seconds if args.max_seconds else None

    class OutOfTime(Exception):
        pass

    def progress(done, total, loss):
        if done % args.checkpoint_every == 0:
            print(f"{args.label_set}: step {done}/{total} loss {loss:.4f} "
                  f"{time.time() - started:.0f}s", flush=True)
        if deadline and time.time() > deadline and done % args.checkpoint_every == 0:
            raise OutOfTime(done)

    checkpoints = args.out.parent / f".{args.out.name}-checkpoints"
    try:
        result = train(denoiser, dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, checkpoint_dir=checkpoints,
                       checkpoint_every=args.checkpoint_every, progress=progress)
        steps, final_loss = result.steps, result.final_loss
    except OutOfTime as stop:
        # The last checkpoint (this very step) holds the weights: reload them from it.
        from worker.engine.training import latest_checkpoint

        steps = int(stop.args[0])
        result = train(denoiser, dataset, steps=steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                       checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every)
        final_loss = result.final_loss
        assert latest_checkpoint(checkpoints) is not None
    denoiser.eval()
    denoiser.save(args.out)
    shutil.rmtree(checkpoints, ignore_errors=True)
    record = {"label_set": args.label_set, "steps": steps, "batch_size": args.batch_size,
              "resolution": args.resolution, "image_size": args.image_size or args.resolution,
              "lr": args.lr, "size": args.size, "seed": args.seed,
              "base": str(args.base) if args.base else None,
              "final_loss": final_loss, "seconds": round(time.time() - started, 1),
              "device": (torch.cuda.get_device_name() if args.device == "cuda"
                         else f"{args.device}: {platform.processor() or platform.machine()}, "
                              f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"),
              "train_images": len(train_rows)}
    (args.out / "training.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
