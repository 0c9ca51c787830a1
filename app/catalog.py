"""The project's vocabularies, declared once and importable without torch.

The CLI's choices, the services' validation, the run form and the worker's handler table all
read these. The engine keeps its own recipes (worker/engine/presets.py, translation.py); the
tests check that its names equal these (tests/test_catalog.py).
"""
from __future__ import annotations

#: job kind -> its handler ("module:function"), imported by the worker only when it runs one,
#: so a worker that only ingests never loads torch
JOB_HANDLERS = {
    "ingest": "worker.handlers.ingest:run_ingest",
    "train": "worker.handlers.train:run_train",
    "score": "worker.handlers.score:run_score",
    "mine": "worker.handlers.mine:run_mine",
    "pipeline": "worker.handlers.pipeline:run_pipeline",
    "evaluate": "worker.handlers.evaluate:run_evaluate",
    "translate": "worker.handlers.translate:run_translate",
    "parallel": "worker.handlers.parallel:run_parallel",
}
JOB_KINDS = tuple(JOB_HANDLERS)

#: typicality presets (docs/method.md, "Presets"): name -> what the run form says of it
TYPICALITY_PRESETS = {
    "paper": "paper: the reference recipe (100 draws)",
    "fast": "fast: fewer draws, a quick look",
    "adaptive": "adaptive: the paper's 100 draws for images that can be mined, a few for the rest",
}

#: translation presets: name -> what the CLI says of it
TRANSLATION_PRESETS = {
    "fast": "50 inversion / 25 sampling steps",
    "reference": "999 / 50 (the paper)",
}

#: model backends: the embedded pixel UNet, and Stable Diffusion on a GPU
BACKENDS = ("pixel", "stable-diffusion")
#: how scoring sees an image: whole at its own shape, or the old centre square
VIEWS = ("whole", "centre-crop")
#: image sides each backend needs to be a multiple of, in pixels: Stable Diffusion's VAE works at
#: 1/8 and its UNet halves the latents three times (worker/engine/registry.py rounds whole views
#: to it); pixel models take any size
SIDE_MULTIPLES = {"pixel": 1, "stable-diffusion": 64}
#: widths of the embedded pixel UNet (worker/engine/pixel.py)
PIXEL_SIZES = ("tiny", "small", "base")

#: Tiles (images larger than a pixel model's training crops are scored through tiles of the
#: crop size): stride name -> what the CLI and the run form say of it. "half" is the default,
#: measured on a planted mark; "full" costs about 4x less (docs/benchmarks.md).
TILE_STRIDES = {
    "half": "stride R/2, the default: tiles overlap by half, each pixel seen in up to 4 contexts",
    "full": "stride R: tiles side by side, about 4x fewer (cheaper on a CPU)",
}

#: Denoiser precision while scoring. fp16/bf16 autocast is for GPUs: on this project's CPUs it ran
#: 2-4x slower than fp32; on an H200, fp16 scored Stable Diffusion 4.9-6.5x faster, while the small
#: pixel models ran slower in fp16 than in fp32 (docs/benchmarks.md). "auto", the default, chooses
#: by device and backend from those measurements (worker/handlers/score.resolved_precision).
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

#: what a label set's labels are: ordinal ones (years) get trends across labels
LABEL_KINDS = ("categorical", "ordinal", "multi")

#: which patches mining keeps: the most typical (the method) or one of its baselines
SELECTIONS = ("typical", "least", "random")

EXPORT_FORMATS = ("json", "csv", "html")
