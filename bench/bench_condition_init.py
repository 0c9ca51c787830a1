"""Where the pixel model's condition rows start, and how fast it learns a label (issue 13, item 7).

    python bench/bench_condition_init.py --threads 2     # about 8 minutes on 2 cores

The pixel model adds a learned row per label (or a null row, for the unconditional model) to its
timestep embedding (worker/engine/pixel.py). Today the label rows start as unit-scale random
vectors and the null row at zero, so the conditional and the unconditional model start as
different functions; typicality, their difference, is then partly a leftover of that start. The
alternative measured here: every row, the null one included, starts at one random vector, so
typicality is 0 everywhere before training ("shared"), optionally with the rows' learning rate
scaled up so they can move apart faster.

Data: 32 px dim colour fields, half of them ("marked") with a bright 8 px square at one fixed
place (the tests' planted data, which a tiny model learns in seconds). Tiny model, batch 16, the
training step counts and learning rates below. Printed: the mean typicality map on the mark and
off it on 16 unseen marked images (fast preset, 8 draws), the off-mark 99th percentile, and how
far the "marked" row has moved from the null row. Each way of starting the rows trains and scores
at its own seed (0, 1, 2, 3), so no two share noise. The data are a copy of the tests' planted
data (tests/engine/conftest.py, `planted_dataset`), not imported: a bench does not reach into the
tests.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import training  # noqa: E402
from worker.engine.presets import FAST  # noqa: E402
from worker.engine.registry import create_pixel_denoiser  # noqa: E402
from worker.engine.typicality import typicality  # noqa: E402

SIZE, MARK = 32, 8
SCHEDULES = ((1e-3, 80), (1e-4, 300), (1e-4, 1000))


def planted(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    images = (torch.nn.functional.interpolate(coarse, size=SIZE, mode="bicubic", align_corners=False)
              * 1.2 - 1.0).clamp(-1, 0.3)
    labels = torch.arange(count) % 2
    masks = torch.zeros(count, SIZE, SIZE, dtype=torch.bool)
    masks[labels == 0, SIZE // 4:SIZE // 4 + MARK, SIZE // 2:SIZE // 2 + MARK] = True
    images = torch.where(masks[:, None], torch.ones_like(images), images)
    return images, torch.nn.functional.one_hot(labels, 2).float(), masks


def start_rows_together(model) -> None:
    """Every label row and the null row set to the first label's random row: the conditional
    and the unconditional model become one function (typicality 0 everywhere)."""
    with torch.no_grad():
        model.null_embedding.copy_(model.label_embedding[0])
        model.label_embedding.copy_(model.label_embedding[0].expand_as(model.label_embedding))


def trained(start: str, row_lr_scale: float, lr: float, steps: int, data, seed: int) -> torch.nn.Module:
    model = create_pixel_denoiser(["marked", "plain"], resolution=SIZE, seed=seed, size="tiny")
    rows = (model.label_embedding, model.null_embedding)
    if start == "shared":
        start_rows_together(model)
    adamw = torch.optim.AdamW

    def with_row_lr(params, lr, **options):  # the rows in a group of their own
        params = list(params)
        return adamw([{"params": [p for p in params if all(p is not r for r in rows)]},
                      {"params": list(rows), "lr": lr * row_lr_scale}], lr=lr, **options)

    training.torch.optim.AdamW = with_row_lr
    try:
        training.train(model, torch.utils.data.TensorDataset(*data[:2]), steps=steps, batch_size=16, seed=seed, lr=lr)
    finally:
        training.torch.optim.AdamW = adamw
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = planted(256, seed=0)
    test, conditions, masks = (t[::2][:16] for t in planted(32, seed=5))  # marked ones only
    print("| rows start | seed | row lr | lr | steps | map on the mark | off it | off-mark 99th pct | row - null |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    starts = (("random labels, zero null (today)", 1), ("shared", 1), ("shared", 10), ("shared", 100))
    for seed, (start, scale) in enumerate(starts):
        for lr, steps in SCHEDULES:
            model = trained(start.split()[0], scale, lr, steps, data, seed)
            with torch.no_grad():
                maps = typicality(model, test, conditions, FAST.with_(draws=8), seed=seed).maps
                apart = (model.label_embedding[0] - model.null_embedding).norm()
            print(f"| {start} | {seed} | x{scale} | {lr:g} | {steps} | {maps[masks].mean():.4f} "
                  f"| {maps[~masks].mean():.5f} | {maps[~masks].quantile(0.99):.4f} | {apart:.2f} |", flush=True)


if __name__ == "__main__":
    main()
