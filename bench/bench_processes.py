"""Scoring throughput on this machine's cores: one process with every thread vs one process per
core with one thread each (what `diffmine demo` does with its two label sets).

    python bench/bench_processes.py [--weights demo/weights/twemoji-category] [--images 256]

Prints images/s of each layout with the shipped demo model, `fast` preset, 4 draws.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def score(weights: str, images: int, threads: int) -> float:
    """Images/s of one process scoring `images` random images with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    from worker.engine.presets import get_preset
    from worker.engine.registry import load_denoiser
    from worker.engine.typicality import typicality

    denoiser = load_denoiser(weights)
    x = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    conditions = denoiser.condition([0] * images)
    preset = get_preset("fast").with_(draws=4)
    typicality(denoiser, x[:64], conditions[:64], preset, seed=0)  # warm-up
    started = time.perf_counter()
    typicality(denoiser, x, conditions, preset, seed=0)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="demo/weights/twemoji-category")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(score(args.weights, args.images, args.child))
        return
    cores = os.cpu_count() or 1
    command = [sys.executable, __file__, "--weights", args.weights, "--images", str(args.images)]
    one = float(subprocess.run([*command, "--child", str(cores)], capture_output=True, text=True,
                               check=True).stdout)
    children = [subprocess.Popen([*command, "--child", "1"], stdout=subprocess.PIPE, text=True)
                for _ in range(cores)]
    several = sum(float(child.communicate()[0]) for child in children)
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"one process, {cores} threads: {one:.1f} images/s")
    print(f"{cores} processes, 1 thread each: {several:.1f} images/s ({several / one:.2f}x)")


if __name__ == "__main__":
    main()
