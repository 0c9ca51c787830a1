"""Tiny random Stable Diffusion components, laid out exactly like a real SD 1.x folder.

`build_tiny_sd_folder(path, seed)` writes, fully offline and in about a second:

    path/
      model_index.json
      unet/          config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
      vae/           config.json + diffusion_pytorch_model.safetensors   (AutoencoderKL, 8x down)
      text_encoder/  config.json + model.safetensors                     (CLIPTextModel, legacy
                                                                          "text_model." keys like SD 1.5)
      tokenizer/     vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json
      scheduler/     scheduler_config.json                               (PNDMScheduler, SD 1.5 betas)

The architecture mirrors SD 1.x at toy width: 4 UNet levels (CrossAttnDown x3 + Down; Up + CrossAttnUp x3),
so `up_blocks.1` is a cross-attention up block whose output is at 1/16 of the image size, like SD's
DIFT-161 layer; the VAE downsamples 8x into 4 latent channels. Images of 64 x 64 pixels give 8 x 8 latents.

Reused by the backend tests, GPU check scripts and the translation (Plug-and-Play) tests; import it as
`tests.engine.sd_tiny` from the repo root or as `sd_tiny` with tests/engine on sys.path.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

#: width of the text embeddings and of the UNet cross-attention
TINY_HIDDEN = 32
#: the tiny UNet's native latent size; images of TINY_IMAGE_SIZE pixels encode to it
TINY_LATENT_SIZE = 8
TINY_IMAGE_SIZE = TINY_LATENT_SIZE * 8

#: whole words given BPE merges in the tiny vocabulary (any other text tokenizes byte by byte)
_WORDS = ("a", "photo", "of", "with", "and", "chest", "x", "ray", "car", "from", "the", "image", "cat", "dog")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level mapping: every byte to a printable unicode character."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab_and_merges(words=_WORDS) -> tuple[dict[str, int], list[str]]:
    """A valid CLIP BPE vocabulary: 256 byte symbols, their "</w>" variants, word merges, specials."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            if merged not in vocab:
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json / merges.txt / configs the way SD 1.5's tokenizer/ folder has them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True,
                  add_prefix_space=False, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_unet_config(sample_size: int = TINY_LATENT_SIZE, cross_attention_dim: int = TINY_HIDDEN) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=0.18215,
    )


def tiny_text_config(hidden: int = TINY_HIDDEN, vocab_size: int = 1000):
    from transformers import CLIPTextConfig

    vocab, _ = tiny_vocab_and_merges()
    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )


def write_tiny_text_encoder(folder: str | Path, seed: int = 0, hidden: int = TINY_HIDDEN,
                            legacy_keys: bool = True) -> Path:
    """A random CLIPTextModel; `legacy_keys` rewrites weights with SD 1.5's "text_model." prefix."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    CLIPTextModel(tiny_text_config(hidden)).save_pretrained(folder)
    if legacy_keys:
        weights = folder / "model.safetensors"
        state = load_file(str(weights))
        state = {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous() for k, v in state.items()}
        save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def build_tiny_sd_folder(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD 1.x-style folder at `path` (created) and return it."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**tiny_unet_config()).save_pretrained(path / "unet", safe_serialization=True)
    torch.manual_seed(seed + 1)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(path / "vae", safe_serialization=True)
    write_tiny_text_encoder(path / "text_encoder", seed=seed + 2)
    write_tiny_tokenizer(path / "tokenizer")
    # SD 1.5 ships a PNDM config; the backend reads its betas into a DDPM schedule.
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    return path


def build_tiny_text_encoder_folder(path: str | Path, seed: int = 7, hidden: int = TINY_HIDDEN) -> Path:
    """A separate text encoder + tokenizer in one folder (like openai/clip-vit-large-patch14-336)."""
    path = Path(path)
    write_tiny_text_encoder(path, seed=seed, hidden=hidden, legacy_keys=False)
    write_tiny_tokenizer(path)
    return path


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/engine/sd_tiny.py /tmp/tiny-sd
    import sys

    print(build_tiny_sd_folder(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"))
