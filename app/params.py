"""Typed parameters: what a model, a run and each job kind take, with the paper's numbers as
defaults (docs/method.md has each number with its place in the paper).

The CLI, the run form, the services and the worker's handlers all build and read these models,
so a default lives here once instead of behind an `or` in each handler. Stored JSON (a model's
config, a run's params, a job's params) loads through the same models: a key stored as null
means "the default", as it always did, so rows written before these models still load.
Importable without torch.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app import catalog

Preset = Literal["paper", "fast", "adaptive"]
Backend = Literal["pixel", "stable-diffusion"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Selection = Literal["typical", "least", "random"]
View = Literal["whole", "centre-crop"]
TranslationPresetName = Literal["fast", "reference"]
TileStride = Literal["half", "full"]


class Params(BaseModel):
    """Unknown keys are refused (a misspelt option is an error, not a silent default) and a
    None value means "not given": the field's default applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _none_is_default(cls, values: Any) -> Any:
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if v is not None}
        return values

    def given(self) -> dict:
        """The values that differ from the defaults: the smallest equivalent spelling."""
        return self.model_dump(exclude_defaults=True)


# --- models --------------------------------------------------------------------------------------
#: Per-backend training defaults: the pixel model is trained from scratch on small crops; Stable
#: Diffusion is fine-tuned at its native 512 px with the paper's batch of 8 (docs/method.md).
BACKEND_DEFAULTS = {"pixel": dict(resolution=32, steps=1500, batch_size=32, size="small"),
                    "stable-diffusion": dict(resolution=512, steps=5000, batch_size=8)}


def check_side_multiple(backend: str, size: int, what: str) -> None:
    """A ValueError when `size` px cannot be a side of the images `backend` scores (Stable
    Diffusion: multiples of 64 px, catalog.SIDE_MULTIPLES)."""
    multiple = catalog.SIDE_MULTIPLES[backend]
    if size % multiple:
        nearest = max(multiple, round(size / multiple) * multiple)
        raise ValueError(f"{what} {size} px: {backend} needs image sides that are multiples of {multiple} px "
                         f"(its VAE works at 1/8 and its UNet halves the latents three times); "
                         f"try {nearest}")


class TrainConfig(Params):
    """A model's training recipe, stored as `TrainedModel.config`."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    #: the side of the square crops the model trains on
    resolution: int = Field(gt=0)
    #: images are resized so their shorter side is this before crops are taken, and scored
    #: whole at this size; None: the resolution
    image_size: int | None = Field(None, gt=0)
    #: how scoring sees an image: "whole" (every pixel, any aspect ratio) or "centre-crop"
    #: (the square at the centre, how models trained before image sizes existed were scored;
    #: migration 0003 marks them so)
    view: View = "whole"
    steps: int = Field(ge=0)  # 0: the model before fine-tuning, as a baseline
    batch_size: int = Field(gt=0)
    seed: int = 0
    size: Literal["tiny", "small", "base"] | None = None  # pixel model width
    base: str | None = None  # weights to start from: a model folder, an SD folder or hub id
    #: AdamW learning rate of the paper's fine-tuning recipe (docs/method.md, "Training")
    lr: float | None = None
    #: classifier-free training: the label is dropped for 10% of examples (docs/method.md)
    null_dropout: float = Field(0.1, ge=0, le=1)
    checkpoint_every: int = Field(100, gt=0)
    processes: int | None = Field(None, ge=1)  # launched training (accelerate launch)
    accelerate_config: str | None = None
    #: the holdout diffusion classifier run after training
    eval_draws: int = 16
    eval_images: int = 200
    #: Stable Diffusion: the paper's prompt template and the null prompt (docs/method.md)
    prompt_template: str = "A photo of {label}."
    null_prompt: str = "A photo."
    lora_rank: int | None = None
    #: the shipped demo weights a model row was copied from
    shipped: str | None = None

    @classmethod
    def for_backend(cls, backend: str, **given) -> TrainConfig:
        if backend not in catalog.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {catalog.BACKENDS}")
        given = {k: v for k, v in given.items() if v is not None}
        config = cls(**{**BACKEND_DEFAULTS[backend], **given})
        if config.image_size is not None and config.image_size < config.resolution:
            raise ValueError(f"image size {config.image_size} is smaller than the training crops "
                             f"(resolution {config.resolution})")
        check_side_multiple(backend, config.resolution, "resolution")
        check_side_multiple(backend, config.scoring_size, "image size")
        if config.processes and config.batch_size % config.processes:
            # Launched training gives every process an equal slice of the global batch.
            raise ValueError(f"batch size {config.batch_size} does not split evenly over "
                             f"{config.processes} processes")
        return config

    @property
    def scoring_size(self) -> int:
        return self.image_size or self.resolution

    @property
    def learning_rate(self) -> float:
        return 1e-4 if self.lr is None else self.lr

    @property
    def launched(self) -> bool:
        return bool(self.processes or self.accelerate_config)


class MineOptions(Params):
    """How a scored run is mined (`MiningRun.params["mine"]`)."""

    #: box side in model pixels; None: scaled from the paper's 50 px at 256 px
    #: (worker/engine/patches.default_patch_size)
    patch_size: int | None = Field(None, ge=2)
    #: the paper keeps the 1,000 most typical patches of each label
    per_label: int = Field(1000, ge=1)
    #: and the 5 best non-overlapping boxes of each image
    per_image: int = Field(5, ge=1)
    #: k-means clusters per label, as in the paper
    clusters: int = Field(32, ge=1)
    selection: Selection = "typical"
    #: clusters are ranked by their median typicality shrunk toward the label's median by this
    #: share of the label's patches (worker/engine/clustering.supported_median); 0: the paper's
    #: plain median, where a 2-patch cluster can rank first. Chosen on planted marks
    #: (bench/bench_settled.py, docs/benchmarks.md)
    support_share: float = Field(0.05, ge=0, lt=1)
    #: clusters whose centred centroids are this close are merged (near-duplicates)
    merge_threshold: float = 0.95
    #: re-clustering drops patches this close (cosine of centred DIFT features) to an artifact
    #: cluster's member; chosen on the planted-mark test, not tuned (docs/method.md)
    lookalike_threshold: float = 0.6
    #: ordered labels: members per cluster scored under every label for its trend
    trend_members: int = Field(16, ge=1)
    #: draws of those trend scores; None: the run's preset
    trend_draws: int | None = Field(None, ge=2)

    @field_validator("lookalike_threshold")
    @classmethod
    def _a_cosine(cls, value: float) -> float:
        if not -1 < value < 1:
            raise ValueError(f"the lookalike threshold is a cosine in (-1, 1), got {value}")
        return value


class RunParams(Params):
    """A mining run's recipe (`MiningRun.params`)."""

    preset: Preset = "paper"
    #: None: the preset's draws (the paper: 100; adaptive: 100 for the rows that can be mined)
    draws: int | None = Field(None, ge=2)
    #: also score every image under every label (maps for any label, the diffusion classifier)
    all_labels: bool = False
    seed: int = 0
    precision: Precision = "auto"
    #: score images resized to this shorter side; None: the model's image size
    image_size: int | None = Field(None, gt=0)
    #: images per resumable scoring shard
    shard_size: int = Field(64, ge=1)
    #: pixel models scoring images larger than their training crops do so through tiles of the
    #: crop size R: at stride R/2 ("half", the default; the paper has no tiles, it scores 512 px
    #: images whole through Stable Diffusion) or R ("full", about 4x cheaper); worker/engine/tiles.py
    tile_stride: TileStride = "half"
    #: score (and so mine) a seeded sample of at most this many images of each label; None: all.
    #: A label keeps `mine.per_label` patches, 5 per image: a sample of a few times
    #: per_label / 5 images gives the galleries at a fraction of the cost (the demo at 64 px)
    images_per_label: int | None = Field(None, ge=1)
    mine: MineOptions = MineOptions()
    #: written by the evaluate job
    evaluation: dict | None = None


#: The translation presets' DDIM numbers (worker/engine/translation.py has the same; a test
#: checks): the paper's 999-step inversion and 50-step sampling at guidance 7.5, and a fast one.
TRANSLATION_PRESET_NUMBERS = {
    "fast": dict(invert_steps=50, sample_steps=25, guidance=7.5, invert_guidance=1.0),
    "reference": dict(invert_steps=999, sample_steps=50, guidance=7.5, invert_guidance=1.0),
}
#: Guidance of the fast preset on pixel models: 3 raises the targets' typicality as much as the
#: paper's 7.5 and moves the source's own regeneration less (RMSE 0.23 vs 0.32; docs/benchmarks.md,
#: Translation). Stable Diffusion and the reference preset keep the paper's 7.5.
PIXEL_GUIDANCE = 3.0
#: typicality draws of the crop scores (stratified, so even)
MIN_TRANSLATION_DRAWS = 2


class TranslationOptions(Params):
    """A translation's options (`Translation.params`); the preset fills the DDIM numbers."""

    preset: TranslationPresetName = "fast"
    invert_steps: int | None = Field(None, ge=1)
    sample_steps: int | None = Field(None, ge=1)
    guidance: float | None = None
    invert_guidance: float | None = None
    sdedit_strength: float | None = Field(None, gt=0, le=1)
    pnp: bool | None = None
    seed: int = 0
    #: translate a square window this many box sides wide (at least the box itself)
    context: float | None = Field(None, ge=1)
    #: typicality draws of each translated crop (stratified, so rounded down to even)
    draws: int = Field(8, ge=1)
    #: written by the translate job
    reconstruction_error: float | None = None

    def resolved(self, backend: str = "pixel") -> dict:
        """Every option filled in: the preset's numbers unless overridden."""
        values = self.model_dump(exclude={"preset", "reconstruction_error"})
        preset = TRANSLATION_PRESET_NUMBERS[self.preset]
        if values["guidance"] is None and backend == "pixel" and self.preset != "reference":
            values["guidance"] = PIXEL_GUIDANCE
        for key, value in preset.items():
            if values[key] is None:
                values[key] = value
        values["guidance"], values["invert_guidance"] = float(values["guidance"]), float(values["invert_guidance"])
        values["draws"] = max(MIN_TRANSLATION_DRAWS, values["draws"] // 2 * 2)
        return values

    def canonical(self, backend: str = "pixel") -> dict:
        """Only the values that differ from the defaults, so equal settings give one cache key
        however they were spelled (preset name or numbers)."""
        resolved, defaults = self.resolved(backend), TranslationOptions().resolved(backend)
        return {k: v for k, v in resolved.items() if v != defaults[k]}


# --- job parameters, one model per job kind ------------------------------------------------------
class IngestJob(Params):
    source: str
    name: str
    manifest: str | None = None
    path_column: str | None = None
    label_columns: list[str] = []
    bin_years: int | None = None
    multi_sep: str = "|"
    holdout: float = 0.1
    in_place: bool = False
    seed: int = 0
    limit_per_label: int | None = None
    #: builtin:twemoji: the side its SVGs are rendered at (None: 72, the package's PNG size)
    render_size: int | None = Field(None, gt=0)
    min_images_per_label: int | None = None
    plant_mark: str | None = None
    plant_fraction: float = 0.5
    plant_size: float = 0.3
    #: web uploads: the staged zip to delete once ingested, and the name the user saw
    remove_after: str | None = None
    display_source: str | None = None


class TrainJob(Params):
    model_id: int


class ScoreJob(Params):
    run_id: int
    model_id: int | None = None


class MineJob(Params):
    run_id: int


class PipelineJob(Params):
    model_id: int
    run_id: int


class EvaluateJob(Params):
    run_id: int
    #: draws per label of the holdout diffusion classifier
    draws: int = Field(16, ge=2)
    max_images: int = Field(1000, ge=1)


class TranslateJob(Params):
    translation_id: int


class ParallelMine(Params):
    """Mining of a parallel (consistent-change) dataset."""

    clusters: int = Field(8, ge=1)
    per_image: int = Field(5, ge=1)
    patch_size: int | None = Field(None, ge=2)
    #: the most co-typical patches kept for clustering
    patches: int = Field(1000, ge=1)


class ParallelJob(Params):
    run_id: int
    images: int = Field(ge=1)
    translation: TranslationOptions = TranslationOptions()
    mine: ParallelMine = ParallelMine()


JOB_PARAMS: dict[str, type[Params]] = {
    "ingest": IngestJob, "train": TrainJob, "score": ScoreJob, "mine": MineJob,
    "pipeline": PipelineJob, "evaluate": EvaluateJob, "translate": TranslateJob,
    "parallel": ParallelJob,
}


def job_params(kind: str, params: dict | Params) -> Params:
    """A job's parameters as its kind's model (from a row's JSON, or as given)."""
    if kind not in JOB_PARAMS:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {catalog.JOB_KINDS}")
    model = JOB_PARAMS[kind]
    return params if isinstance(params, model) else model.model_validate(params)


def readable(error: ValidationError) -> str:
    """The wrong values in one line, for the CLI and the forms."""
    return "; ".join(_readable(e) for e in error.errors())


def _readable(error: dict) -> str:
    field = ".".join(map(str, error["loc"])) or "value"
    if error["type"] == "literal_error":
        return f"unknown {field} {error['input']!r}; {error['msg'].replace('Input should be', 'choose')}"
    return f"{field}: {error['msg'].removeprefix('Value error, ')}"
