"""Typicality: how much a label helps the denoiser, per location (docs/method.md section 2).

    T(x | c) = E_{eps, t} [ L_t(x, eps, null) - L_t(x, eps, c) ],   L_t = ||eps_theta(x_t, t, cond) - eps||^2

The squared error is averaged over channels only, so each image gets a map at the resolution
of the denoising space (pixels for the pixel backend, 64x64 latents for SD at 512 px). The
image-level score is the mean of that map.

Draws. Given a seed, the (t, eps) draws are a fixed sequence that every image sees (the
reference re-seeds per image), and the label and the null condition of one draw share t and
eps and the same forward call, so their difference has low variance. For the paper preset::

    g = streams.generator(seed, "typicality-draws", *streams.text_key(preset.sampling_key))
    timesteps = torch.randint(t_min, t_max, (N,), generator=g)
    noise = torch.randn((N, *latent_shape), generator=g)

The stream is the preset's own (worker/engine/streams.py): two presets at one seed share no
noise, and the draws share none with the VAE posterior sample of that seed. A preset with a
`prefix` uses the first draws of its sequence: the full draws extend it.

Because draws do not depend on the batch, scoring a batch gives the same numbers as scoring
its images one by one (up to float rounding of batched kernels).

Any image size. The UNet's sides must be a multiple of `denoiser.spatial_multiple` (8 for the
pixel models): other sizes are padded by reflection on the right and bottom, and the padding is
cut out of every loss map before it is averaged, so maps have the image's own size and scores
are means over its own pixels only. Memory stays bounded by sending fewer rows per forward call
as images grow (`_rows_per_call`). Drawn noise has the padded shape, so an image that needs no
padding gets exactly the numbers it always got. This scores what it is given in one piece; the
score job sends images larger than a pixel model's training crops through tiles of that size
instead (worker/engine/tiles.py, where the measurement that decided it is cited).

Standard errors: i.i.d. draws use std / sqrt(N). Stratified (and importance-sampled) draws use
the collapsed-strata estimator (neighbouring strata paired; slightly conservative), since the
i.i.d. formula would overstate their error. Timestep schemes: worker/engine/timesteps.py.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .data import pad_to_multiple
from .denoiser import ConditionalDenoiser
from .presets import PAPER, TypicalityPreset
from .streams import generator, text_key
from .timesteps import sample_timesteps

Batch = torch.Tensor | Sequence  # images, or (images, conditions[, keys])


@dataclass
class TypicalityResult:
    """Typicality of a batch of images under their own (multi-hot) conditions."""

    maps: torch.Tensor  # [B, h, w] float32: mean over draws of L_null - L_c per location
    scores: torch.Tensor  # [B] image-level typicality (mean of the map)
    stderr: torch.Tensor  # [B] standard error of `scores` over the draws
    draws: torch.Tensor  # [B] draws used per image (fewer than the preset's if stopped early)
    differences: torch.Tensor  # [B, N] image-level L_null - L_c per draw, x p/q (zeros after a stop)
    keys: list | None = None  # passed through from the input batch
    draw_maps: torch.Tensor | None = None  # [B, N, h, w] L_null - L_c per draw, if asked for


@dataclass
class LabelScores:
    """Every image scored under every label and the null condition, with shared draws."""

    null_loss: torch.Tensor  # [B] mean loss under the null condition
    label_losses: torch.Tensor  # [B, M] mean loss under each single label
    per_draw: torch.Tensor  # [B, M + 1, N] image-level loss per draw (x p/q); index 0 is null
    stderr: torch.Tensor  # [B, M] standard error of `typicality`
    maps: torch.Tensor | None = None  # [B, M, h, w] typicality map per label, if asked for
    conditions: torch.Tensor | None = None  # passed through from the input batch
    keys: list | None = None
    timesteps: str = "uniform"  # sampling scheme of the draws, for standard errors of contrasts
    round_size: int | None = None

    @property
    def typicality(self) -> torch.Tensor:
        """[B, M] typicality of each image under each label: L_null - L_label."""
        return self.null_loss[:, None] - self.label_losses

    @property
    def predicted(self) -> torch.Tensor:
        """[B] the diffusion classifier: the label whose condition denoises best."""
        return self.label_losses.argmin(dim=1)

    def contrast(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """How much better label `a` explains each image than label `b` (L_b - L_a), with its stderr."""
        differences = self.per_draw[:, b + 1] - self.per_draw[:, a + 1]
        return differences.mean(dim=1), standard_error(differences, self.timesteps, self.round_size)


# --- draws ---------------------------------------------------------------------------------------
def draw_timesteps_and_noise(preset: TypicalityPreset, seed: int, shape: Sequence[int]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preset's draws for one image of latent `shape`: t [N] int64, eps [N, *shape], and
    the importance weights [N] of the draws (ones unless timesteps="importance"); N is the
    draws used (`preset.draws_used`): the first of the preset's sequence, after `preset.skip`."""
    g = generator(seed, "typicality-draws", *text_key(preset.sampling_key))
    timesteps, weights = sample_timesteps(preset.timesteps, preset.draws, preset.rounds_of, preset.t_min,
                                          preset.t_max, g, preset.timestep_weights)
    noise = torch.randn((preset.draws, *shape), generator=g)
    window = slice(preset.skip, preset.skip + preset.draws_used)
    return timesteps[window], noise[window], weights[window]


def standard_error(differences: torch.Tensor, timesteps: str = "uniform",
                   round_size: int | None = None) -> torch.Tensor:
    """Standard error of the mean over the last axis (draws) of per-draw differences."""
    n = differences.shape[-1]
    if timesteps == "uniform":
        return differences.std(dim=-1) / math.sqrt(n)
    # Stratified (plain or importance-weighted), one draw per stratum: pair strata (0,1), (2,3), ...
    # within each round and use (d_a - d_b)^2 as the estimate of var_a + var_b.
    size = round_size or n
    if n % size or size % 2:
        raise ValueError(f"{n} stratified draws do not split into even rounds of {size}")
    pairs = differences[..., 0::2] - differences[..., 1::2]
    return pairs.pow(2).sum(dim=-1).sqrt() / n


# --- scoring -------------------------------------------------------------------------------------
def typicality(denoiser: ConditionalDenoiser, images: torch.Tensor, conditions: torch.Tensor,
               preset: TypicalityPreset = PAPER, *, seed: int = 0, draw_maps: bool = False) -> TypicalityResult:
    """T(x | c) for a batch: images [B, 3, H, W] in [-1, 1], conditions [B, n_labels] multi-hot."""
    return next(typicality_stream(denoiser, [(images, conditions)], preset, seed=seed, draw_maps=draw_maps))


def typicality_stream(denoiser: ConditionalDenoiser, batches: Iterable[Batch],
                      preset: TypicalityPreset = PAPER, *, seed: int = 0,
                      draw_maps: bool = False) -> Iterator[TypicalityResult]:
    """Score batches `(images, conditions[, keys])` as they come; yields one result per batch.
    `draw_maps`: also return every draw's map (memory: draws x the maps)."""
    with _inference(denoiser, preset):
        for batch in batches:
            images, conditions, keys = _unpack(batch, need_conditions=True)
            conditions = conditions.to(_device(denoiser), torch.float32)
            if (conditions == 0).all(dim=1).any():
                raise ValueError("typicality needs a label for every image; got an all-zero (null) condition")
            latents = _encode(denoiser, images, seed)
            null = denoiser.null_condition(len(latents), device=_device(denoiser))
            per_draw, map_sums, used, per_draw_maps = _losses(denoiser, latents, [null, conditions], preset, seed,
                                                              draw_maps)
            differences = per_draw[:, 0] - per_draw[:, 1]  # [B, N]: null minus label
            scores, stderr = _masked_mean_and_stderr(differences, used, preset)
            maps = (map_sums[:, 0] - map_sums[:, 1]) / used[:, None, None]
            yield TypicalityResult(maps=maps, scores=scores, stderr=stderr, draws=used, differences=differences,
                                   keys=keys, draw_maps=None if per_draw_maps is None else
                                   per_draw_maps[:, 0] - per_draw_maps[:, 1])


def label_scores(denoiser: ConditionalDenoiser, images: torch.Tensor, preset: TypicalityPreset = PAPER,
                 *, seed: int = 0, maps: bool = False) -> LabelScores:
    """Every image under every single label and the null condition (the diffusion classifier)."""
    return next(label_scores_stream(denoiser, [images], preset, seed=seed, maps=maps))


def label_scores_stream(denoiser: ConditionalDenoiser, batches: Iterable[Batch],
                        preset: TypicalityPreset = PAPER, *, seed: int = 0,
                        maps: bool = False) -> Iterator[LabelScores]:
    """`label_scores` over batches (images, or `(images, conditions[, keys])`, conditions unused).

    Costs (n_labels + 1) forward passes per draw. Early stopping, if the preset asks for it,
    waits for the largest of an image's per-label standard errors.
    """
    with _inference(denoiser, preset):
        for batch in batches:
            images, conditions, keys = _unpack(batch, need_conditions=False)
            latents = _encode(denoiser, images, seed)
            eye = torch.eye(denoiser.num_labels, device=_device(denoiser))
            condition_sets = [denoiser.null_condition(len(latents), device=_device(denoiser))]
            condition_sets += [eye[m].expand(len(latents), -1) for m in range(denoiser.num_labels)]
            per_draw, map_sums, used, _ = _losses(denoiser, latents, condition_sets, preset, seed)
            losses = per_draw.sum(dim=2) / used[:, None]  # draws never taken are zeros
            _, stderr = _masked_mean_and_stderr(per_draw[:, :1] - per_draw[:, 1:], used, preset)
            label_maps = (map_sums[:, :1] - map_sums[:, 1:]) / used[:, None, None, None] if maps else None
            yield LabelScores(null_loss=losses[:, 0], label_losses=losses[:, 1:], per_draw=per_draw,
                              stderr=stderr, maps=label_maps, conditions=conditions, keys=keys,
                              timesteps=preset.timesteps, round_size=preset.round_size)


# --- the shared inner loop ---------------------------------------------------------------------
def _losses(denoiser: ConditionalDenoiser, latents: torch.Tensor, condition_sets: list[torch.Tensor],
            preset: TypicalityPreset, seed: int, keep_draw_maps: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-draw image-level losses [B, J, N], summed loss maps [B, J, h, w], draws used [B], and
    with `keep_draw_maps` each draw's loss map [B, J, N, h, w].

    Losses of importance-sampled draws carry their weight p/q, so plain means stay unbiased.
    Work items are (image, draw, condition) triples, condition fastest, so the J conditions of a
    draw sit side by side in one forward call; they run in chunks of `forward_batch`, one round
    of draws at a time, dropping images whose standard error is already small enough.
    """
    batch, conditions_per_draw = len(latents), len(condition_sets)
    device = latents.device
    height, width = latents.shape[-2:]
    latents = pad_to_multiple(latents, denoiser.spatial_multiple)
    timesteps, noise, weights = draw_timesteps_and_noise(preset, seed, latents.shape[1:])
    timesteps, noise, weights = timesteps.to(device), noise.to(device, latents.dtype), weights.to(device)
    conditions = torch.stack(condition_sets, dim=1).to(device)  # [B, J, L]
    per_draw = torch.zeros(batch, conditions_per_draw, preset.draws_used, device=device)
    map_sums = torch.zeros(batch, conditions_per_draw, height, width, device=device)
    draw_maps = torch.zeros(batch, conditions_per_draw, preset.draws_used, height, width, device=device) \
        if keep_draw_maps else None
    used = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)
    rows = _rows_per_call(denoiser, preset, latents.shape[-2:])
    chunk = max(conditions_per_draw, rows // conditions_per_draw * conditions_per_draw)

    round_length = min(preset.rounds_of, preset.draws_used)
    for start in range(0, preset.draws_used, round_length):
        draws = torch.arange(start, start + round_length, device=device)
        items = torch.cartesian_prod(active, draws, torch.arange(conditions_per_draw, device=device))
        for part in items.split(chunk):
            image, draw, cond = part.unbind(dim=1)
            eps = noise[draw]
            noisy = denoiser.scheduler.add_noise(latents[image], eps, timesteps[draw])
            with _autocast(device, preset):
                prediction = denoiser.predict_noise(_memory_format(noisy, preset), timesteps[draw],
                                                    conditions[image, cond])
            # Channel-averaged squared error over the image's own pixels, times p/q for
            # importance-sampled timesteps.
            loss = (prediction.float() - eps.float()).pow(2).mean(dim=1)[:, :height, :width] \
                * weights[draw, None, None]
            per_draw[image, cond, draw] = loss.mean(dim=(1, 2))
            map_sums.view(-1, *loss.shape[1:]).index_add_(0, image * conditions_per_draw + cond, loss)
            if draw_maps is not None:
                draw_maps[image, cond, draw] = loss
        used[active] += round_length
        if preset.target_stderr is not None:
            differences = per_draw[active, :1, : start + round_length] - \
                per_draw[active, 1:, : start + round_length]
            stderr = standard_error(differences, preset.timesteps, preset.round_size).amax(dim=1)
            active = active[stderr > preset.target_stderr]
            if len(active) == 0:
                break
    return per_draw, map_sums, used, draw_maps


def _rows_per_call(denoiser: ConditionalDenoiser, preset: TypicalityPreset, shape) -> int:
    """`preset.forward_batch` counts rows at the UNet's native size (a pixel model's training
    crops; Stable Diffusion's 64 x 64 latents of 512 px); larger inputs (whole images of other
    aspect ratios) get proportionally fewer rows per call, so a forward call's memory stays
    about the same."""
    native = getattr(denoiser.unet.config, "sample_size", None)
    if not native:
        return preset.forward_batch
    native_area = native[0] * native[1] if isinstance(native, (list, tuple)) else native * native
    area = shape[0] * shape[1]
    if area <= native_area:
        return preset.forward_batch
    return max(1, preset.forward_batch * native_area // area)


def _masked_mean_and_stderr(differences: torch.Tensor, used: torch.Tensor,
                            preset: TypicalityPreset) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and stderr over the first `used[b]` draws of row b: [B, ..., N] -> [B, ...] twice."""
    means = torch.empty(differences.shape[:-1], device=differences.device)
    errors = torch.empty_like(means)
    for n in used.unique().tolist():  # a few distinct counts at most (one per round)
        rows = used == n
        taken = differences[rows][..., :n]
        means[rows] = taken.mean(dim=-1)
        errors[rows] = standard_error(taken, preset.timesteps, preset.round_size)
    return means, errors


def _device(denoiser: ConditionalDenoiser) -> torch.device:
    return next(denoiser.parameters()).device


def _encode(denoiser: ConditionalDenoiser, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Encode one image at a time with a generator re-seeded per image (VAE posterior samples
    then do not depend on the batch: the reference re-seeds per image), from the posterior's own
    stream of the seed, which DIFT features share (one latent per image and seed)."""
    images = images.to(_device(denoiser))
    return torch.cat([denoiser.encode(image[None], generator=generator(seed, "vae-posterior"))
                      for image in images])


def _unpack(batch: Batch, need_conditions: bool):
    if isinstance(batch, torch.Tensor):
        if need_conditions:
            raise ValueError("typicality batches must be (images, conditions[, keys])")
        return batch, None, None
    images, conditions, *rest = batch
    if len(rest) > 1:
        raise ValueError("a batch is (images, conditions) or (images, conditions, keys)")
    return images, conditions, (list(rest[0]) if rest else None)


@contextmanager
def _inference(denoiser: ConditionalDenoiser, preset: TypicalityPreset):
    """Eval mode, no autograd, and the preset's memory format, all undone on exit."""
    was_training = denoiser.training
    denoiser.eval()
    if preset.channels_last:
        denoiser.unet.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            yield
    finally:
        if preset.channels_last:
            denoiser.unet.to(memory_format=torch.contiguous_format)
        denoiser.train(was_training)


def _memory_format(x: torch.Tensor, preset: TypicalityPreset) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if preset.channels_last else x


def _autocast(device: torch.device, preset: TypicalityPreset):
    if preset.autocast is None:
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[preset.autocast]
    return torch.autocast(device.type, dtype=dtype)
