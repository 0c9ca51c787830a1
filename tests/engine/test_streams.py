"""Random streams: one per purpose and per preset, so no two uses of a seed share numbers."""
import pytest
import torch

from worker.engine.presets import ADAPTIVE, FAST, PAPER
from worker.engine.streams import PURPOSES, derive_seed, generator
from worker.engine.typicality import draw_timesteps_and_noise, typicality

SHAPE = (3, 8, 8)


def shared_share(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of a's values found anywhere in b. Two independent float32 normal streams of
    thousands of values meet by chance a few times; `fast` repeated half of `paper`'s."""
    return float(torch.isin(a.flatten(), b.flatten()).float().mean())


def test_presets_at_one_seed_share_no_noise():
    presets = [PAPER, FAST, ADAPTIVE, PAPER.with_(draws=32), FAST.with_(draws=48)]
    noises = [draw_timesteps_and_noise(p, 0, SHAPE)[1] for p in presets]
    for i in range(len(noises)):
        for j in range(i + 1, len(noises)):
            assert shared_share(noises[i], noises[j]) < 1e-3, (presets[i].name, presets[j].name)


def test_speed_settings_and_prefixes_keep_the_draws():
    t, eps, _ = draw_timesteps_and_noise(PAPER, 3, SHAPE)
    t2, eps2, _ = draw_timesteps_and_noise(PAPER.with_(forward_batch=64, channels_last=True), 3, SHAPE)
    assert torch.equal(t, t2) and torch.equal(eps, eps2)
    # An adaptive stage scores the first draws of the preset's own sequence; the full draws extend it.
    full_t, full_eps, _ = draw_timesteps_and_noise(ADAPTIVE, 3, SHAPE)
    stage_t, stage_eps, _ = draw_timesteps_and_noise(ADAPTIVE.with_(prefix=12), 3, SHAPE)
    assert len(stage_t) == 12 and torch.equal(stage_t, full_t[:12]) and torch.equal(stage_eps, full_eps[:12])


def test_purposes_are_independent_streams():
    seeds = {purpose: derive_seed(0, purpose) for purpose in PURPOSES}
    assert len(set(seeds.values())) == len(PURPOSES)
    draws = {purpose: torch.randn(1000, generator=generator(0, purpose)) for purpose in PURPOSES}
    vae = draws["vae-posterior"]
    for purpose, values in draws.items():
        if purpose != "vae-posterior":
            assert shared_share(values, vae) < 1e-2
            assert abs(float(torch.corrcoef(torch.stack([values, vae]))[0, 1])) < 0.15
    # The old way seeded every purpose alike: the typicality noise of seed s is not the plain
    # generator of s any more.
    _, eps, _ = draw_timesteps_and_noise(PAPER, 0, SHAPE)
    plain = torch.randn(100, *SHAPE, generator=torch.Generator().manual_seed(0))
    assert shared_share(eps, plain) < 1e-3
    with pytest.raises(ValueError, match="unknown random stream 'crops'"):
        derive_seed(0, "crops")


def test_a_prefix_scores_the_first_draws(tiny_denoiser, images):
    conditions = tiny_denoiser.condition([0, 1, 0])
    preset = PAPER.with_(draws=12)
    first = typicality(tiny_denoiser, images, conditions, preset.with_(prefix=4), seed=0, draw_maps=True)
    full = typicality(tiny_denoiser, images, conditions, preset, seed=0, draw_maps=True)
    assert first.draws.tolist() == [4, 4, 4] and first.draw_maps.shape == (3, 4, 32, 32)
    torch.testing.assert_close(first.differences, full.differences[:, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(full.draw_maps.mean(dim=1), full.maps, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="prefix must be 2..12 draws"):
        preset.with_(prefix=13)
