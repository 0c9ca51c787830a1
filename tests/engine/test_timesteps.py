"""Timestep schemes: each one is unbiased for the uniform average over [t_min, t_max)."""
import pytest
import torch

from worker.engine.timesteps import fit_timestep_weights, sample_timesteps


def exact_mean(f, t_min=100, t_max=700):
    return f(torch.arange(t_min, t_max).double()).mean().item()


@pytest.mark.parametrize("scheme,weights", [("uniform", None), ("stratified", None),
                                            ("importance", (5.0, 1.0, 1.0, 0.2, 3.0, 1.0))])
def test_every_scheme_estimates_the_uniform_average(scheme, weights):
    f = lambda t: (t - 100.0) ** 2 / 1e4 + 1.0  # noqa: E731 - a smooth, non-constant function of t
    t, w = sample_timesteps(scheme, 60000, 60, 100, 700, torch.Generator().manual_seed(0), weights)
    assert ((t >= 100) & (t < 700)).all() and t.dtype == torch.int64
    assert (w.double() * f(t.double())).mean().item() == pytest.approx(exact_mean(f), rel=0.01)


def test_importance_with_flat_weights_is_plain_stratification():
    args = (24, 12, 100, 700)
    plain, ones = sample_timesteps("stratified", *args, torch.Generator().manual_seed(3))
    flat, weights = sample_timesteps("importance", *args, torch.Generator().manual_seed(3), (2.0,) * 6)
    assert torch.equal(plain, flat) and torch.allclose(weights, ones)


def test_importance_draws_more_where_weights_are_high():
    t, w = sample_timesteps("importance", 120, 120, 100, 700, torch.Generator().manual_seed(0), (4.0, 1.0))
    assert (t < 400).sum() == 96 and torch.allclose(w[t < 400], torch.tensor(2.5 / 4.0))


def test_fitted_weights_follow_the_spread_per_bin():
    g = torch.Generator().manual_seed(0)
    timesteps = torch.arange(100, 700, 10)
    spread = torch.where(timesteps < 400, 3.0, 1.0)
    differences = torch.randn(64, len(timesteps), generator=g) * spread
    low, high = fit_timestep_weights(differences, timesteps, 100, 700, bins=2)
    assert low / high == pytest.approx(3.0, rel=0.1)


def test_unusable_weights_are_errors():
    g = torch.Generator()
    with pytest.raises(ValueError):
        sample_timesteps("importance", 4, 4, 100, 700, g, None)
    with pytest.raises(ValueError):
        sample_timesteps("importance", 4, 4, 100, 700, g, (1.0,) * 7)  # 600 steps do not split in 7
