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
    #: score with only the first `prefix` draws of this preset's sequence (None: all `draws`);
    #: an adaptive stage, or a cheap first look that the full draws extend
    prefix: int | None = None
    #: leave out the first `skip` of those draws: an adaptive stage that extends earlier draws
    #: scores draws [skip, prefix) only
    skip: int = 0
    #: adaptive scoring (worker/engine/adaptive.py): the draws of each stage, the last equal to
    #: `draws`. Every row is scored at the first; a row goes on to the next stage while its
    #: place in its label's top patches is uncertain.
    stages: tuple[int, ...] | None = None
    #: adaptive: confidence bounds are score +- `confidence` standard errors
    confidence: float = 3.0

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
        if self.prefix is not None and not (2 <= self.prefix <= self.draws and self.prefix % self._round_unit == 0):
            raise ValueError(f"prefix must be 2..{self.draws} draws in whole rounds of {self._round_unit}, "
                             f"got {self.prefix}")
        if not 0 <= self.skip < (self.prefix or self.draws) or self.skip % self._round_unit:
            raise ValueError(f"skip must be whole rounds below the draws used, got {self.skip}")
        if self.stages is not None:
            steps = list(self.stages)
            if len(steps) < 2 or steps != sorted(set(steps)) or steps[0] < 2 or steps[-1] != self.draws:
                raise ValueError(f"stages must rise strictly from >= 2 to the preset's {self.draws} draws, "
                                 f"got {self.stages}")
            if any(n % self._round_unit for n in steps):
                raise ValueError(f"every stage must be whole rounds of {self._round_unit} draws, got {self.stages}")
            if self.confidence <= 0:
                raise ValueError(f"confidence must be positive, got {self.confidence}")

    @property
    def rounds_of(self) -> int:
        """Draws per round."""
        return self.round_size or self.draws

    @property
    def _round_unit(self) -> int:
        """What a prefix must be a multiple of: the rounds, unless the draws are i.i.d. in one round
        (then any prefix of an i.i.d. sequence is i.i.d.)."""
        return 1 if self.timesteps == "uniform" and self.round_size is None else self.rounds_of

    @property
    def draws_used(self) -> int:
        """Draws scored per image: those of the prefix, if one is set, else all, less the skipped."""
        return (self.prefix or self.draws) - self.skip

    @property
    def sampling_key(self) -> str:
        """What fixes this preset's (t, eps) sequence, and names its random stream
        (worker/engine/streams.py): presets that differ in any of it share no noise, e.g.
        `PAPER.with_(draws=32)` does not reuse the paper's first 32 draws. Not in it: which of
        the draws are used (`prefix`, `skip`, early stopping), speed settings, and the name."""
        return repr((self.timesteps, self.draws, self.rounds_of, self.t_min, self.t_max,
                     self.timestep_weights, self.stages))

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

#: The paper's 100 i.i.d. draws where they decide what is mined, a few elsewhere: every row gets
#: 12 draws, rows whose best box may still reach their label's top patches get 36, and those
#: still in doubt the paper's 100 (worker/engine/adaptive.py; measured in docs/benchmarks.md,
#: "Adaptive draws"). Its own random stream: it shares no draws with `paper` at the same seed.
ADAPTIVE = TypicalityPreset(name="adaptive", stages=(12, 36, 100))

PRESETS = {preset.name: preset for preset in (PAPER, FAST, ADAPTIVE)}


def get_preset(name: str) -> TypicalityPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown typicality preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
