"""Translation across labels: DDIM inversion and sampling, SDEdit, Plug-and-Play hooks.

Real behaviour is checked on a tiny pixel model trained here on the planted-mark data (the mark
is at a fixed place in every image of label 0, "marked"):

* inverting an image under its own label and regenerating it under that label (guidance 1)
  gives it back within RMSE 0.07 (pixels in [0, 1]);
* translating a plain image into "marked" paints the mark in and raises the image's typicality
  under "marked"; translating a marked image into "plain" removes it.

Plug-and-Play runs on tiny random Stable Diffusion components (sd_tiny.py): its hooks change the
output, and are gone afterwards (the UNet's plain forward gives the same numbers as before).
"""
from __future__ import annotations

import pytest
import torch
from conftest import LABELS, planted_dataset

from worker.engine.denoiser import ConditionalDenoiser
from worker.engine.presets import FAST as TYPICALITY_FAST
from worker.engine.registry import create_pixel_denoiser
from worker.engine.training import train
from worker.engine.translation import (
    FAST,
    REFERENCE,
    ddim_invert,
    ddim_sample,
    ddim_timesteps,
    get_preset,
    translate,
    translate_batch,
)
from worker.engine.typicality import typicality

MARKED, PLAIN = 0, 1
#: stated fidelity: RMSE of inversion + regeneration under the same label, pixels in [0, 1]
RECONSTRUCTION_RMSE = 0.07


@pytest.fixture(scope="module")
def planted():
    """A tiny pixel model that has learnt the planted mark and its absence."""
    images, conditions, _ = planted_dataset(256, seed=0)
    model = create_pixel_denoiser(LABELS, resolution=32, seed=0, size="tiny")
    train(model, torch.utils.data.TensorDataset(images, conditions), steps=200, batch_size=16, seed=0,
          lr=1e-3)
    return model


@pytest.fixture(scope="module")
def unseen():
    return planted_dataset(4, seed=1)  # marked, plain, marked, plain


def mark_brightness(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return images[:, :, mask].mean(dim=(1, 2))


# --- DDIM ----------------------------------------------------------------------------------------
def test_grid_starts_at_the_last_timestep_for_every_step_count():
    for steps in (1, 25, 50, 999, 1000):
        grid = ddim_timesteps(steps)
        assert grid[0] == 999 and len(grid) == steps and len(set(grid.tolist())) == steps
        assert (grid[:-1] > grid[1:]).all() and grid[-1] >= 0
    assert set(ddim_timesteps(25).tolist()) <= set(ddim_timesteps(50).tolist())
    with pytest.raises(ValueError):
        ddim_timesteps(0)


def test_presets():
    assert (REFERENCE.invert_steps, REFERENCE.sample_steps, REFERENCE.guidance) == (999, 50, 7.5)
    assert (FAST.invert_steps, FAST.sample_steps) == (50, 25)
    assert get_preset("fast") is FAST
    with pytest.raises(ValueError):
        get_preset("slow")


def test_sampling_undoes_inversion_when_eps_does_not_depend_on_x():
    """With an eps that depends on t only, DDIM's round trip is exact: checks the algebra and
    that inversion and sampling walk the same grid."""
    class Constant(torch.nn.Module):
        num_labels, num_train_timesteps, backend = 2, 1000, "pixel"
        inference = ConditionalDenoiser.inference

        def __init__(self):
            super().__init__()
            from diffusers import DDPMScheduler
            self.scheduler = DDPMScheduler(num_train_timesteps=1000)
            self.weight = torch.nn.Parameter(torch.ones(1))

        def predict_noise(self, noisy, timesteps, conditions):
            by_t = torch.sin(timesteps.float())[:, None, None, None].expand_as(noisy) * 0.3
            return by_t + conditions[:, :1, None, None]

    model = Constant()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    condition = torch.tensor([1.0, 0.0])
    noise = ddim_invert(model, x, condition, steps=20)
    back = ddim_sample(model, noise, condition.expand(2, -1), steps=20, guidance=1.0)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=0)


def test_inversion_then_regeneration_reconstructs_on_a_trained_model(planted, unseen):
    images, conditions, _ = unseen
    results = translate_batch(planted, images, conditions, torch.eye(2), invert_steps=50, sample_steps=50,
                              guidance=1.0)
    errors = [r.reconstruction_error for r in results]
    assert max(errors) < RECONSTRUCTION_RMSE, errors
    for r, c in zip(results, conditions):
        assert r.source_index == int(c.argmax())
        torch.testing.assert_close(r.reconstruction, r.images[r.source_index])
    # fewer steps reconstruct worse: the error is the discretisation's
    coarse = translate_batch(planted, images, conditions, torch.eye(2), invert_steps=10, sample_steps=10,
                             guidance=1.0)
    assert sum(r.reconstruction_error for r in coarse) > sum(errors)


def test_translation_paints_the_mark_in_and_out(planted, unseen):
    images, conditions, masks = unseen
    mask = masks[0]
    results = translate_batch(planted, images, conditions, torch.eye(2), invert_steps=50, sample_steps=25,
                              guidance=3.0)
    to_marked = torch.stack([r.images[MARKED] for r in results])
    to_plain = torch.stack([r.images[PLAIN] for r in results])
    source = mark_brightness(images, mask)
    marked_sources = conditions[:, MARKED] == 1
    # the mark appears when translating plain images into "marked"...
    assert (mark_brightness(to_marked, mask)[~marked_sources] > source[~marked_sources] + 0.5).all()
    # ...and fades when translating marked images out of it
    assert (mark_brightness(to_plain, mask)[marked_sources] < source[marked_sources] - 0.5).all()
    # and the typicality under "marked" of plain images rises with the translation
    preset = TYPICALITY_FAST.with_(draws=8)
    marked = torch.eye(2)[[MARKED, MARKED]]
    before = typicality(planted, images[~marked_sources], marked, preset, seed=0).scores
    after = typicality(planted, to_marked[~marked_sources], marked, preset, seed=0).scores
    assert (after > before).all(), (before, after)


def test_one_image_equals_its_row_of_a_batch(planted, unseen):
    images, conditions, _ = unseen
    batched = translate_batch(planted, images[:2], conditions[:2], torch.eye(2), invert_steps=8, sample_steps=6,
                              guidance=2.0)
    single = translate(planted, images[1], conditions[1], torch.eye(2), invert_steps=8, sample_steps=6,
                       guidance=2.0)
    torch.testing.assert_close(batched[1].images, single.images, atol=1e-3, rtol=0)
    assert batched[1].reconstruction_error == pytest.approx(single.reconstruction_error, abs=1e-3)


def test_all_targets_run_in_one_batch_per_step(planted, unseen):
    images, conditions, _ = unseen
    calls = []
    handle = planted.unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        translate(planted, images[0], conditions[0], torch.eye(2), invert_steps=4, sample_steps=3, guidance=2.0)
    finally:
        handle.remove()
    assert calls == [1] * 4 + [4] * 3  # inversion: one row; sampling: 2 labels x (null, label)


def test_a_source_condition_outside_the_targets_still_gets_a_reconstruction(planted, unseen):
    images, _, _ = unseen
    both = torch.tensor([1.0, 1.0])
    result = translate(planted, images[0], both, torch.eye(2), invert_steps=6, sample_steps=6, guidance=1.0)
    assert result.source_index is None and result.images.shape == (2, 3, 32, 32)
    assert 0 <= result.reconstruction_error < 1


def test_sdedit_is_seeded_and_keeps_more_at_low_strength(planted, unseen):
    images, conditions, _ = unseen
    kwargs = dict(sample_steps=10, guidance=1.0)
    weak = translate(planted, images[0], conditions[0], torch.eye(2), sdedit_strength=0.2, seed=1, **kwargs)
    again = translate(planted, images[0], conditions[0], torch.eye(2), sdedit_strength=0.2, seed=1, **kwargs)
    other = translate(planted, images[0], conditions[0], torch.eye(2), sdedit_strength=0.2, seed=2, **kwargs)
    strong = translate(planted, images[0], conditions[0], torch.eye(2), sdedit_strength=1.0, seed=1, **kwargs)
    assert torch.equal(weak.images, again.images) and not torch.equal(weak.images, other.images)
    assert weak.reconstruction_error < strong.reconstruction_error
    with pytest.raises(ValueError):
        translate(planted, images[0], conditions[0], torch.eye(2), sdedit_strength=1.5)
    with pytest.raises(ValueError, match="Plug-and-Play"):
        translate(planted, images[0], conditions[0], torch.eye(2), sdedit_strength=0.5, pnp=True)


# --- Plug-and-Play on Stable Diffusion -----------------------------------------------------------
@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    pytest.importorskip("transformers")
    try:
        from sd_tiny import build_tiny_sd_folder
    except ImportError:  # pragma: no cover
        from tests.engine.sd_tiny import build_tiny_sd_folder
    from worker.engine.stable_diffusion import StableDiffusionDenoiser

    folder = build_tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0)
    return StableDiffusionDenoiser.from_pretrained(folder, ["cat", "dog", "car"])


def hooked_modules(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_pnp_sites_are_the_reference_layers(sd_model):
    from worker.engine.pnp import PlugAndPlay

    pnp = PlugAndPlay(sd_model.unet)
    unet = sd_model.unet
    assert pnp.resnet_modules == [unet.up_blocks[1].resnets[1].conv2]
    # tiny SD has 2 attentions per up block: block 1 -> [1], blocks 2 and 3 -> [0, 1]; q and k each
    expected = [unet.up_blocks[b].attentions[i].transformer_blocks[0].attn1
                for b, i in ((1, 1), (2, 0), (2, 1), (3, 0), (3, 1))]
    assert pnp.attention_modules == [p for a in expected for p in (a.to_q, a.to_k)]
    pnp.set_step(7, 10)
    assert pnp.inject_resnet and not pnp.inject_attention
    pnp.set_step(8, 10)
    assert not pnp.inject_resnet


def test_pnp_changes_the_output_and_leaves_no_hooks(sd_model):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps, conditions = torch.tensor([500, 500]), torch.eye(3)[:2]
    with torch.no_grad():
        before = sd_model.predict_noise(latents, timesteps, conditions)
    assert hooked_modules(sd_model.unet) == []
    kwargs = dict(invert_steps=6, sample_steps=5, guidance=7.5)
    source = torch.tensor([1.0, 0.0, 0.0])
    with_pnp = translate(sd_model, image, source, torch.eye(3), pnp=True, **kwargs)
    without = translate(sd_model, image, source, torch.eye(3), pnp=False, **kwargs)
    assert translate(sd_model, image, source, torch.eye(3), **kwargs).images.equal(with_pnp.images)  # default on
    assert (with_pnp.images - without.images).abs().max() > 1e-2
    assert hooked_modules(sd_model.unet) == []
    with torch.no_grad():
        after = sd_model.predict_noise(latents, timesteps, conditions)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_pnp_injects_source_features_only_in_its_steps_and_unhooks_on_error(sd_model):
    from worker.engine.pnp import PlugAndPlay

    pnp = PlugAndPlay(sd_model.unet)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), pnp.injecting():
        # registered after the injection hook, so it sees the injected output
        probe = sd_model.unet.up_blocks[1].resnets[1].conv2.register_forward_hook(
            lambda m, i, o: seen.append(o))
        try:
            pnp.set_step(0, 10)
            sd_model.predict_noise(latents, torch.tensor([900] * 3), torch.eye(3))
            pnp.set_step(9, 10)
            sd_model.predict_noise(latents, torch.tensor([900] * 3), torch.eye(3))
        finally:
            probe.remove()
        raise RuntimeError("boom")
    assert hooked_modules(sd_model.unet) == []
    injected, plain = seen
    torch.testing.assert_close(injected[1], injected[0])
    torch.testing.assert_close(injected[2], injected[0])
    assert not torch.allclose(plain[1], plain[0])
    assert pnp.injections == 1 + len(pnp.attention_modules)
