"""One prepared check for a lent GPU: training-step and typicality speed in fp32 vs bf16/fp16.

    python bench/gpu_check.py                 # on a CUDA machine, < 4 minutes
    python bench/gpu_check.py --cpu --quick   # the same code path on CPU, tiny sizes (tests)

Runs with whatever torch / diffusers the machine has (no venv, no internet) and says clearly what
is missing. For each backend:

* pixel: the "small" pixel model (32 px), briefly trained in fp32 on synthetic blobs with a
  planted square so typicality has something to measure;
* stable-diffusion (when worker/engine/stable_diffusion.py and transformers are importable):
  random components built from config - an SD-1.5-shaped UNet (4 levels, 320..1280 channels,
  cross-attention 768) and SD VAE at 256 px (32x32 latents), a 2-layer CLIP text encoder;

it times a training step (`worker.engine.training.train`) and paper-preset typicality under
fp32 and autocast bf16 / fp16, and checks that each precision's typicality agrees with fp32:
every image's score within half its Monte Carlo standard error, and maps correlated >= 0.99.
Prints a markdown table (and JSON with --out).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "engine")]
PRECISIONS = ("fp32", "bf16", "fp16")
ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def missing_modules(names=("torch", "diffusers", "safetensors", "numpy")) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


# --- models --------------------------------------------------------------------------------------
def planted_blobs(count: int, resolution: int, seed: int = 0):
    """Smooth dim colour fields; label 0 carries a bright square at a fixed place."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.rand(count, 3, 4, 4, generator=g), size=resolution, mode="bicubic")
    images = (images * 1.2 - 1.0).clamp(-1, 0.3)
    labels = torch.arange(count) % 2
    q = resolution // 4
    images[labels == 0, :, q:2 * q, 2 * q:3 * q] = 1.0
    return images, F.one_hot(labels, 2).float()


def pixel_model(args, device):
    import torch

    from worker.engine.registry import create_pixel_denoiser

    model = create_pixel_denoiser(["marked", "plain"], resolution=32, seed=0,
                                  size="tiny" if args.quick else "small").to(device)
    images, conditions = planted_blobs(512, 32)
    data = torch.utils.data.TensorDataset(images, conditions)
    train_batch = 8 if args.quick else 128
    if args.can_train:  # else typicality runs on the untrained model
        from worker.engine.training import make_accelerator, train
        train(model, data, steps=args.pretrain_steps, batch_size=train_batch, seed=0, lr=1e-3,
              accelerator=make_accelerator("no", cpu=args.cpu))
    test_images, test_conditions = planted_blobs(args.images, 32, seed=1)
    return model, data, test_images, test_conditions, train_batch


def sd_model(args, device):
    """An SD-1.5-shaped random denoiser (tiny widths with --quick); None if it cannot be built."""
    import sd_tiny
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from worker.engine.stable_diffusion import SD_SCHEDULE, StableDiffusionDenoiser

    if args.quick:
        unet_config, vae_config = sd_tiny.tiny_unet_config(), sd_tiny.tiny_vae_config()
        hidden, resolution = sd_tiny.TINY_HIDDEN, sd_tiny.TINY_IMAGE_SIZE
    else:
        hidden, resolution = 768, 256
        unet_config = dict(  # SD 1.5's UNet config; sample_size only documents the latent size
            sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=hidden, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae_config = dict(  # SD's VAE
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=resolution,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: an 860M-parameter UNet is slow to init on CPU
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(sd_tiny.tiny_text_config(hidden))
    tokenizer = CLIPTokenizer.from_pretrained(sd_tiny.write_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
    model = StableDiffusionDenoiser(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    scheduler=DDPMScheduler(**SD_SCHEDULE), labels=["cat", "dog"],
                                    prompt_template="A photo of a {label}.", null_prompt="A photo.").to(device)
    images, conditions = planted_blobs(max(args.images, 16), resolution)
    data = torch.utils.data.TensorDataset(images, conditions)
    test_images, test_conditions = planted_blobs(min(args.images, 8), resolution, seed=1)
    return model, data, test_images, test_conditions, 8 if not args.quick else 2


# --- measurements --------------------------------------------------------------------------------
def time_training(model, data, precision: str, batch_size: int, steps: int, cpu: bool) -> float:
    """Seconds per training step after a warm-up step (weights restored afterwards)."""
    import torch

    from worker.engine.training import make_accelerator, train

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stamps = []

    def progress(step, total, loss):
        _sync()
        stamps.append(time.perf_counter())

    try:
        train(model, data, steps=steps + 1, batch_size=batch_size, seed=0,
              accelerator=make_accelerator(ACCELERATE_NAMES[precision], cpu=cpu), progress=progress)
    finally:
        model.load_state_dict(saved)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return (stamps[-1] - stamps[0]) / steps


def time_typicality(model, images, conditions, precision: str, preset, batch: int):
    from worker.engine.typicality import typicality_stream

    preset = preset.with_(autocast=None if precision == "fp32" else precision)
    batches = [(images[i:i + batch], conditions[i:i + batch]) for i in range(0, len(images), batch)]
    list(typicality_stream(model, batches[:1], preset.with_(draws=2, round_size=None), seed=0))  # warm up
    _sync()
    start = time.perf_counter()
    results = list(typicality_stream(model, batches, preset, seed=0))
    _sync()
    return time.perf_counter() - start, results


def agreement(reference, results) -> dict:
    import torch

    ref_scores = torch.cat([r.scores for r in reference]).cpu()
    scores = torch.cat([r.scores for r in results]).cpu()
    stderr = torch.cat([r.stderr for r in reference]).cpu()
    ref_maps = torch.cat([r.maps for r in reference]).flatten(1).cpu()
    maps = torch.cat([r.maps for r in results]).flatten(1).cpu()
    ratio = float(((scores - ref_scores).abs() / stderr).max())
    correlation = float(min(torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(ref_maps, maps)))
    ranks = torch.stack([ref_scores.argsort().argsort(), scores.argsort().argsort()]).double()
    return {"max_score_error_in_stderr": ratio, "min_map_correlation": correlation,
            "score_spearman": float(torch.corrcoef(ranks)[0, 1]),
            "agrees": ratio <= 0.5 and correlation >= 0.99}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_backend(name: str, build, args, device) -> list[dict]:
    from worker.engine.presets import PAPER

    start = time.perf_counter()
    model, data, images, conditions, train_batch = build(args, device)
    print(f"{name}: built in {time.perf_counter() - start:.0f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)
    # SD's attention at 32x32 latents is heavy: smaller forward batches keep fp32 memory sane.
    forward_batch = args.forward_batch if name == "pixel" else min(args.forward_batch, 64)
    preset = PAPER.with_(draws=args.draws, forward_batch=forward_batch)
    rows, reference = [], None
    for precision in PRECISIONS:
        row = {"backend": name, "precision": precision}
        try:
            if args.can_train:
                row["train_s_per_step"] = time_training(model, data, precision, train_batch, args.train_steps,
                                                        args.cpu)
                row["train_batch"] = train_batch
            seconds, results = time_typicality(model, images, conditions, precision, preset, args.score_batch)
            row["typicality_images_per_s"] = len(images) / seconds
            row["draws"] = preset.draws
            if precision == "fp32":
                reference = results
                row.update(max_score_error_in_stderr=0.0, min_map_correlation=1.0, score_spearman=1.0,
                           agrees=True)
            else:
                row.update(agreement(reference, results))
        except Exception as error:  # report and go on: one unsupported dtype must not hide the rest
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            traceback.print_exc()
        rows.append(row)
        print(f"  {precision}: {row}", flush=True)
    return rows


def print_table(rows: list[dict], environment: str) -> None:
    print(f"\n{environment}\n")
    print("| backend | precision | train s/step (batch) | typicality images/s (draws) | "
          "max score error / stderr | score rank corr | min map corr | agrees with fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | {r['precision']} | error: {r['error']} | | | | | |")
            continue
        train = f"{r['train_s_per_step']:.4f} ({r['train_batch']})" if "train_s_per_step" in r else "not run"
        print(f"| {r['backend']} | {r['precision']} | {train} | "
              f"{r['typicality_images_per_s']:.2f} ({r['draws']}) | {r['max_score_error_in_stderr']:.3f} | "
              f"{r['score_spearman']:.3f} | {r['min_map_correlation']:.4f} | {'yes' if r['agrees'] else 'NO'} |")
    print("\nagrees: every score within 0.5 standard error of fp32 and every map correlated >= 0.99. "
          "The SD components are random (untrained), so their label effect - and the standard error it "
          "is measured against - is small: a strict test of the precision.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU (to test this script)")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps and draws")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()

    missing = missing_modules()
    if missing:
        print(f"MISSING python packages: {', '.join(missing)} - install them (pip install {' '.join(missing)}) "
              "and rerun; nothing was measured.")
        return 2
    args.can_train = not missing_modules(("accelerate",))
    if not args.can_train:
        print("MISSING python package accelerate (pip install accelerate): training steps are NOT timed, "
              "typicality still is")
    import diffusers
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device visible to torch (torch.cuda.is_available() is False); use --cpu to test the script")
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here: the reference
        torch.backends.cudnn.allow_tf32 = False
    quick = args.quick
    args.pretrain_steps, args.train_steps = (2, 1) if quick else (150, 10)
    args.images, args.draws = (2, 4) if quick else (32, 100)
    args.score_batch, args.forward_batch = (2, 16) if quick else (32, 512)

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    environment = (f"{name}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}"
                   f"{' - quick sizes' if quick else ''}")
    print(environment, flush=True)
    started = time.perf_counter()
    rows = check_backend("pixel", pixel_model, args, device)
    if not (REPO / "worker" / "engine" / "stable_diffusion.py").exists():
        print("stable-diffusion: skipped (worker/engine/stable_diffusion.py does not exist)")
    else:
        try:
            importlib.import_module("transformers")
        except ImportError:
            print("stable-diffusion: skipped - MISSING python package transformers (pip install transformers)")
        else:
            rows += check_backend("stable-diffusion", sd_model, args, device)
    print_table(rows, environment)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    return 0 if all("error" not in r for r in rows if r["precision"] == "fp32") else 1


if __name__ == "__main__":
    sys.exit(main())
