"""How typicality picks its timesteps: i.i.d., stratified, or stratified importance sampling.

All three estimate the same expectation over t uniform on the integers of [t_min, t_max):

* "uniform": i.i.d. draws (the paper).
* "stratified": each round of K draws puts one t in each of K equal slices of the range, so
  the slow trend of the loss difference over t stops adding variance.
* "importance": stratified in the quantiles of a piecewise-constant density q(t) that puts
  more draws where the per-draw difference varies most, each draw weighted by p(t)/q(t) so the
  estimate stays unbiased. The density comes from a pilot run (`fit_timestep_weights`); the
  variance-optimal choice is q proportional to the spread sigma(t) (Neyman allocation), which
  needs no knowledge of the mean.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

#: sampling densities are floored at this share of the mean weight, so a slice that looked
#: quiet in a small pilot is still visited (a zero density would bias the estimate)
MIN_RELATIVE_WEIGHT = 0.1


def sample_timesteps(scheme: str, draws: int, round_size: int, t_min: int, t_max: int,
                     generator: torch.Generator,
                     weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer timesteps [draws] and their importance weights p/q [draws] (ones unless "importance")."""
    span = t_max - t_min
    if scheme == "uniform":
        return torch.randint(t_min, t_max, (draws,), generator=generator), torch.ones(draws)
    # One uniform u per stratum of the unit interval, round by round.
    u = (torch.arange(round_size) + torch.rand(draws // round_size, round_size, generator=generator,
                                               dtype=torch.float64)) / round_size
    u = u.flatten()
    if scheme == "stratified":
        return t_min + (u * span).floor().long(), torch.ones(draws)
    if scheme != "importance":
        raise ValueError(f"unknown timestep scheme {scheme!r}")
    density = bin_density(weights, span)
    mass = density / density.sum()
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
    bins = (torch.searchsorted(edges, u, right=True) - 1).clamp(0, len(mass) - 1)
    within = ((u - edges[bins]) / mass[bins]).clamp(0, 1 - 1e-12)  # uniform position inside the bin
    width = span // len(mass)
    timesteps = t_min + bins * width + (within * width).floor().long()
    weight = (mass.mean() / mass[bins]).float()  # p(t) / q(t): p is uniform over equal-width bins
    return timesteps, weight


def bin_density(weights: Sequence[float] | None, span: int) -> torch.Tensor:
    """The validated, floored sampling density per equal-width bin of the timestep range."""
    if not weights:
        raise ValueError("importance sampling needs timestep_weights (see fit_timestep_weights)")
    density = torch.as_tensor(weights, dtype=torch.float64)
    if span % len(density):
        raise ValueError(f"{len(density)} timestep bins do not split the {span} timesteps evenly")
    if (density < 0).any() or density.sum() <= 0:
        raise ValueError("timestep_weights must be non-negative with a positive sum")
    return density.clamp(min=MIN_RELATIVE_WEIGHT * float(density.mean()))


def fit_timestep_weights(differences: torch.Tensor, timesteps: torch.Tensor, t_min: int, t_max: int,
                         bins: int = 12) -> tuple[float, ...]:
    """Neyman weights from a pilot: the spread of per-draw differences in each timestep bin.

    `differences` [images, N] are per-draw image-level L_null - L_c of a uniform or stratified
    pilot run (`TypicalityResult.differences`), `timesteps` [N] its draws' t. Each image's
    variance within a bin is averaged over images; the weight of a bin is its square root.
    """
    span = t_max - t_min
    if span % bins:
        raise ValueError(f"{bins} bins do not split the {span} timesteps evenly")
    slot = (timesteps - t_min) // (span // bins)
    spreads = []
    for b in range(bins):
        d = differences[:, slot == b]
        if d.shape[1] < 2:
            raise ValueError(f"the pilot has fewer than 2 draws in timestep bin {b}: use more draws")
        spreads.append(float(d.var(dim=1).mean().sqrt()))
    return tuple(spreads)
