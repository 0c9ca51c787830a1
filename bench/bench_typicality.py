"""Typicality engine benchmark: the paper preset against faster options, on one model, one run.

    python bench/bench_typicality.py [--images 96] [--train-steps 400] [--out results.json]

What it does, in order, all in one process so the ratios are comparable on a shared machine:
1. A small pixel model (worker.engine.pixel "small", 32 px) trained briefly on Animal-MNIST
   (10 animal classes, 28 px silhouettes padded to 32), or loaded from --model-dir if cached.
2. The CPU's fp32 matmul peak (torch.matmul on large square matrices) and the denoiser's FLOPs
   per image (torch.utils.flop_counter), then forward images/s over batch sizes and memory
   formats: achieved FLOP/s and the share of the peak.
3. Typicality of held-out images under their own label with the paper preset (seed 0, the
   reference), the paper preset under seed 1 (the bar: how well the reference agrees with
   itself) and faster options, each from its own random stream (worker/engine/streams.py: a
   preset at the same seed shares no noise with the paper's, so every comparison is between
   independent draws). For each: images/s and speed-up over the paper preset, Spearman
   rho of the image ranking vs the reference, the share of images whose top k x k patch (the
   argmax of the average-pooled map, k = 50/256 of the image side as in docs/method.md) is the same,
   and the mean reported standard error.
4. From the paper run's own draws, the variance that i.i.d., stratified and ideal importance-
   sampled timesteps would leave: whether importance sampling is worth adding to stratification.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import pickle
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from agreement import spearman, top_patches  # noqa: E402,F401 (gpu_fast_options imports them from here)

from worker.engine.presets import FAST, PAPER, TypicalityPreset  # noqa: E402
from worker.engine.registry import create_pixel_denoiser, load_denoiser  # noqa: E402
from worker.engine.timesteps import fit_timestep_weights  # noqa: E402
from worker.engine.training import train  # noqa: E402
from worker.engine.typicality import draw_timesteps_and_noise, typicality_stream  # noqa: E402

ANIMALS = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]


# --- data and model ------------------------------------------------------------------------------
def animal_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """10000 images [N, 3, 32, 32] in [-1, 1] and labels [N], from the animal-mnist package."""
    try:
        import animal_mnist
    except ImportError:
        sys.exit("animal-mnist is not installed: pip install --no-deps animal-mnist")
    folder = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz") as f:
        pixels = torch.from_numpy(pickle.load(f)).float()
    with gzip.open(folder / "animal_label_version_3.gz") as f:
        labels = torch.from_numpy(pickle.load(f)).long()
    images = F.pad(pixels / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)  # 28 -> 32, black border
    return images[:, None].expand(-1, 3, -1, -1).contiguous(), labels


def trained_model(images, labels, args):
    folder = Path(args.model_dir) / f"animal-mnist-small-{args.train_steps}steps-seed{args.seed}"
    if (folder / "diffmine.json").exists():
        print(f"model: loaded from {folder}")
        return load_denoiser(folder), None
    model = create_pixel_denoiser(ANIMALS, resolution=32, seed=args.seed, size="small")
    conditions = F.one_hot(labels, len(ANIMALS)).float()
    dataset = torch.utils.data.TensorDataset(images, conditions)
    start = time.perf_counter()

    def progress(step, total, loss):
        if step % 50 == 0 or step == total:
            print(f"  train step {step}/{total} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    # lr 1e-3: this model trains from scratch in minutes; 1e-4 is the recipe for fine-tuning.
    result = train(model, dataset, steps=args.train_steps, batch_size=32, seed=args.seed, lr=1e-3,
                   progress=progress)
    seconds = time.perf_counter() - start
    model.save(folder)
    return model, {"steps": result.steps, "final_loss": result.final_loss, "seconds_per_step": seconds / result.steps}


# --- compute ceilings -----------------------------------------------------------------------------
def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def flops_per_image(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x, t, c = torch.randn(4, 3, 32, 32), torch.full((4,), 300), model.condition([0, 1, 2, 3])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.predict_noise(x, t, c)
    return counter.get_total_flops() / 4


def forward_images_per_second(model, batch: int, channels_last: bool, seconds: float = 3.0) -> float:
    x = torch.randn(batch, 3, 32, 32)
    t, c = torch.randint(100, 700, (batch,)), model.condition([i % model.num_labels for i in range(batch)])
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            model.predict_noise(x, t, c)  # warm up
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model.predict_noise(x, t, c)
                done += batch
            return done / (time.perf_counter() - start)
    finally:
        model.unet.to(memory_format=torch.contiguous_format)


def forward_sweep(model, per_image: float, rounds: int = 3) -> list[dict]:
    """Forward images/s per (batch, memory format): best of interleaved rounds."""
    configs = [(batch, channels_last) for channels_last in (False, True) for batch in (32, 64, 128, 256)]
    rates = {config: 0.0 for config in configs}
    for _ in range(rounds):
        for batch, channels_last in configs:
            rate = forward_images_per_second(model, batch, channels_last, seconds=1.5)
            rates[(batch, channels_last)] = max(rates[(batch, channels_last)], rate)
    return [{"batch": batch, "channels_last": channels_last, "images_per_s": rate, "gflops": rate * per_image / 1e9}
            for (batch, channels_last), rate in rates.items()]


def score(model, images, conditions, preset: TypicalityPreset, seed: int, batch: int) -> dict:
    batches = [(images[i:i + batch], conditions[i:i + batch]) for i in range(0, len(images), batch)]
    start = time.perf_counter()
    results = list(typicality_stream(model, batches, preset, seed=seed))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": len(images) / seconds,
            "scores": torch.cat([r.scores for r in results]), "maps": torch.cat([r.maps for r in results]),
            "stderr": torch.cat([r.stderr for r in results]), "draws": torch.cat([r.draws for r in results]).float(),
            "differences": torch.cat([r.differences for r in results])}


def timestep_variance_study(differences: torch.Tensor, timesteps: torch.Tensor, preset, bins: int = 12) -> dict:
    """Per-image variance of the mean over N draws under three timestep schemes, from paper draws.

    iid: total variance / N. stratified: mean within-slice variance / N. Importance sampling with
    the ideal density q(t) ~ sigma(t) (Neyman allocation) leaves (mean sigma)^2 / N. Ratios > 1
    say how much each scheme gains over the previous one.
    """
    edges = torch.linspace(preset.t_min, preset.t_max, bins + 1)
    slot = torch.bucketize(timesteps.float(), edges[1:-1], right=True)
    within, sigma = [], []
    for b in range(bins):
        d = differences[:, slot == b]
        var = d.var(dim=1)  # per image
        within.append(var)
        sigma.append(var.sqrt())
    within, sigma = torch.stack(within, dim=1), torch.stack(sigma, dim=1)  # [images, bins]
    total = differences.var(dim=1)
    stratified = within.mean(dim=1)
    neyman = sigma.mean(dim=1) ** 2
    return {"stratified_gain_over_iid": float((total / stratified).median()),
            "importance_gain_over_stratified": float((stratified / neyman).median()),
            "sigma_by_t_bin": [float(s) for s in sigma.mean(dim=0)]}


# --- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="held-out images to score")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--model-dir", default="/tmp/diffmine-bench")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--score-batch", type=int, default=16, help="images per typicality batch")
    parser.add_argument("--pilot-images", type=int, default=16, help="images to fit importance weights on")
    parser.add_argument("--timing-images", type=int, default=16, help="images per timing round")
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = platform.processor() or platform.machine()
    report: dict = {"date": datetime.date.today().isoformat(), "machine": f"{machine}, "
                    f"{args.threads} torch threads, torch {torch.__version__}", "command": " ".join(sys.argv)}

    images, labels = animal_mnist()
    held_out = torch.arange(len(images) - args.images, len(images))  # training never sees the tail
    model, report["training"] = trained_model(images[: -args.images], labels[: -args.images], args)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters")

    peaks = [matmul_peak_flops()]
    per_image = flops_per_image(model)
    sweep = forward_sweep(model, per_image)
    best = max(sweep, key=lambda row: row["images_per_s"])

    test_images, test_conditions = images[held_out], F.one_hot(labels[held_out], len(ANIMALS)).float()
    tuned = dict(forward_batch=best["batch"], channels_last=best["channels_last"])
    reference_preset = PAPER.with_(**tuned)
    options = [
        ("paper (reference)", reference_preset, args.seed),
        ("paper, other seed (the bar)", reference_preset, args.seed + 1),
        ("iid 32 draws", PAPER.with_(name="iid-32", draws=32, **tuned), args.seed),
        ("stratified 32 draws", FAST.with_(name="strat-32", draws=32, **tuned), args.seed),
        ("stratified 24 draws", FAST.with_(name="strat-24", draws=24, **tuned), args.seed),
        ("stratified 16 draws", FAST.with_(name="strat-16", draws=16, **tuned), args.seed),
        (f"FAST preset as shipped ({FAST.draws} {FAST.timesteps} draws, forward batch {FAST.forward_batch})",
         FAST, args.seed),
    ]
    # Importance sampling: Neyman weights fitted on a pilot of other images (from the training
    # split), 48 stratified draws each; in practice a pilot is run once per model.
    pilot_preset = FAST.with_(name="pilot", draws=48, **tuned)
    pilot_images = torch.arange(args.pilot_images)
    pilot = score(model, images[pilot_images], F.one_hot(labels[pilot_images], len(ANIMALS)).float(),
                  pilot_preset, args.seed + 2, args.score_batch)
    pilot_t, _, _ = draw_timesteps_and_noise(pilot_preset, args.seed + 2, (3, 32, 32))
    weights = fit_timestep_weights(pilot["differences"], pilot_t, PAPER.t_min, PAPER.t_max, bins=12)
    report["importance_pilot"] = {"images": args.pilot_images, "draws": 48, "seconds": pilot["seconds"],
                                  "weights": weights}
    for draws in (32, 24):
        options.append((f"stratified importance {draws} draws (pilot-fitted)",
                        FAST.with_(name=f"importance-{draws}", draws=draws, timesteps="importance",
                                   timestep_weights=weights, **tuned), args.seed))

    print(f"agreement: scoring {len(test_images)} images with {len(options) + 1} options ...", flush=True)
    results = {}
    for name, preset, seed in options:
        print(f"  {name}", flush=True)
        results[name] = score(model, test_images, test_conditions, preset, seed, args.score_batch)
    # Early stopping: rounds of 8 stratified draws up to 48, stopping at the precision that
    # 32 stratified draws reach on a median image.
    target = float(results["stratified 32 draws"]["stderr"].median())
    stop_name = f"early stop: stratified rounds of 8, <= 48 draws, stderr <= {target:.2g}"
    options.append((stop_name, FAST.with_(name="early-stop", draws=48, round_size=8, target_stderr=target, **tuned),
                    args.seed))
    print(f"  {stop_name}", flush=True)
    results[stop_name] = score(model, test_images, test_conditions, options[-1][1], args.seed, args.score_batch)

    # Speed: every option in turn on the same few images, several rounds, best round kept, so
    # that other jobs on the machine shift every option alike.
    timed = [(name, preset, seed) for name, preset, seed in options if name != "paper, other seed (the bar)"]
    speed = {name: 0.0 for name, _, _ in timed}
    print(f"speed: {args.timing_rounds} rounds on {args.timing_images} images ...", flush=True)
    for _ in range(args.timing_rounds):
        for name, preset, seed in timed:
            run = score(model, test_images[: args.timing_images], test_conditions[: args.timing_images],
                        preset, seed, args.score_batch)
            speed[name] = max(speed[name], run["images_per_s"])
        peaks.append(matmul_peak_flops())
    speed["paper, other seed (the bar)"] = speed["paper (reference)"]
    peak = max(peaks)
    for row in sweep:
        row["share_of_peak"] = row["gflops"] * 1e9 / peak
    report["compute"] = {"matmul_peak_gflops": peak / 1e9, "gflop_per_image": per_image / 1e9,
                         "parameters": params, "forward": sweep, "best": best}

    patch = max(2, round(32 * 50 / 256))
    reference = results["paper (reference)"]
    reference_top = top_patches(reference["maps"], patch)
    table = []
    for name, preset, _ in options:
        result = results[name]
        table.append({"option": name, "preset": preset.name, "images_per_s": speed[name],
                      "speedup": speed[name] / speed["paper (reference)"],
                      "mean_draws": float(result["draws"].mean()),
                      "spearman_vs_paper": spearman(result["scores"], reference["scores"]),
                      "same_top_patch": float((top_patches(result["maps"], patch) == reference_top).float().mean()),
                      "mean_stderr": float(result["stderr"].mean())})
    report["typicality"] = {"images": len(test_images), "patch_px": patch, "rows": table}
    timesteps, _, _ = draw_timesteps_and_noise(reference_preset, args.seed, (3, 32, 32))
    report["timestep_study"] = timestep_variance_study(reference["differences"], timesteps, reference_preset)
    print_markdown(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


def print_markdown(report: dict) -> None:
    compute = report["compute"]
    print(f"\n{report['date']} - {report['machine']}")
    if report.get("training"):
        t = report["training"]
        print(f"training: {t['steps']} steps, {t['seconds_per_step']:.2f} s/step at batch 32, "
              f"final loss {t['final_loss']:.4f}")
    print(f"fp32 matmul peak {compute['matmul_peak_gflops']:.1f} GFLOP/s; "
          f"denoiser {compute['gflop_per_image'] * 1e3:.1f} "
          f"MFLOP per image, {compute['parameters'] / 1e6:.2f} M parameters\n")
    print("| batch | channels_last | forward images/s | GFLOP/s | share of matmul peak |")
    print("|---:|---|---:|---:|---:|")
    for row in compute["forward"]:
        print(f"| {row['batch']} | {row['channels_last']} | {row['images_per_s']:.0f} | {row['gflops']:.1f} "
              f"| {row['share_of_peak']:.0%} |")
    typ = report["typicality"]
    print(f"\nTypicality of {typ['images']} held-out images under their own label; top patch {typ['patch_px']} px\n")
    print("| option | images/s | speed-up | draws | Spearman rho vs paper | same top patch | mean stderr |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in typ["rows"]:
        print(f"| {row['option']} | {row['images_per_s']:.2f} | {row['speedup']:.1f}x | {row['mean_draws']:.0f} | "
              f"{row['spearman_vs_paper']:.3f} | {row['same_top_patch']:.0%} | {row['mean_stderr']:.2e} |")
    study = report["timestep_study"]
    pilot = report["importance_pilot"]
    print(f"\nImportance weights: fitted on {pilot['images']} pilot images x {pilot['draws']} draws "
          f"({pilot['seconds']:.0f} s, once per model): {', '.join(f'{w:.2g}' for w in pilot['weights'])}")
    print(f"Timestep schemes (median over images, from the paper run's draws): stratified over iid "
          f"{study['stratified_gain_over_iid']:.2f}x less variance; ideal importance sampling over "
          f"stratified {study['importance_gain_over_stratified']:.2f}x")


if __name__ == "__main__":
    main()
