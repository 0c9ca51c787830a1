"""Benchmark the mining engine: DIFT per image vs per patch, k-means, vector search, patch mining,
and the whole mine job (patches, DIFT features, FAISS index, clusters, crops) at 1x-8x images.

    python bench/bench_mining.py            # full run (~5-10 min on 2 busy CPU cores)
    python bench/bench_mining.py --quick    # smoke run, small sizes

Prints Markdown tables (the "Mining" section of docs/benchmarks.md). Everything is seeded;
timings are wall-clock on this machine and only comparable within one run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import faiss
import numpy as np
import torch

from app.vector_index import add_batches, build_index, create_index, search
from worker.engine.clustering import cluster_features
from worker.engine.dift import patch_features, patch_features_per_patch
from worker.engine.patches import default_patch_size, patch_scores, top_boxes, top_per_label
from worker.engine.registry import create_pixel_denoiser


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def best_of(repeats: int, function, *args, **kwargs):
    """The fastest of `repeats` runs: on a shared machine, the run least disturbed by others."""
    runs = [timed(function, *args, **kwargs) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    """I.i.d. Gaussian directions: the worst case for approximate search (no structure at all)."""
    rows = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    faiss.normalize_L2(rows)
    return rows


def clustered_rows(count: int, dim: int, seed: int, centers: int = 1000, spread: float = 0.35) -> np.ndarray:
    """Rows around `centers` directions: closer to real patch features (which form visual elements).

    Data and queries must come from one call (the same centers); split the rows afterwards.
    """
    rng = np.random.default_rng(seed)
    middles = rng.standard_normal((centers, dim), dtype=np.float32)
    rows = middles[rng.integers(0, centers, count)]
    rows += spread * rng.standard_normal((count, dim), dtype=np.float32)
    faiss.normalize_L2(rows)
    return rows


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


# --- 1. DIFT features: one map per image vs one per patch ---------------------------------------
def bench_dift(images: int, per_image: int, draws: int) -> None:
    denoiser = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="tiny").eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(images, 3, 32, 32, generator=g) * 2 - 1
    conditions = torch.nn.functional.one_hot(torch.arange(images) % 2, 2).float()
    k = default_patch_size(32)
    boxes = top_boxes(patch_scores(torch.randn(images, 32, 32, generator=g), 32, k), k, per_image=per_image)
    patches = sum(map(len, boxes))

    rows_seen = [0]  # image rows through the UNet: one per (image or patch, draw)

    def count(_module, inputs):
        rows_seen[0] += len(inputs[0])

    handle = denoiser.unet.register_forward_pre_hook(count)
    try:
        patch_features(denoiser, pixels[:1], conditions[:1], boxes[:1], draws=draws)  # warm-up
        rows_seen[0] = 0
        once, once_s = best_of(2, patch_features, denoiser, pixels, conditions, boxes, draws=draws)
        once_passes = rows_seen[0] // 2
        rows_seen[0] = 0
        per_patch, per_patch_s = best_of(2, patch_features_per_patch, denoiser, pixels, conditions, boxes,
                                         draws=draws)
        per_patch_passes = rows_seen[0] // 2
    finally:
        handle.remove()
    difference = max(float((a - b).abs().max()) for a, b in zip(once, per_patch))
    print(f"### DIFT-161 features, tiny pixel model (32 px, up_blocks.1 = {once[0].shape[1]} channels), "
          f"{images} images x {per_image} patches, {draws} draws\n")
    table(["way", "denoiser passes (image rows)", "seconds", "seconds / patch"], [
        ["one map per image (diffmine)", once_passes, f"{once_s:.2f}", f"{once_s / patches * 1e3:.1f} ms"],
        ["one map per patch (reference)", per_patch_passes, f"{per_patch_s:.2f}",
         f"{per_patch_s / patches * 1e3:.1f} ms"],
    ])
    print(f"Speed-up {per_patch_s / once_s:.1f}x; largest feature difference between the two ways {difference:.1e}.\n")


def bench_dift_exit(images: int, side: int, repeats: int = 3) -> None:
    """A DIFT pass stopped at up_blocks.1 (block_output, what the features stage runs) against
    the whole forward pass with the block's output hooked (how it ran before): the small model,
    `images` whole `side` px images per call, as the features stage sends them."""
    denoiser = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="small").eval()
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(images, 3, side, side, generator=g)
    timesteps = torch.full((images,), 161)
    conditions = torch.nn.functional.one_hot(torch.arange(images) % 2, 2).float()

    def full_pass():
        with denoiser.capture("up_blocks.1") as outputs:
            denoiser.predict_noise(noisy, timesteps, conditions)
        return outputs[0]

    with torch.inference_mode():
        full_pass()  # warm-up
        stopped, stopped_s = best_of(repeats, denoiser.block_output, "up_blocks.1", noisy, timesteps, conditions)
        full, full_s = best_of(repeats, full_pass)
    print(f"### DIFT pass stopped at up_blocks.1, small pixel model, {images} x {side} px per call\n")
    table(["pass", "seconds per call", "vs the whole pass"], [
        ["whole forward pass, block hooked (before)", f"{full_s:.3f}", "1.00x"],
        ["stopped at up_blocks.1 (block_output)", f"{stopped_s:.3f}", f"{full_s / stopped_s:.2f}x faster"],
    ])
    print(f"Same features: {torch.equal(stopped, full)}.\n")


# --- 2. k-means ---------------------------------------------------------------------------------
def bench_kmeans(sizes: list[int], dim: int, clusters: int, full_up_to: int) -> None:
    print(f"### k-means, {clusters} clusters, unit vectors (random), FAISS backend unless noted, seed 0\n")
    rows = []
    paper = unit_rows(1000, 1280, seed=9)  # the paper's per-label case: 1000 SD DIFT features
    for name, options in (("FAISS, 3 restarts (default)", dict(backend="faiss", seed=0)),
                          ("scikit-learn, 1 run (the reference's call)", dict(backend="sklearn", seed=10, nredo=1))):
        result, seconds = best_of(3, cluster_features, paper, k=32, **options)
        rows.append([f"1,000 x 1280 (paper, one label), {name}", "all", f"{seconds:.2f}"])
    for count in sizes:
        features = unit_rows(count, dim, seed=count)
        result, seconds = best_of(3 if count <= 100_000 else 1, cluster_features, features, k=clusters, seed=0)
        rows.append([f"{count:,} x {dim}", f"{result.trained_on:,} (subsample) + assign all", f"{seconds:.2f}"])
        if count <= full_up_to and result.trained_on < count:
            result, seconds = timed(cluster_features, features, k=clusters, seed=0, max_points_per_centroid=count)
            rows.append([f"{count:,} x {dim}", f"{result.trained_on:,} (all)", f"{seconds:.2f}"])
        del features
    table(["patches", "trained on", "seconds"], rows)


# --- 3. vector search ---------------------------------------------------------------------------
def latency_ms(index, queries: np.ndarray, **options) -> tuple[float, float]:
    """Median single-query latency, and per-query time when all queries go in one batch."""
    singles = []
    for query in queries:
        _, seconds = timed(search, index, query, 10, **options)
        singles.append(seconds)
    _, batch_seconds = timed(search, index, queries, 10, **options)
    return float(np.median(singles)) * 1e3, batch_seconds / len(queries) * 1e3


def bench_search(count: int, dim: int, hnsw_rows: int, queries: int) -> None:
    print(f"### Vector search, top-10 by cosine, {dim}-d, {queries} queries\n")
    rows = []
    for data_name, make in (("clustered", clustered_rows), ("random", unit_rows)):
        everything = make(count + queries, dim, seed=1)  # queries from the same distribution, not the data
        data, probe = everything[:count], everything[count:]
        del everything
        flat, build_s = timed(build_index, data, dim, kind="flat")
        _, truth = search(flat, probe, 10)
        single, batched = latency_ms(flat, probe)
        rows.append([data_name, f"{count:,}", "flat (exact)", f"{build_s:.1f}", f"{single:.2f}", f"{batched:.2f}",
                     "1.000"])
        label_rows = np.arange(0, count, 10)  # a 10-label dataset: one label's rows (100k of 1M)
        _, label_truth = search(flat, probe, 10, allowed_ids=label_rows)
        single, batched = latency_ms(flat, probe, allowed_ids=label_rows)
        rows.append([data_name, f"{count:,}", "flat, 1 of 10 labels", "", f"{single:.2f}", f"{batched:.2f}", "1.000"])
        small_label = np.arange(0, count, 365)  # a 365-label dataset: exact search over the label
        single, batched = latency_ms(flat, probe, allowed_ids=small_label)
        rows.append([data_name, f"{count:,}", "flat, 1 of 365 labels", "", f"{single:.2f}", f"{batched:.2f}", "1.000"])
        del flat

        ivf, build_s = timed(build_index, data, dim, kind="ivf")
        for nprobe in (8, 32, 128):
            _, found = search(ivf, probe, 10, nprobe=nprobe)
            single, batched = latency_ms(ivf, probe, nprobe=nprobe)
            rows.append([data_name, f"{count:,}", f"IVF{ivf.nlist}, nprobe {nprobe}",
                         f"{build_s:.1f}" if nprobe == 8 else "", f"{single:.2f}", f"{batched:.2f}",
                         f"{recall_at(found, truth):.3f}"])
        _, found = search(ivf, probe, 10, allowed_ids=label_rows)
        single, batched = latency_ms(ivf, probe, allowed_ids=label_rows)
        rows.append([data_name, f"{count:,}", "IVF, 1 of 10 labels, nprobe 32", "", f"{single:.2f}", f"{batched:.2f}",
                     f"{recall_at(found, label_truth):.3f}"])
        del ivf

        if hnsw_rows:
            subset = data[:hnsw_rows]
            exact = build_index(subset, dim, kind="flat")
            _, subset_truth = search(exact, probe, 10)
            hnsw = create_index(dim, kind="hnsw")
            _, build_s = timed(add_batches, hnsw, subset)
            for ef in (32, 96, 256):
                _, found = search(hnsw, probe, 10, ef_search=ef)
                single, batched = latency_ms(hnsw, probe, ef_search=ef)
                rows.append([data_name, f"{hnsw_rows:,}", f"HNSW32, efSearch {ef}",
                             f"{build_s:.1f}" if ef == 32 else "", f"{single:.2f}", f"{batched:.2f}",
                             f"{recall_at(found, subset_truth):.3f}"])
            del hnsw, exact
        del data
    table(["data", "rows", "index", "build s", "ms / query (one at a time, median)", "ms / query (batched)",
           "recall@10 vs exact"], rows)


# --- 4. patch mining ----------------------------------------------------------------------------
def mine(maps: torch.Tensor, image_size: int, k: int, chunk: int) -> int:
    """Pooling + greedy boxes + per-label top 1000, streaming over chunks of images."""
    def candidates():
        for start in range(0, len(maps), chunk):
            scores = patch_scores(maps[start:start + chunk], image_size, k)
            for offset, boxes in enumerate(top_boxes(scores, k)):
                image = start + offset
                for box in boxes:
                    yield image % 10, box.score, (image, box)
    return sum(len(kept) for kept in top_per_label(candidates(), k=1000).values())


def bench_mining(base: dict[str, int]) -> None:
    print("### Patch mining: pooling + greedy 5 boxes per image + per-label top 1000 (10 labels)\n")
    rows = []
    settings = {"SD geometry: 64x64 latent map -> 512 px, k = 64": (64, 512),
                "pixel model: 32x32 map -> 32 px, k = 6": (32, 32)}
    for name, (map_size, image_size) in settings.items():
        k = default_patch_size(image_size)
        first = None
        for factor in (1, 2, 4, 8):
            count = base[name.split(":")[0]] * factor
            maps = torch.randn(count, map_size, map_size, generator=torch.Generator().manual_seed(factor))
            mine(maps[:2], image_size, k, chunk=16)  # warm-up
            kept, seconds = best_of(3, mine, maps, image_size, k, chunk=16)
            per_image = seconds / count * 1e3
            first = first or per_image
            rows.append([name, f"{factor}x", f"{count:,}", f"{seconds:.2f}", f"{per_image:.2f}",
                         f"{per_image / first:.2f}"])
    table(["setting", "scale", "images", "seconds", "ms / image", "ms / image relative to 1x"], rows)


def bench_job(per_label: int, scales: list[int]) -> None:
    """`diffmine mine` end to end on scored runs of 1x..8x builtin animal images (10 labels),
    keeping every candidate patch so the work grows with the images. Each scale gets its own
    data directory, tiny model (20 steps) and fast scoring (2 draws); only `mine` is timed."""
    import json
    import subprocess
    import tempfile

    def cli(home, *args) -> tuple[dict, float]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", home, "--json"],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr)
        return json.loads(done.stdout), time.perf_counter() - started

    print("### The mine job end to end (patches, features, index, clusters, crops)\n")
    rows, base = [], None
    for scale in scales:
        with tempfile.TemporaryDirectory() as home:
            n = per_label * scale
            images = cli(home, "ingest", "builtin:animals", "--name", "a", "--limit-per-label", str(n),
                         "--holdout", "0")[0]["images"]
            cli(home, "train", "a", "--size", "tiny", "--steps", "20", "--batch-size", "16")
            cli(home, "score", "1", "--preset", "fast", "--draws", "2")
            result, seconds = cli(home, "mine", "1", "--per-label", str(5 * n), "--clusters", "8")
        per_image = 1000 * seconds / images
        base = base or per_image
        rows.append([f"{scale}x", f"{images:,}", f"{result['patches']:,}", f"{seconds:.1f}",
                     f"{per_image:.1f}", f"{per_image / base:.2f}"])
    table(["scale", "images", "patches", "mine s", "ms / image", "vs 1x"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--search-rows", type=int, default=1_000_000)
    parser.add_argument("--hnsw-rows", type=int, default=100_000,
                        help="rows of the HNSW index (its build dominates the run; 0 skips it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", default="dift,dift-exit,kmeans,search,mining,job",
                        help="comma-separated subset of dift,dift-exit,kmeans,search,mining,job")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    quick = args.quick

    command = " ".join(["python bench/bench_mining.py", *sys.argv[1:]])
    print(f"Run {datetime.date.today().isoformat()}: `{command}`, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores ({args.threads} threads), torch {torch.__version__}, "
          f"faiss {faiss.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f} at start.\n")
    start = time.perf_counter()
    if "dift" in sections:
        bench_dift(images=2 if quick else 8, per_image=5, draws=8)
    if "dift-exit" in sections:
        bench_dift_exit(images=4 if quick else 16, side=128)
    if "kmeans" in sections:
        bench_kmeans([10_000] if quick else [10_000, 100_000, 1_000_000], dim=64, clusters=32,
                     full_up_to=100_000)
    if "search" in sections:
        bench_search(20_000 if quick else args.search_rows, dim=64, hnsw_rows=5_000 if quick else args.hnsw_rows,
                     queries=20 if quick else 200)
    if "mining" in sections:
        bench_mining({"SD geometry": 2 if quick else 16, "pixel model": 16 if quick else 512})
    if "job" in sections:
        bench_job(per_label=5 if quick else 50, scales=[1, 2] if quick else [1, 2, 4, 8])
    print(f"Total benchmark time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
