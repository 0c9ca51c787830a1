"""Named typicality recipes. `PAPER` is the reference recipe exactly; the others trade draws for speed.

Every preset estimates the same quantity, T(x|c) = E_{eps,t}[L_t(x,eps,null) - L_t(x,eps,c)] with t
uniform on [t_min, t_max); they differ in how the (eps, t) draws are chosen and how many are
spent, and each reports a standard error fitted to its sampling scheme. The numbers behind
`FAST` are in docs/benchmarks.md ("Typicality engine"), measured by bench/bench_typicality.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .timesteps import bin_density

TIMESTEP_SCHEMES = ("uniform", "stratified", "importance")
AUTOCAST_DTYPES = (None, "bf16", "fp16")


@dataclass(frozen=True)
class TypicalityPreset:
    name: str
    #: total (eps, t) draws per image; each costs one forward pass per condition
    draws: int = 100
    #: timesteps are integers in [t_min, t_max)
    t_min: int = 100
    t_max: int = 700
    #: "uniform": i.i.d. t (the paper). "stratified": each round of `round_size` draws puts one t
    #: in each of `round_size` equal slices of [t_min, t_max) - same mean, lower variance.
    #: "importance": stratified over a density given by `timestep_weights`, draws reweighted.
    #: See worker/engine/timesteps.py.
    timesteps: str = "uniform"
    #: "importance" only: relative sampling density on equal-width bins of [t_min, t_max),
    #: fitted per model from a pilot run by `timesteps.fit_timestep_weights`
    timestep_weights: tuple[float, ...] | None = None
    #: draws per round (default: all draws in one round). Early stopping is checked between rounds.
    round_size: int | None = None
    #: early stopping: an image stops once its standard error is <= this (None: never stop early)
    target_stderr: float | None = None
    #: denoiser inputs per forward call (label and null of one draw always share a call)
    forward_batch: int = 128
    #: run the UNet in channels_last memory format (faster convolutions on some CPUs and GPUs)
    channels_last: bool = False
    #: autocast dtype for the denoiser on CUDA: None (fp32), "bf16" or "fp16"
    autocast: str | None = None

    def __post_init__(self):
        if self.timesteps not in TIMESTEP_SCHEMES:
            raise ValueError(f"timesteps must be one of {TIMESTEP_SCHEMES}, got {self.timesteps!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {AUTOCAST_DTYPES}, got {self.autocast!r}")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"need 0 <= t_min < t_max, got [{self.t_min}, {self.t_max})")
        if self.draws < 2:
            raise ValueError("at least 2 draws are needed to estimate a standard error")
        if self.draws % self.rounds_of:
            raise ValueError(f"draws ({self.draws}) must be a multiple of round_size ({self.round_size})")
        if self.timesteps != "uniform" and self.rounds_of % 2:
            # The standard error pairs neighbouring strata ("collapsed strata"), so a round
            # needs an even number of them.
            raise ValueError(f"stratified rounds need an even number of draws, got {self.rounds_of}")
        if self.target_stderr is not None and self.rounds_of == self.draws:
            raise ValueError("early stopping (target_stderr) needs round_size < draws")
        if (self.timesteps == "importance") != (self.timestep_weights is not None):
            raise ValueError("timestep_weights go with timesteps='importance', and only with it")
        if self.timestep_weights is not None:
            bin_density(self.timestep_weights, self.t_max - self.t_min)  # raises if unusable
        if self.forward_batch < 2:
            raise ValueError("forward_batch must hold at least one label/null pair")

    @property
    def rounds_of(self) -> int:
        """Draws per round."""
        return self.round_size or self.draws

    def with_(self, **changes) -> TypicalityPreset:
        """A modified copy, e.g. `PAPER.with_(forward_batch=256)`; renamed unless `name` is given."""
        changes.setdefault("name", f"{self.name}+" + ",".join(f"{k}={v}" for k, v in changes.items()))
        return replace(self, **changes)


#: The reference recipe: 100 i.i.d. draws, t uniform on [100, 700), shared by label and null.
PAPER = TypicalityPreset(name="paper")

#: 24 stratified draws: about 4x the paper's throughput (48 instead of 200 forward passes per
#: image). Its agreement with the paper comes close to, but stays below, the paper's agreement
#: with itself under another seed (docs/benchmarks.md, "Typicality engine"). On a CPU,
#: `FAST.with_(forward_batch=64, channels_last=True)` ran ~1.3x faster than these defaults.
FAST = TypicalityPreset(name="fast", draws=24, timesteps="stratified")

PRESETS = {preset.name: preset for preset in (PAPER, FAST)}


def get_preset(name: str) -> TypicalityPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown typicality preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
