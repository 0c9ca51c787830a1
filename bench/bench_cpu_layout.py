"""The score job's CPU layout for pixel models: channels_last at 64 rows per call (worker/handlers/
score.py CPU_PIXEL_LAYOUT) against the presets' contiguous 128, through the real typicality path.

    python bench/bench_cpu_layout.py [--threads 1 2] [--images 64] [--draws 8] [--rounds 4]

One process, the two layouts in interleaved rounds (best of each), a "small" 32 px pixel model
(1.1 M parameters; its weights do not change the speed), the fast preset at `--draws`; prints
passes/s per layout and thread count, and the largest score difference between the layouts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.presets import FAST  # noqa: E402
from worker.engine.registry import create_pixel_denoiser  # noqa: E402
from worker.engine.typicality import typicality  # noqa: E402
from worker.handlers.score import CPU_PIXEL_LAYOUT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    labels = [f"label {i}" for i in range(10)]
    model = create_pixel_denoiser(labels, resolution=32, seed=0, size="small").eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, 32, 32, generator=g) * 2 - 1
    conditions = torch.nn.functional.one_hot(torch.arange(args.images) % len(labels), len(labels)).float()
    layouts = {"presets' default (128 rows, contiguous)": FAST.with_(draws=args.draws),
               "CPU_PIXEL_LAYOUT (64 rows, channels_last)": FAST.with_(draws=args.draws, **CPU_PIXEL_LAYOUT)}
    passes = args.images * args.draws * 2
    print("| torch threads | layout | passes/s | vs default |\n|---:|---|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        best = dict.fromkeys(layouts, float("inf"))
        for _ in range(args.rounds):
            for name, preset in layouts.items():
                start = time.perf_counter()
                typicality(model, images, conditions, preset, seed=0)
                best[name] = min(best[name], time.perf_counter() - start)
        reference = next(iter(best.values()))
        for name, seconds in best.items():
            print(f"| {threads} | {name} | {passes / seconds:.0f} | {reference / seconds:.2f}x |", flush=True)
    scores = [typicality(model, images, conditions, preset, seed=0).scores for preset in layouts.values()]
    print(f"\nlargest score difference between the layouts: {(scores[0] - scores[1]).abs().max():.1e} "
          f"(scores ~{scores[0].abs().mean():.1e})")


if __name__ == "__main__":
    main()
