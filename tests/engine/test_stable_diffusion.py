"""The Stable Diffusion backend, fully offline: tiny random components laid out like a real SD folder
(tests/engine/sd_tiny.py) go through the same `from_pretrained` path as real weights.

Real weights: DIFFMINE_SD_WEIGHTS=/path/to/stable-diffusion-v1-5 pytest tests/engine/test_stable_diffusion.py
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from worker.engine.stable_diffusion import (  # noqa: E402
    LORA_FOLDER,
    LORA_WEIGHT_NAME,
    PromptTemplates,
    StableDiffusionDenoiser,
    build_prompt,
)

try:  # tests/engine on sys.path (rootdir-relative import) or the repo root (package import)
    from sd_tiny import TINY_IMAGE_SIZE, build_tiny_sd_folder, build_tiny_text_encoder_folder, write_tiny_tokenizer
except ImportError:  # pragma: no cover
    from tests.engine.sd_tiny import (
        TINY_IMAGE_SIZE,
        build_tiny_sd_folder,
        build_tiny_text_encoder_folder,
        write_tiny_tokenizer,
    )

LABELS = ["cat", "dog", "car"]
S = TINY_IMAGE_SIZE  # 64 px images -> 8 x 8 latents


# The tiny SD models' ops are too small for intra-op threads (tests/conftest.py's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0)


@pytest.fixture(scope="module")
def model(sd_folder) -> StableDiffusionDenoiser:
    """A shared, never-mutated full-fine-tune model (tests that train load their own)."""
    return StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS)


def images(n: int = 2, seed: int = 0, size: int = S) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def noisy_batch(m: StableDiffusionDenoiser, n: int = 2, seed: int = 0):
    z = m.encode(images(n, seed))
    g = torch.Generator().manual_seed(seed + 100)
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(100, 700, (n,), generator=g)
    return m.add_noise(z, noise, t), t, noise


# --- the offline tokenizer -------------------------------------------------------------------
def test_tiny_tokenizer_tokenizes_prompts(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok"))
    ids = tok("A photo of cat.").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "cat</w>",
                                              ".</w>", "<|endoftext|>"]
    # words without merges fall back to byte symbols, never to the unknown token
    ids = tok("Chest X-Ray with Cardiomegaly, Effusion!").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "chest x - ray with cardiomegaly , effusion !"
    assert tok.model_max_length == 77


# --- loading ---------------------------------------------------------------------------------
def test_from_pretrained_reads_a_standard_sd_folder(model, sd_folder):
    from diffusers import DDPMScheduler

    assert model.labels == LABELS and model.num_labels == 3
    assert model.num_train_timesteps == 1000
    assert model.vae_scale_factor == 8
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(model.alphas_cumprod, reference.alphas_cumprod)
    assert model.scheduler.config.clip_sample is False
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not model.training and not model.unet.training
    # train() leaves the frozen parts in eval mode
    model.train()
    assert model.unet.training and not model.vae.training and not model.text_encoder.training
    model.eval()


def test_scheduler_defaults_when_folder_has_none(sd_folder, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    shutil.rmtree(folder / "scheduler")
    m = StableDiffusionDenoiser.from_pretrained(folder, LABELS)
    assert m.scheduler.config.beta_schedule == "scaled_linear"
    assert m.scheduler.config.num_train_timesteps == 1000
    torch.testing.assert_close(m.alphas_cumprod[-1], torch.tensor(0.0047), atol=1e-4, rtol=0)


@pytest.mark.parametrize("missing", ["unet", "vae", "text_encoder", "tokenizer"])
def test_missing_subfolder_is_an_explicit_error(sd_folder, tmp_path, missing):
    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    shutil.rmtree(folder / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        StableDiffusionDenoiser.from_pretrained(folder, LABELS)


def test_bad_arguments_are_explicit_errors(sd_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        StableDiffusionDenoiser.from_pretrained(tmp_path / "nowhere", LABELS)
    with pytest.raises(ValueError, match=r"\{label\}"):
        StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, prompt_template="A photo of a cat.")
    with pytest.raises(ValueError, match="duplicate"):
        StableDiffusionDenoiser.from_pretrained(sd_folder, ["cat", "cat"])
    with pytest.raises(ValueError, match="empty"):
        StableDiffusionDenoiser.from_pretrained(sd_folder, [])
    with pytest.raises(TypeError):
        StableDiffusionDenoiser.from_pretrained(sd_folder, "cat")
    with pytest.raises(ValueError, match="lora_rank"):
        StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, lora_rank=0)


def test_condition_errors(model):
    z = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        model.predict_noise(z, 10, torch.zeros(2, 4))  # label count mismatch
    with pytest.raises(ValueError, match="conditions for a batch"):
        model.predict_noise(z, 10, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="multi-hot"):
        model.predict_noise(z, 10, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="timesteps"):
        model.predict_noise(z, torch.tensor([1, 2, 3]), torch.zeros(2, 3))


def test_text_encoder_width_mismatch(sd_folder, tmp_path):
    other = build_tiny_text_encoder_folder(tmp_path / "clip48", hidden=48)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, text_encoder_path=other)


# --- prompts -------------------------------------------------------------------------------------
def test_prompt_construction(model):
    assert model.prompts(model.condition([0, 2])) == ["A photo of cat.", "A photo of car."]
    assert model.prompts(model.condition([[0, 2]])) == ["A photo of cat, car."]
    assert model.prompts(model.null_condition(2)) == ["A photo.", "A photo."]
    assert model.prompt_for(1) == "A photo of dog."
    assert model.prompt_for([]) == "A photo."
    # label order, not the order indices were given in
    assert model.prompt_for([2, 0]) == "A photo of cat, car."

    xray = ["Atelectasis", "Cardiomegaly", "Effusion"]
    style = PromptTemplates.CHEST_XRAY
    assert build_prompt(xray, [0, 2], style.template, style.null_prompt, style.join) == \
        "Chest X-Ray with Atelectasis, Effusion."
    assert build_prompt(xray, [], style.template, style.null_prompt, style.join) == "Chest X-Ray."
    cars = PromptTemplates.CARS
    assert build_prompt(["1950"], [0], cars.template, cars.null_prompt) == "A car from the 1950s."
    assert PromptTemplates.STREET_VIEW.template == "A google street view image in {label}"
    assert PromptTemplates.PLACES.kwargs() == dict(prompt_template="Image of {label}.", null_prompt="",
                                                   label_join=", ")
    assert set(PromptTemplates.all()) >= {"cars", "faces", "street_view", "places", "chest_xray"}
    with pytest.raises(IndexError):
        build_prompt(xray, [3], style.template, style.null_prompt)


def test_custom_template_and_join(sd_folder):
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, ["A", "B", "C"], prompt_template="Chest X-Ray with {label}.",
                                                null_prompt="Chest X-Ray.", label_join=" and ")
    assert m.prompts(m.condition([[0, 1], 2, []])) == ["Chest X-Ray with A and B.", "Chest X-Ray with C.",
                                                       "Chest X-Ray."]


def test_too_long_prompt_is_an_error(sd_folder):
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, ["x" * 200])
    with pytest.raises(ValueError, match="tokens"):
        m.predict_noise(torch.zeros(1, 4, 8, 8), 10, m.condition([0]))


# --- the model -----------------------------------------------------------------------------------
def test_encode_decode_shapes(model):
    x = images(2)
    z = model.encode(x)
    assert z.shape == (2, 4, S // 8, S // 8)
    torch.testing.assert_close(model.encode(x), z)  # posterior mean: deterministic
    z1 = model.encode(x, generator=torch.Generator().manual_seed(1))
    z2 = model.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z1, z2)
    assert not torch.equal(z1, z)
    out = model.decode(z)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    # non-square, larger images
    assert model.encode(images(1, size=S)[..., : S // 2]).shape == (1, 4, S // 8, S // 16)
    with pytest.raises(ValueError, match="multiple"):
        model.encode(torch.zeros(1, 3, 60, 64))


def test_predict_noise_shapes_and_conditions_matter(model):
    noisy, t, _ = noisy_batch(model)
    with torch.no_grad():
        eps_label = model.predict_noise(noisy, t, model.condition([0, 1]))
        eps_null = model.predict_noise(noisy, t, model.null_condition(2))
        eps_other = model.predict_noise(noisy, t, model.condition([2, 2]))
        eps_scalar_t = model.predict_noise(noisy, 300, model.condition([0, 1]))
    assert eps_label.shape == noisy.shape == (2, 4, 8, 8)
    assert eps_scalar_t.shape == noisy.shape
    assert (eps_label - eps_null).abs().max() > 1e-4
    assert (eps_label - eps_other).abs().max() > 1e-4
    # a batch mixing conditions equals the rows computed one by one
    mixed = torch.stack([model.condition([0])[0], model.null_condition(1)[0]])
    with torch.no_grad():
        eps_mixed = model.predict_noise(noisy, t, mixed)
        eps_0 = model.predict_noise(noisy[:1], t[:1], model.condition([0]))
    torch.testing.assert_close(eps_mixed[0], eps_0[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eps_mixed[1], eps_null[1], atol=1e-5, rtol=1e-4)


def test_text_embeddings_are_cached(sd_folder):
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS)
    calls = []
    handle = m.text_encoder.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
    noisy, t, _ = noisy_batch(m, 4)
    conditions = m.condition([0, 1, 0, []])
    with torch.no_grad():
        first = m.predict_noise(noisy, t, conditions)
        assert calls == [3]  # one text-encoder pass for the 3 unique prompts
        assert m.text_cache_info() == dict(size=3, hits=0, misses=3)
        second = m.predict_noise(noisy, t, conditions)
    assert calls == [3]  # cache hit: no text-encoder pass at all
    assert m.text_cache_info() == dict(size=3, hits=4, misses=3)
    torch.testing.assert_close(first, second)
    hidden = m.text_embeddings(conditions)
    assert hidden.shape == (4, 77, 32)
    torch.testing.assert_close(hidden[0], hidden[2])
    m.to(torch.float64)  # moving the model drops the cache (embeddings would have the old dtype)
    assert m.text_cache_info()["size"] == 0
    handle.remove()


def test_capture_up_blocks_1(model):
    noisy, _, _ = noisy_batch(model)
    with torch.no_grad(), model.capture("up_blocks.1") as features:
        model.predict_noise(noisy, 161, model.condition([0, 1]))
    assert len(features) == 1
    assert features[0].shape == (2, 64, S // 16, S // 16)  # SD's DIFT layer: 1/16 of the image


def test_v_prediction_is_converted_to_epsilon(sd_folder, tmp_path):
    folder = tmp_path / "sd-v"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    m = StableDiffusionDenoiser.from_pretrained(folder, LABELS)
    assert m.prediction_type == "v_prediction"
    noisy, t, _ = noisy_batch(m)
    c = m.condition([0, 1])
    with torch.no_grad():
        v = m.unet(noisy, t, encoder_hidden_states=m.text_embeddings(c)).sample
        eps = m.predict_noise(noisy, t, c)
    ab = m.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, ab.sqrt() * v + (1 - ab).sqrt() * noisy)


# --- training ------------------------------------------------------------------------------------
def test_trainable_parameters_full_vs_lora(sd_folder):
    full = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS)
    unet_params = {id(p) for p in full.unet.parameters()}
    assert {id(p) for p in full.trainable_parameters()} == unet_params
    assert {id(p) for p in full.parameters() if p.requires_grad} == unet_params

    lora = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, lora_rank=4)
    names = {n for n, p in lora.unet.named_parameters() if p.requires_grad}
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {id(p) for p in lora.trainable_parameters()} == {id(p) for p in lora.parameters() if p.requires_grad}
    n_lora = sum(p.numel() for p in lora.trainable_parameters())
    assert 0 < n_lora < sum(p.numel() for p in lora.unet.parameters()) / 10
    # the adapter starts as a no-op (lora_B = 0): same predictions as the base UNet
    noisy, t, _ = noisy_batch(full)
    c = full.condition([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(lora.predict_noise(noisy, t, c), full.predict_noise(noisy, t, c))


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_a_few_optimization_steps_reduce_the_loss(sd_folder, lora_rank):
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, lora_rank=lora_rank)
    m.train()
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-3 if lora_rank is None else 1e-2)
    noisy, t, noise = noisy_batch(m, 4)
    c = m.condition([0, 1, 2, []])
    losses = []
    for _ in range(6):
        loss = F.mse_loss(m.predict_noise(noisy, t, c), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in m.vae.parameters()) and all(p.grad is None for p in m.text_encoder.parameters())


def test_train_from_training_module(sd_folder):
    training = pytest.importorskip("worker.engine.training")
    if not hasattr(training, "train"):
        pytest.skip("worker.engine.training has no train()")
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, lora_rank=4)
    data = torch.utils.data.TensorDataset(images(4), m.condition([0, 1, 2, [0, 2]]))
    result = training.train(m, data, steps=2, batch_size=2, seed=0, lr=1e-3)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not m.training


# --- save / load ---------------------------------------------------------------------------------
def _perturb(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _assert_same_predictions(a, b):
    noisy, t, _ = noisy_batch(a, 2, seed=3)
    for cond in (a.condition([0, [1, 2]]), a.null_condition(2)):
        with torch.no_grad():
            torch.testing.assert_close(a.predict_noise(noisy, t, cond), b.predict_noise(noisy, t, cond),
                                       atol=0, rtol=0)
    torch.testing.assert_close(a.encode(images(1)), b.encode(images(1)), atol=0, rtol=0)


def test_save_load_roundtrip_full(sd_folder, tmp_path):
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, prompt_template="Image of {label}.",
                                                null_prompt="", label_join=" and ")
    _perturb(m.trainable_parameters())  # as if fine-tuned
    m.save(tmp_path / "model")
    out = tmp_path / "model"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir()
    assert not list(out.rglob("*.bin")) and list((out / "unet").glob("*.safetensors"))
    config = json.loads((out / "diffmine.json").read_text())
    assert config["backend"] == "stable-diffusion"
    assert config["labels"] == LABELS and config["lora_rank"] is None
    assert config["prompt_template"] == "Image of {label}." and config["null_prompt"] == ""
    loaded = StableDiffusionDenoiser.load(out)
    assert loaded.prompts(loaded.condition([[0, 1]])) == ["Image of cat and dog."]
    assert not loaded.training
    _assert_same_predictions(m, loaded)

    # the saved folder is also a plain diffusers pipeline folder
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    noisy, t, _ = noisy_batch(m)
    with torch.no_grad():
        hidden = loaded.text_embeddings(loaded.condition([0, 1]))
        torch.testing.assert_close(pipe.unet(noisy, t, encoder_hidden_states=hidden).sample,
                                   loaded.predict_noise(noisy, t, loaded.condition([0, 1])))


def test_save_load_roundtrip_lora(sd_folder, tmp_path):
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, lora_rank=4)
    _perturb(m.trainable_parameters())
    out = tmp_path / "lora"
    m.save(out)
    assert (out / LORA_FOLDER / LORA_WEIGHT_NAME).is_file()
    assert not (out / "unet").exists()  # only the adapter; the base is referenced
    config = json.loads((out / "diffmine.json").read_text())
    assert config["lora_rank"] == 4 and Path(config["base_model"]) == sd_folder.resolve()
    from safetensors import safe_open

    with safe_open(str(out / LORA_FOLDER / LORA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["lora_adapter_metadata"]
    assert keys and all(k.startswith("unet.") and "lora_" in k for k in keys)
    loaded = StableDiffusionDenoiser.load(out)
    assert loaded.lora_rank == 4
    assert {n for n, p in loaded.unet.named_parameters() if p.requires_grad} == \
        {n for n, p in m.unet.named_parameters() if p.requires_grad}
    _assert_same_predictions(m, loaded)

    # self-contained variant: the base UNet (without the adapter) goes to unet/
    contained = tmp_path / "lora-contained"
    m.save(contained, include_base_unet=True)
    assert (contained / "unet").is_dir()
    moved_base = tmp_path / "moved"
    shutil.move(str(sd_folder), str(moved_base))  # the referenced base disappears
    try:
        _assert_same_predictions(m, StableDiffusionDenoiser.load(contained))
        with pytest.raises(FileNotFoundError, match="base model"):
            StableDiffusionDenoiser.load(out)
        _assert_same_predictions(m, StableDiffusionDenoiser.load(out, base_model=moved_base))
    finally:
        shutil.move(str(moved_base), str(sd_folder))


def test_lora_adapter_loads_into_a_diffusers_pipeline(sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    m = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, lora_rank=4)
    _perturb(m.trainable_parameters())
    m.save(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "lora" / LORA_FOLDER)
    noisy, t, _ = noisy_batch(m)
    c = m.condition([0, 1])
    with torch.no_grad():
        hidden = m.text_embeddings(c)
        torch.testing.assert_close(pipe.unet(noisy, t, encoder_hidden_states=hidden).sample,
                                   m.predict_noise(noisy, t, c), atol=1e-5, rtol=1e-4)


def test_resaving_switches_layout_cleanly(sd_folder, tmp_path):
    out = tmp_path / "model"
    StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, lora_rank=2).save(out)
    StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS).save(out)
    assert not (out / LORA_FOLDER).exists() and (out / "model_index.json").exists()
    assert StableDiffusionDenoiser.load(out).lora_rank is None


def test_separate_text_encoder(sd_folder, tmp_path):
    clip = build_tiny_text_encoder_folder(tmp_path / "clip", seed=7)
    m = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS, text_encoder_path=clip)
    base = StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS)
    c = m.condition([0])
    assert not torch.allclose(m.text_embeddings(c), base.text_embeddings(c))
    # a folder whose own text encoder is missing still works with a separate one
    folder = tmp_path / "sd-no-te"
    shutil.copytree(sd_folder, folder)
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")
    m2 = StableDiffusionDenoiser.from_pretrained(folder, LABELS, text_encoder_path=clip)
    torch.testing.assert_close(m2.text_embeddings(c), m.text_embeddings(c))
    # saved folders carry the text encoder that was used
    m.save(tmp_path / "model")
    loaded = StableDiffusionDenoiser.load(tmp_path / "model")
    torch.testing.assert_close(loaded.text_embeddings(c), m.text_embeddings(c))
    assert json.loads((tmp_path / "model" / "diffmine.json").read_text())["text_encoder_source"] == str(clip.resolve())


def test_load_errors(sd_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="diffmine"):
        StableDiffusionDenoiser.load(sd_folder)  # a plain SD folder is not a saved model
    out = tmp_path / "model"
    StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS).save(out)
    config = json.loads((out / "diffmine.json").read_text())
    (out / "diffmine.json").write_text(json.dumps(dict(config, backend="pixel")))
    with pytest.raises(ValueError, match="backend"):
        StableDiffusionDenoiser.load(out)
    (out / "diffmine.json").write_text(json.dumps(config))
    shutil.rmtree(out / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        StableDiffusionDenoiser.load(out)


def test_registry_dispatch(sd_folder, tmp_path):
    registry = pytest.importorskip("worker.engine.registry")
    StableDiffusionDenoiser.from_pretrained(sd_folder, LABELS).save(tmp_path / "model")
    loaded = registry.load_denoiser(tmp_path / "model")
    assert isinstance(loaded, StableDiffusionDenoiser) and loaded.labels == LABELS


# --- real weights (opt-in) -----------------------------------------------------------------------
REAL = os.environ.get("DIFFMINE_SD_WEIGHTS")


@pytest.mark.skipif(not REAL, reason="set DIFFMINE_SD_WEIGHTS=/path/to/a diffusers SD 1.x/2.x folder")
def test_real_weights(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    m = StableDiffusionDenoiser.from_pretrained(REAL, ["cat", "dog"], prompt_template="A photo of a {label}.",
                                                device=device, dtype=dtype)
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size
    x = images(1, size=256).to(device)
    z = m.encode(x)
    assert z.shape == (1, 4, 32, 32)
    assert 0.3 < z.float().std().item() < 3  # scaling_factor makes latents roughly unit variance
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(device, z.dtype)
    t = torch.tensor([400], device=device)
    with torch.no_grad(), m.capture("up_blocks.1") as feats:
        eps_c = m.predict_noise(m.add_noise(z, noise, t), t, m.condition([0], device=device))
        eps_0 = m.predict_noise(m.add_noise(z, noise, t), t, m.null_condition(1, device=device))
    assert torch.isfinite(eps_c).all() and (eps_c - eps_0).abs().max() > 0
    assert feats[0].shape[-1] == 256 // 16
    # a pretrained model denoises far better than predicting zeros
    assert F.mse_loss(eps_c.float(), noise.float()).item() < 0.9
    m.save(tmp_path / "model")
    assert StableDiffusionDenoiser.load(tmp_path / "model", device=device, dtype=dtype).labels == ["cat", "dog"]


# --- whole images of any aspect ratio (issue 13, item 5) ------------------------------------------
def wide_file(tmp_path, size=(150, 75), name="wide.png", seed=0):
    """A random RGB file of `size` (W, H)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path = tmp_path / name
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_whole_views_round_both_sides_to_64_px(model, tmp_path):
    from worker.engine.registry import SIDE_MULTIPLES, scoring_view

    assert model.side_multiple == SIDE_MULTIPLES["stable-diffusion"] == 64  # VAE 8x, UNet 8x
    view = scoring_view("stable-diffusion", S)
    # (W, H) -> (H, W): the shorter side is N, the longer the nearest multiple of 64
    for original, shape in [((150, 75), (64, 128)), ((100, 64), (64, 128)), ((90, 64), (64, 64)),
                            ((64, 150), (128, 64)), ((301, 97), (64, 192))]:
        assert view.shape_of(original) == shape, original
        loaded = view.load(wide_file(tmp_path, original))
        assert loaded.shape == (3, *shape)
    with pytest.raises(ValueError, match="multiple of 64"):
        scoring_view("stable-diffusion", 100)
    assert scoring_view("pixel", 30).shape_of((61, 30)) == (30, 61)  # pixel models: no rounding
    # the old centre square is kept as it was
    assert scoring_view("stable-diffusion", S, whole=False).shape_of((150, 75)) == (S, S)


def test_a_non_square_image_gets_a_full_width_latent_map_and_dift_grid(model, tmp_path):
    from worker.engine.data import load_view_groups, multi_hot
    from worker.engine.dift import dift_feature_map, patch_features
    from worker.engine.presets import FAST
    from worker.engine.registry import scoring_view
    from worker.engine.typicality import label_scores, typicality

    [(indices, wide)] = load_view_groups([wide_file(tmp_path)], scoring_view("stable-diffusion", S))
    assert wide.shape == (1, 3, 64, 128)
    preset = FAST.with_(draws=4)
    result = typicality(model, wide, multi_hot([0], len(LABELS)), preset, seed=0)
    assert result.maps.shape == (1, 8, 16)  # latents at N/8 over the whole width
    assert torch.allclose(result.scores, result.maps.mean(dim=(1, 2)), atol=1e-6)
    assert label_scores(model, wide, preset, seed=0, maps=True).maps.shape == (1, len(LABELS), 8, 16)
    # DIFT over the whole image: up_blocks.1 at 1/16 of both sides, a box at the right edge reads
    # the right edge's cells
    conditions = multi_hot([0], len(LABELS))
    grid = dift_feature_map(model, wide, conditions, draws=2)
    assert grid.shape[-2:] == (4, 8)
    right, left = patch_features(model, wide, conditions, [[(112, 0, 128, 16), (0, 0, 16, 16)]], draws=2)[0]
    assert torch.allclose(right, F.normalize(grid[0, :, 0, 7], dim=0), atol=1e-5)
    assert torch.allclose(left, F.normalize(grid[0, :, 0, 0], dim=0), atol=1e-5)


def test_images_of_one_rounded_shape_share_a_batch(model, tmp_path):
    """Rounding to 64 px puts photos of nearby aspect ratios in one batch (load_view_groups,
    the pixel path's grouping), and a wider batch sends proportionally fewer rows per forward
    call, so a call's memory stays that of the native 512 px square."""
    from worker.engine.data import load_view_groups
    from worker.engine.presets import FAST
    from worker.engine.registry import scoring_view
    from worker.engine.typicality import _rows_per_call

    paths = [wide_file(tmp_path, size, f"{i}.png") for i, size in enumerate([(128, 64), (64, 64), (100, 64)])]
    groups = load_view_groups(paths, scoring_view("stable-diffusion", S))
    assert [(indices, tuple(images.shape)) for indices, images in groups] == \
        [([0, 2], (2, 3, 64, 128)), ([1], (1, 3, 64, 64))]
    assert model.unet.config.sample_size == 8  # the tiny UNet's native latents (SD 1.5: 64)
    assert _rows_per_call(model, FAST, (8, 8)) == FAST.forward_batch
    assert _rows_per_call(model, FAST, (8, 16)) == FAST.forward_batch // 2
