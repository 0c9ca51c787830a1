"""Typicality: the paper preset against the formula written out, batching, seeds, fast options."""
import dataclasses
import math

import pytest
import torch

from worker.engine.presets import FAST, PAPER, TypicalityPreset, get_preset
from worker.engine.streams import generator, text_key
from worker.engine.timesteps import fit_timestep_weights
from worker.engine.typicality import (
    draw_timesteps_and_noise,
    label_scores,
    label_scores_stream,
    standard_error,
    typicality,
    typicality_stream,
)


def formula_by_hand(denoiser, image, condition, seed, draws=100, t_min=100, t_max=700):
    """docs/method.md section 2, one draw at a time: T = E[L(null) - L(c)], channel-averaged maps,
    from the paper preset's own random stream of the seed (worker/engine/streams.py)."""
    g = generator(seed, "typicality-draws", *text_key(PAPER.sampling_key))
    timesteps = torch.randint(t_min, t_max, (draws,), generator=g)
    noise = torch.randn((draws, *image.shape), generator=g)
    null = torch.zeros(1, denoiser.num_labels)
    differences = []
    with torch.no_grad():
        for t, eps in zip(timesteps, noise):
            t, eps = t[None], eps[None]
            noisy = denoiser.scheduler.add_noise(image[None], eps, t)
            loss_null = (denoiser.predict_noise(noisy, t, null) - eps).pow(2).mean(dim=1)
            loss_label = (denoiser.predict_noise(noisy, t, condition[None]) - eps).pow(2).mean(dim=1)
            differences.append((loss_null - loss_label)[0])
    differences = torch.stack(differences)  # [N, H, W]
    per_draw = differences.mean(dim=(1, 2))
    return differences.mean(dim=0), per_draw.mean(), per_draw.std() / math.sqrt(draws)


def test_paper_preset_equals_the_formula_draw_by_draw(tiny_denoiser, images):
    conditions = tiny_denoiser.condition([0, [0, 1]])
    result = typicality(tiny_denoiser, images[:2], conditions, PAPER, seed=5)
    assert result.maps.shape == (2, 32, 32) and result.draws.tolist() == [100, 100]
    for i in range(2):
        expected_map, expected_score, expected_stderr = formula_by_hand(tiny_denoiser, images[i], conditions[i], 5)
        torch.testing.assert_close(result.maps[i], expected_map, atol=1e-5, rtol=0)
        assert result.scores[i].item() == pytest.approx(expected_score.item(), abs=1e-5)
        assert result.stderr[i].item() == pytest.approx(expected_stderr.item(), abs=1e-5)
        assert result.scores[i].item() == pytest.approx(result.maps[i].mean().item(), abs=1e-6)
    assert torch.isfinite(result.maps.half()).all()


def test_batched_equals_one_image_at_a_time(tiny_denoiser, images):
    preset = PAPER.with_(draws=20, forward_batch=14)  # chunks that straddle images
    conditions = tiny_denoiser.condition([0, 1, [0, 1]])
    batched = typicality(tiny_denoiser, images, conditions, preset, seed=1)
    for i in range(3):
        single = typicality(tiny_denoiser, images[i:i + 1], conditions[i:i + 1], preset.with_(forward_batch=2), seed=1)
        torch.testing.assert_close(batched.maps[i], single.maps[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.stderr[i], single.stderr[0], atol=1e-6, rtol=0)


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_denoiser, images):
    preset, conditions = FAST.with_(draws=8), tiny_denoiser.condition([0, 1, 0])
    first, again = (typicality(tiny_denoiser, images, conditions, preset, seed=2) for _ in range(2))
    other = typicality(tiny_denoiser, images, conditions, preset, seed=3)
    assert torch.equal(first.maps, again.maps) and torch.equal(first.stderr, again.stderr)
    assert not torch.allclose(first.scores, other.scores)


def test_every_image_sees_the_same_draws(tiny_denoiser, images):
    # Two copies of one image in a batch get identical maps: the draws are re-seeded per image.
    twins = images[[0, 0]]
    result = typicality(tiny_denoiser, twins, tiny_denoiser.condition([1, 1]), PAPER.with_(draws=6), seed=0)
    torch.testing.assert_close(result.maps[0], result.maps[1], atol=1e-6, rtol=0)


def test_stream_yields_one_result_per_batch_with_keys(tiny_denoiser, images):
    preset, conditions = FAST.with_(draws=4), tiny_denoiser.condition([0, 1, 0])
    batches = iter([(images[:2], conditions[:2], ["a", "b"]), (images[2:], conditions[2:], ["c"])])
    results = list(typicality_stream(tiny_denoiser, batches, preset, seed=0))
    assert [r.keys for r in results] == [["a", "b"], ["c"]]
    whole = typicality(tiny_denoiser, images, conditions, preset, seed=0)
    torch.testing.assert_close(torch.cat([r.scores for r in results]), whole.scores, atol=1e-6, rtol=0)


def test_null_condition_has_no_typicality(tiny_denoiser, images):
    with pytest.raises(ValueError, match="null"):
        typicality(tiny_denoiser, images[:1], tiny_denoiser.null_condition(1), FAST)


def test_stratified_draws_cover_each_slice_once_per_round():
    preset = TypicalityPreset(name="s", draws=24, timesteps="stratified", round_size=12)
    timesteps, noise, weights = draw_timesteps_and_noise(preset, 0, (3, 4, 4))
    assert noise.shape == (24, 3, 4, 4) and (weights == 1).all()
    for round_ in timesteps.view(2, 12):
        assert (round_ // 50).tolist() == list(range(2, 14))  # slices of 600 / 12 = 50 steps, from 100


def test_collapsed_strata_error_matches_its_formula():
    d = torch.tensor([[1.0, 3.0, 2.0, 2.0]])
    assert standard_error(d, "stratified").item() == pytest.approx(math.sqrt(4.0 + 0.0) / 4)
    assert standard_error(d, "uniform").item() == pytest.approx(d.std().item() / 2)


def test_early_stopping_spends_fewer_draws_and_reports_its_error(tiny_denoiser, images):
    conditions = tiny_denoiser.condition([0, 1, 0])
    full = typicality(tiny_denoiser, images, conditions, FAST.with_(draws=16, round_size=4), seed=0)
    loose = FAST.with_(draws=16, round_size=4, target_stderr=float(full.stderr.max()) * 4)
    stopped = typicality(tiny_denoiser, images, conditions, loose, seed=0)
    assert (stopped.draws == 4).all() and (stopped.stderr <= loose.target_stderr).all()
    never = typicality(tiny_denoiser, images, conditions, loose.with_(target_stderr=0.0), seed=0)
    torch.testing.assert_close(never.scores, full.scores, atol=1e-6, rtol=0)


def test_channels_last_gives_the_same_numbers(tiny_denoiser, images):
    conditions = tiny_denoiser.condition([0, 1, 0])
    plain = typicality(tiny_denoiser, images, conditions, FAST.with_(draws=4), seed=0)
    fast = typicality(tiny_denoiser, images, conditions, FAST.with_(draws=4, channels_last=True), seed=0)
    torch.testing.assert_close(plain.maps, fast.maps, atol=1e-5, rtol=0)
    assert next(tiny_denoiser.unet.parameters()).is_contiguous()  # the model is put back


def test_label_scores_share_draws_with_typicality(tiny_denoiser, images):
    preset = PAPER.with_(draws=10)
    everything = label_scores(tiny_denoiser, images, preset, seed=4, maps=True)
    assert everything.label_losses.shape == (3, 2) and everything.maps.shape == (3, 2, 32, 32)
    for label in range(2):
        own = typicality(tiny_denoiser, images, tiny_denoiser.condition([label] * 3), preset, seed=4)
        torch.testing.assert_close(everything.typicality[:, label], own.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(everything.stderr[:, label], own.stderr, atol=1e-6, rtol=0)
        torch.testing.assert_close(everything.maps[:, label], own.maps, atol=1e-5, rtol=0)
    assert everything.predicted.tolist() == everything.label_losses.argmin(dim=1).tolist()
    value, error = everything.contrast(0, 1)
    torch.testing.assert_close(value, everything.label_losses[:, 1] - everything.label_losses[:, 0])
    assert (error > 0).all()


def test_label_scores_stream_accepts_dataset_batches(tiny_denoiser, images):
    conditions = tiny_denoiser.condition([0, 1, 0])
    (scores,) = label_scores_stream(tiny_denoiser, [(images, conditions, [7, 8, 9])], FAST.with_(draws=4))
    assert scores.keys == [7, 8, 9] and torch.equal(scores.conditions, conditions)


def test_presets_are_frozen_and_validated():
    assert get_preset("paper") is PAPER and PAPER.draws == 100 and (PAPER.t_min, PAPER.t_max) == (100, 700)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'draws'"):
        PAPER.draws = 5
    with pytest.raises(ValueError, match="even number of draws, got 9"):
        TypicalityPreset(name="odd", draws=9, timesteps="stratified")
    with pytest.raises(ValueError, match="unknown typicality preset 'warp'"):
        get_preset("warp")


def test_importance_sampled_typicality_runs_with_fitted_weights(tiny_denoiser, images):
    conditions = tiny_denoiser.condition([0, 1, 0])
    pilot_preset = FAST.with_(draws=24)
    pilot = typicality(tiny_denoiser, images, conditions, pilot_preset, seed=9)
    timesteps, _, _ = draw_timesteps_and_noise(pilot_preset, 9, (3, 32, 32))
    weights = fit_timestep_weights(pilot.differences, timesteps, 100, 700, bins=6)
    preset = FAST.with_(draws=12, timesteps="importance", timestep_weights=weights)
    result = typicality(tiny_denoiser, images, conditions, preset, seed=0)
    assert torch.isfinite(result.scores).all() and (result.stderr > 0).all()
    with pytest.raises(ValueError, match="timestep_weights go with timesteps='importance'"):
        FAST.with_(timesteps="importance")  # no weights
