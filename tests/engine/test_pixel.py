"""The pixel backend: conditioning, persistence, hooks, registry."""
import json

import pytest
import torch
from conftest import LABELS

from worker.engine.pixel import PixelDenoiser, unet_config
from worker.engine.registry import create_pixel_denoiser, load_denoiser


def test_same_seed_same_weights_other_seed_other_weights():
    a, b = (create_pixel_denoiser(LABELS, seed=3, size="tiny") for _ in range(2))
    c = create_pixel_denoiser(LABELS, seed=4, size="tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_small_model_is_the_reference_cpu_size():
    model = create_pixel_denoiser(LABELS, resolution=32, size="small")
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.2e6


def test_condition_embedding_sums_labels_and_has_a_null_row(tiny_denoiser):
    model = tiny_denoiser
    conditions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    emb = model.condition_embedding(conditions)
    table = model.label_embedding
    torch.testing.assert_close(emb[0], table[0])
    torch.testing.assert_close(emb[1], table[1])
    torch.testing.assert_close(emb[2], table[0] + table[1])
    torch.testing.assert_close(emb[3], model.null_embedding)


def test_condition_helpers_build_multi_hot_rows(tiny_denoiser):
    rows = tiny_denoiser.condition([0, [0, 1]])
    assert rows.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert tiny_denoiser.null_condition(2).sum() == 0


def test_wrong_condition_width_is_an_error(tiny_denoiser, images):
    with pytest.raises(ValueError, match="conditions must be"):
        tiny_denoiser.predict_noise(images, torch.tensor([5, 5, 5]), torch.zeros(3, 5))


def test_label_changes_the_prediction(tiny_denoiser, images):
    t = torch.tensor([300, 300, 300])
    with torch.no_grad():
        with_label = tiny_denoiser.predict_noise(images, t, tiny_denoiser.condition([0, 0, 0]))
        without = tiny_denoiser.predict_noise(images, t, tiny_denoiser.null_condition(3))
    assert with_label.shape == images.shape
    assert not torch.allclose(with_label, without)


def test_encode_decode_are_identity(tiny_denoiser, images):
    assert tiny_denoiser.encode(images) is images
    assert tiny_denoiser.decode(images) is images


def test_save_load_roundtrip_gives_identical_predictions(tiny_denoiser, images, tmp_path):
    tiny_denoiser.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "diffmine.json").read_text())
    assert config["backend"] == "pixel" and config["labels"] == LABELS and config["resolution"] == 32
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_denoiser(tmp_path / "model")
    assert isinstance(loaded, PixelDenoiser) and not loaded.training
    t, cond = torch.tensor([100, 400, 699]), tiny_denoiser.condition([0, 1, [0, 1]])
    with torch.no_grad():
        assert torch.equal(tiny_denoiser.predict_noise(images, t, cond), loaded.predict_noise(images, t, cond))


def test_registry_rejects_unknown_backends_and_non_model_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_denoiser(tmp_path)
    (tmp_path / "diffmine.json").write_text(json.dumps({"backend": "gan"}))
    with pytest.raises(ValueError, match="unknown backend"):
        load_denoiser(tmp_path)


def test_capture_hooks_the_second_up_block(tiny_denoiser, images):
    with torch.no_grad(), tiny_denoiser.capture("up_blocks.1") as features:
        tiny_denoiser.predict_noise(images, torch.tensor([161] * 3), tiny_denoiser.condition([0, 1, 0]))
    # up_blocks[1] ends with an upsampler
    assert len(features) == 1 and features[0].shape[0] == 3 and features[0].shape[-1] == 32


def test_64px_model_has_one_more_level_and_bad_sizes_fail():
    assert len(unet_config(64)["block_out_channels"]) == len(unet_config(32)["block_out_channels"]) + 1
    with pytest.raises(ValueError):
        unet_config(48)
    with pytest.raises(ValueError):
        unet_config(32, size="huge")


def test_block_output_stops_the_pass_at_the_block_with_the_same_features(tiny_denoiser, images):
    timesteps, conditions = torch.tensor([161] * 3), tiny_denoiser.condition([0, 1, 0])
    with torch.no_grad(), tiny_denoiser.capture("up_blocks.1") as full_pass:
        tiny_denoiser.predict_noise(images, timesteps, conditions)
    ran_after = []
    handle = tiny_denoiser.unet.get_submodule("up_blocks.2").register_forward_hook(lambda *a: ran_after.append(1))
    try:
        with torch.no_grad():
            stopped = tiny_denoiser.block_output("up_blocks.1", images, timesteps, conditions)
    finally:
        handle.remove()
    assert torch.equal(stopped, full_pass[0])
    assert not ran_after  # the blocks after it never ran
    with pytest.raises(AttributeError):
        tiny_denoiser.block_output("up_blocks.9", images, timesteps, conditions)
