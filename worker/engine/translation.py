"""Translation across labels (docs/method.md section 5): how would this image look under every other label?

    noise = ddim_invert(x, own label)                       # deterministic DDIM, guidance 1
    x_m   = ddim_sample(noise, label m, guidance g)  for every label m, in one batch

DDIM here is written out (a few lines, exact, with the denoiser's own DDPM betas) rather than
borrowed from a diffusers scheduler, because inversion and sampling must use the same timestep
grid and the same alpha convention to be each other's inverse:

* grid: `ddim_timesteps(N)` = round(T - k T / N) - 1 for k = 0..N-1 ("trailing" spacing), so every
  step count starts at t = T - 1 = 999 and a 999-step inversion feeds a 50-step sampler directly;
* alpha_bar(t) from `denoiser.scheduler.alphas_cumprod`, and alpha_bar = 1 below the grid (the
  last sampling step returns the x0 prediction; the first inversion step starts from x0);
* one step between grid points s < t, with eps = eps_theta(x, t, c) (CFG: eps_null + g (eps_c -
  eps_null)):  x0 = (x - sqrt(1 - a) eps) / sqrt(a),  x' = sqrt(a') x0 + sqrt(1 - a') eps.
  Sampling goes t -> s evaluating eps at (x_t, t); inversion goes s -> t evaluating eps at
  (x_s, t) - the same timestep, as in the reference (pnp-diffusers, null-text inversion). With
  guidance 1 and equal step counts, sampling undoes inversion up to how much eps changes between
  neighbouring grid points, so more inversion steps reconstruct better.

Backends. Pixel models: inversion + guided sampling, or SDEdit (`sdedit_strength`: noise the
image to that fraction of the schedule with seeded noise, then sample) instead of inversion.
Latent models (Stable Diffusion): additionally Plug-and-Play injection (`pnp.PlugAndPlay`; on
by default for them, optional for pixel models): a source branch per image - the inversion's own
latent at the current timestep, under the source condition - leads every batch, and forward
hooks copy its up-block ResNet features (first 80% of steps) and self-attention queries/keys
(first 50%) into the target branches.

Presets: `REFERENCE` is the paper's recipe (999 inversion steps, 50 sampling steps, guidance
7.5); `FAST` (50 / 25) is the interactive default. docs/benchmarks.md ("Translation") measures
both, click to result, with their reconstruction error (bench/bench_translation.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .denoiser import ConditionalDenoiser

ProgressCallback = Callable[[int, int], None]


# --- presets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TranslationPreset:
    name: str
    invert_steps: int
    sample_steps: int
    guidance: float
    #: guidance of the inversion itself (the reference inverts with the condition alone: 1.0)
    invert_guidance: float = 1.0

    def kwargs(self) -> dict:
        values = asdict(self)
        values.pop("name")
        return values


#: The paper's recipe (pnp-diffusers defaults): 999-step inversion, 50-step sampling, CFG 7.5.
REFERENCE = TranslationPreset("reference", invert_steps=999, sample_steps=50, guidance=7.5)
#: Interactive: 20x fewer inversion steps, half the sampling steps (fidelity in docs/benchmarks.md).
FAST = TranslationPreset("fast", invert_steps=50, sample_steps=25, guidance=7.5)
PRESETS = {p.name: p for p in (REFERENCE, FAST)}


def get_preset(name: str) -> TranslationPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown translation preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


# --- DDIM ----------------------------------------------------------------------------------------
def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sampling grid, descending, always starting at T - 1 ("trailing" spacing): [steps] int64."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    grid = [round(num_train_timesteps - k * num_train_timesteps / steps) - 1 for k in range(steps)]
    return torch.tensor(grid, dtype=torch.long)


def _alpha_bars(denoiser: ConditionalDenoiser) -> torch.Tensor:
    return denoiser.scheduler.alphas_cumprod.detach().double().cpu()


def _alpha(alpha_bars: torch.Tensor, t: int) -> float:
    return 1.0 if t < 0 else float(alpha_bars[t])


def _ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    x0 = (x - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from)
    return math.sqrt(alpha_to) * x0 + math.sqrt(1 - alpha_to) * eps


def _rows(condition: torch.Tensor, batch: int, device) -> torch.Tensor:
    condition = condition.to(device, torch.float32)
    if condition.ndim == 1:
        condition = condition[None]
    return condition.expand(batch, -1) if condition.shape[0] == 1 else condition


def _guided_eps(denoiser, x, t: int, conditions, guidance: float, null) -> torch.Tensor:
    timesteps = torch.full((len(x),), t, dtype=torch.long, device=x.device)
    if guidance == 1.0:
        return denoiser.predict_noise(x, timesteps, conditions)
    eps = denoiser.predict_noise(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                                 torch.cat([null, conditions]))
    eps_null, eps_cond = eps.chunk(2)
    return eps_null + guidance * (eps_cond - eps_null)


def ddim_invert(denoiser: ConditionalDenoiser, latents: torch.Tensor, condition: torch.Tensor,
                steps: int, guidance: float = 1.0, *, null: torch.Tensor | None = None,
                trajectory: bool = False, progress: ProgressCallback | None = None):
    """Deterministic DDIM inversion of clean latents [B, ...] to t = T - 1 under `condition`.

    `condition` is [n_labels] or [B, n_labels]. Returns the noise latents, or with `trajectory`
    (noise, {t: latents at t}) for every grid timestep (Plug-and-Play's source branch).
    """
    device = latents.device
    conditions = _rows(condition, len(latents), device)
    null = _rows(null if null is not None else torch.zeros(conditions.shape[1]), len(latents), device)
    alpha_bars = _alpha_bars(denoiser)
    grid = ddim_timesteps(steps, denoiser.num_train_timesteps).flip(0).tolist()  # ascending
    path: dict[int, torch.Tensor] = {}
    x, previous = latents, -1
    with denoiser.inference():
        for number, t in enumerate(grid, 1):
            eps = _guided_eps(denoiser, x, t, conditions, guidance, null)
            x = _ddim_step(x, eps, _alpha(alpha_bars, previous), _alpha(alpha_bars, t))
            previous = t
            if trajectory:
                path[t] = x
            if progress is not None:
                progress(number, len(grid))
    return (x, path) if trajectory else x


def ddim_sample(denoiser: ConditionalDenoiser, noise: torch.Tensor, conditions: torch.Tensor, steps: int,
                guidance: float, null: torch.Tensor | None = None, *, start: int = 0,
                source: SourceBranch | None = None, progress: ProgressCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling with classifier-free guidance: noise [B or 1, ...] -> latents [B, ...].

    `conditions` [B, n_labels] (a row per output; `noise` of batch 1 is shared by all), `null`
    the unconditional row (default all zeros). `start` skips that many grid steps (SDEdit: the
    noise is then at timestep `ddim_timesteps(steps)[start]`). `source`: Plug-and-Play.
    """
    device = noise.device
    conditions = conditions.to(device, torch.float32)
    x = noise.expand(len(conditions), *noise.shape[1:]) if len(noise) == 1 else noise
    if len(x) != len(conditions):
        raise ValueError(f"{len(noise)} noise latents for {len(conditions)} conditions")
    null = _rows(null if null is not None else torch.zeros(conditions.shape[1]), len(x), device)
    alpha_bars = _alpha_bars(denoiser)
    grid = ddim_timesteps(steps, denoiser.num_train_timesteps).tolist()[start:]
    with denoiser.inference(), (source.hooks() if source is not None else _nothing()):
        for number, t in enumerate(grid):
            after = grid[number + 1] if number + 1 < len(grid) else -1
            if source is None:
                eps = _guided_eps(denoiser, x, t, conditions, guidance, null)
            else:
                source.pnp.set_step(number, len(grid))
                eps = source.guided_eps(denoiser, x, t, conditions, guidance, null)
            x = _ddim_step(x, eps, _alpha(alpha_bars, t), _alpha(alpha_bars, after))
            if progress is not None:
                progress(number + 1, len(grid))
    return x


@dataclass
class SourceBranch:
    """Plug-and-Play's source rows: the inversion trajectory of each source image.

    Target row r belongs to source image `owner[r]`. Every UNet call is laid out as
    [source latents (one row per image), targets under null (if CFG), targets under their label],
    and the hooks copy each source row's features into its own targets' rows.
    """

    pnp: object  # pnp.PlugAndPlay
    trajectory: dict[int, torch.Tensor]  # inversion grid timestep -> [S, ...] latents
    conditions: torch.Tensor  # [S, n_labels]: the source (inversion) conditions
    owner: torch.Tensor  # [B] long: source index of each target row

    def latents_at(self, t: int) -> torch.Tensor:
        nearest = min(self.trajectory, key=lambda s: (abs(s - t), s))
        return self.trajectory[nearest]

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with self.pnp.injecting():
            yield

    def guided_eps(self, denoiser, x, t: int, conditions, guidance: float, null) -> torch.Tensor:
        sources = self.latents_at(t).to(x.dtype)
        count = len(sources)
        owner = self.owner.to(x.device)
        parts, rows = ([x], [conditions]) if guidance == 1.0 else ([x, x], [null, conditions])
        batch = torch.cat([sources, *parts])
        batch_conditions = torch.cat([self.conditions.to(x.device), *rows])
        # Row i of the UNet batch reads its injected features from row `origin[i]`: source rows
        # from themselves, every target row (under null and under its label) from its source.
        origin = torch.cat([torch.arange(count, device=x.device), *([owner] * len(parts))])
        self.pnp.origin = origin
        timesteps = torch.full((len(batch),), t, dtype=torch.long, device=x.device)
        eps = denoiser.predict_noise(batch, timesteps, batch_conditions)[count:]
        if guidance == 1.0:
            return eps
        eps_null, eps_cond = eps.chunk(2)
        return eps_null + guidance * (eps_cond - eps_null)


# --- translation ---------------------------------------------------------------------------------
@dataclass
class TranslationResult:
    images: torch.Tensor  # [M, 3, H, W] in [-1, 1]: the source under each target condition
    reconstruction: torch.Tensor  # [3, H, W]: the regeneration under the source's own condition
    reconstruction_error: float  # RMSE of `reconstruction` against the source, pixels in [0, 1]
    source_index: int | None  # which target row is the source condition (None: not among them)

    @property
    def psnr(self) -> float:
        return 20 * math.log10(1.0 / max(self.reconstruction_error, 1e-12))


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square error of images in [-1, 1], on the [0, 1] pixel scale."""
    return float(((a.float() - b.float()) / 2).pow(2).mean().sqrt())


def translate(denoiser: ConditionalDenoiser, image: torch.Tensor, source_condition: torch.Tensor,
              target_conditions: torch.Tensor, *, invert_steps: int = FAST.invert_steps,
              sample_steps: int = FAST.sample_steps, guidance: float = FAST.guidance,
              sdedit_strength: float | None = None, seed: int = 0, pnp: bool | None = None,
              invert_guidance: float = 1.0, progress: ProgressCallback | None = None) -> TranslationResult:
    """One image [3, H, W] (or [1, 3, H, W]) in [-1, 1] under its `source_condition` [n_labels],
    regenerated under each of `target_conditions` [M, n_labels], all targets in one batch."""
    image = image[None] if image.ndim == 3 else image
    source_condition = source_condition.reshape(1, -1)
    results = translate_batch(denoiser, image, source_condition, target_conditions,
                              invert_steps=invert_steps, sample_steps=sample_steps, guidance=guidance,
                              sdedit_strength=sdedit_strength, seed=seed, pnp=pnp,
                              invert_guidance=invert_guidance, progress=progress)
    return results[0]


def translate_batch(denoiser: ConditionalDenoiser, images: torch.Tensor, source_conditions: torch.Tensor,
                    target_conditions: torch.Tensor, *, invert_steps: int = FAST.invert_steps,
                    sample_steps: int = FAST.sample_steps, guidance: float = FAST.guidance,
                    sdedit_strength: float | None = None, seed: int = 0, pnp: bool | None = None,
                    invert_guidance: float = 1.0,
                    progress: ProgressCallback | None = None) -> list[TranslationResult]:
    """`translate` for B images at once ([B, 3, H, W], [B, n_labels]): B x M rows per sampling batch.

    The source condition is regenerated too (an extra row where it is not one of the targets), so
    every result carries its reconstruction error. `pnp=None` means on for latent backends
    (Stable Diffusion), off for pixel ones. SDEdit (`sdedit_strength` in (0, 1]) replaces the
    inversion by seeded forward noise to that depth and cannot be combined with Plug-and-Play.
    """
    device = next(denoiser.parameters()).device
    images = images.to(device)
    source_conditions = source_conditions.to(device, torch.float32)
    target_conditions = target_conditions.to(device, torch.float32)
    batch, labels = len(images), target_conditions.shape[0]
    if source_conditions.shape != (batch, denoiser.num_labels) or target_conditions.ndim != 2:
        raise ValueError(f"need source conditions [{batch}, {denoiser.num_labels}] and target conditions "
                         f"[M, {denoiser.num_labels}], got {tuple(source_conditions.shape)} and "
                         f"{tuple(target_conditions.shape)}")
    if sdedit_strength is not None and not 0.0 < sdedit_strength <= 1.0:
        raise ValueError(f"sdedit_strength must be in (0, 1], got {sdedit_strength}")
    use_pnp = (getattr(denoiser, "backend", "pixel") != "pixel") if pnp is None else pnp
    if use_pnp and sdedit_strength is not None:
        raise ValueError("Plug-and-Play needs the inversion trajectory; it cannot be combined with SDEdit")

    # Each image's rows: every target, plus its own condition if that is not a target.
    matches = [(target_conditions == source_conditions[b]).all(dim=1).nonzero().flatten().tolist()
               for b in range(batch)]
    extra = [b for b in range(batch) if not matches[b]]
    rows = torch.cat([target_conditions.repeat(batch, 1), source_conditions[extra]])
    owner = torch.cat([torch.arange(batch).repeat_interleave(labels), torch.tensor(extra, dtype=torch.long)])
    owner = owner.to(device)

    grid = ddim_timesteps(sample_steps, denoiser.num_train_timesteps)
    start = 0 if sdedit_strength is None else \
        sample_steps - min(max(int(sample_steps * sdedit_strength), 1), sample_steps)
    inverting = 0 if sdedit_strength is not None else invert_steps
    report = _offset_progress(progress, inverting + sample_steps - start)
    with denoiser.inference():
        latents = torch.cat([denoiser.encode(image[None]) for image in images])
        path = None
        if sdedit_strength is None:
            inverted = ddim_invert(denoiser, latents, source_conditions, invert_steps, invert_guidance,
                                   trajectory=use_pnp, progress=report(0))
            noise, path = inverted if use_pnp else (inverted, None)
        else:
            eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
            a = _alpha(_alpha_bars(denoiser), int(grid[start]))
            noise = math.sqrt(a) * latents + math.sqrt(1 - a) * eps
        source = None
        if use_pnp:
            from .pnp import PlugAndPlay

            source = SourceBranch(PlugAndPlay(denoiser.unet), path, source_conditions, owner)
        samples = ddim_sample(denoiser, noise[owner], rows, sample_steps, guidance, start=start,
                              source=source, progress=report(inverting))
        decoded = denoiser.decode(samples).clamp(-1, 1).float()
    results = []
    for b in range(batch):
        own = decoded[b * labels:(b + 1) * labels]
        reconstruction = own[matches[b][0]] if matches[b] else decoded[batch * labels + extra.index(b)]
        results.append(TranslationResult(images=own, reconstruction=reconstruction,
                                         reconstruction_error=rmse(reconstruction, images[b]),
                                         source_index=matches[b][0] if matches[b] else None))
    return results


def _offset_progress(progress: ProgressCallback | None, total: int):
    def at(offset: int):
        if progress is None:
            return None
        return lambda done, _count: progress(offset + done, total)
    return at


@contextmanager
def _nothing() -> Iterator[None]:
    yield


