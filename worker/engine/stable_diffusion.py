"""Stable Diffusion (1.x / 2.x) as a `ConditionalDenoiser`: the paper's reference backend.

Components (a standard diffusers SD folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/):

* `AutoencoderKL`, frozen. `encode` = VAE posterior mean (or a sample, with a generator) times
  `scaling_factor`, so every loss and typicality map lives in the 4 x H/8 x W/8 latent space.
* `UNet2DConditionModel`, the trained part: fully fine-tuned (the reference recipe) or, with
  `lora_rank`, frozen with peft LoRA adapters on its attention projections.
* CLIP text encoder + tokenizer, frozen. Optionally a separate one (`text_encoder_path`), as the paper
  does (openai/clip-vit-large-patch14-336, geolocal/StreetCLIP); its width must match the UNet's
  cross-attention width.
* The DDPM noise schedule of the folder's scheduler config (SD: scaled_linear betas 0.00085..0.012,
  1000 steps); a folder without scheduler/ gets exactly those defaults.

Conditions -> prompts. A condition row is multi-hot over `labels`. The active label names, in label
order, are joined with `label_join` (", " by default) and substituted for "{label}" in
`prompt_template`; an all-zeros row gives `null_prompt`. E.g. with "Chest X-Ray with {label}." the row
[1, 0, 1] over [Atelectasis, Cardiomegaly, Effusion] gives "Chest X-Ray with Atelectasis, Effusion.".
The text encoder is frozen, so its hidden states are cached per prompt: a batch costs one UNet pass.

Saved folders (`save`) are diffusers-style, safetensors everywhere, plus `diffmine.json`:

* full fine-tune: unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json -- the folder is also
  a plain `StableDiffusionPipeline.from_pretrained` folder.
* LoRA: unet_lora/pytorch_lora_weights.safetensors (only the adapter, peft key names with the
  "unet." prefix and the LoraConfig in the safetensors metadata, i.e. what
  `StableDiffusionPipeline.save_lora_weights` writes, loadable with `pipe.load_lora_weights`), plus vae/
  text_encoder/ tokenizer/ scheduler/. The base UNet is NOT copied by default: diffmine.json's
  "base_model" names it (the path or hub id the model was created from). `save(folder,
  include_base_unet=True)` also writes the base UNet to unet/ (self-contained; `load` then prefers it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.denoiser import ConditionalDenoiser

BACKEND_NAME = "stable-diffusion"
CONFIG_NAME = "diffmine.json"
FORMAT_VERSION = 1
LORA_FOLDER = "unet_lora"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: the attention projections LoRA adapts (the diffusers text-to-image LoRA recipe)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: SD 1.x / 2.x training schedule, used when a folder has no scheduler/ config
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, prediction_type="epsilon")
#: the paper's base model (hub id; any local SD 1.x/2.x folder works the same way)
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptStyle:
    """How labels become prompts, plus the reference code's choices that go with it."""

    template: str
    null_prompt: str
    join: str = ", "
    #: text encoder the reference code used with this template (a hub id; informative only)
    text_encoder: str | None = None
    #: probability of the null prompt during fine-tuning in the reference code
    label_dropout: float = 0.05

    def kwargs(self) -> dict:
        """Keyword arguments for `StableDiffusionDenoiser.from_pretrained`."""
        return dict(prompt_template=self.template, null_prompt=self.null_prompt, label_join=self.join)


class PromptTemplates:
    """The paper's prompts, as its reference code builds them.

    Decade templates append the "s" themselves: label the decades "1950", not "1950s". Places labels
    are scene names with spaces ("art school"); X-ray labels are disease names ("Cardiomegaly"; the
    reference lower-cases "No Finding" to "no finding").
    """

    DEFAULT = PromptStyle("A photo of {label}.", "A photo.")
    CARS = PromptStyle("A car from the {label}s.", "A car.", text_encoder="openai/clip-vit-large-patch14-336")
    FACES = PromptStyle("A face portrait of the {label}s.", "A face portrait",
                        text_encoder="openai/clip-vit-large-patch14-336", label_dropout=0.1)
    STREET_VIEW = PromptStyle("A google street view image in {label}", "A google street view image",
                              text_encoder="geolocal/StreetCLIP")
    PLACES = PromptStyle("Image of {label}.", "", text_encoder="openai/clip-vit-large-patch14-336")
    CHEST_XRAY = PromptStyle("Chest X-Ray with {label}.", "Chest X-Ray.", join=", ",
                             text_encoder="openai/clip-vit-large-patch14-336")

    @classmethod
    def all(cls) -> dict[str, PromptStyle]:
        return {k.lower(): v for k, v in vars(cls).items() if isinstance(v, PromptStyle)}


def build_prompt(labels: list[str], active: Iterable[int], template: str, null_prompt: str,
                 join: str = ", ") -> str:
    """The prompt for one condition: active label indices -> text (none active -> null prompt)."""
    active = sorted(set(int(i) for i in active))
    if not active:
        return null_prompt
    for i in active:
        if not 0 <= i < len(labels):
            raise IndexError(f"label index {i} out of range for {len(labels)} labels")
    return template.replace("{label}", join.join(labels[i] for i in active))


# --------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------
def _is_local(path: str | os.PathLike) -> bool:
    return Path(path).expanduser().exists()


def _check_source(path: str | os.PathLike, required: Iterable[str]) -> tuple[str, bool]:
    """Return (path-or-hub-id, is_local); explicit errors for missing folders/subfolders."""
    text = str(path)
    if _is_local(text):
        root = Path(text).expanduser()
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder (expected a diffusers Stable Diffusion folder)")
        missing = [name for name in required if not (root / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{root} is not a complete Stable Diffusion folder: missing subfolder(s) {', '.join(missing)} "
                f"(expected {', '.join(required)})")
        return str(root.resolve()), True
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text, False
    raise FileNotFoundError(f"no such folder: {text} (and it is not a Hugging Face hub id 'owner/name')")


def _validate_prompting(labels, prompt_template: str, null_prompt: str, label_join: str) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be a list of strings, got {type(labels).__name__}")
    labels = list(labels)
    if not labels:
        raise ValueError("labels must not be empty")
    for name in labels:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"label names must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in labels if labels.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate label names: {duplicates}")
    if not isinstance(prompt_template, str) or "{label}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{label}}', got {prompt_template!r}")
    if not isinstance(null_prompt, str):
        raise TypeError(f"null_prompt must be a string, got {type(null_prompt).__name__}")
    if "{label}" in null_prompt:
        raise ValueError(f"null_prompt must not contain '{{label}}', got {null_prompt!r}")
    if not isinstance(label_join, str):
        raise TypeError("label_join must be a string")
    return labels


def _load_text_stack(source: str | os.PathLike, dtype: torch.dtype, from_sd_folder: bool):
    """CLIP text encoder + tokenizer, from an SD folder (subfolders) or a plain model folder/hub id."""
    from transformers import CLIPTextModel, CLIPTokenizer

    text = str(source)
    if from_sd_folder:
        te_kwargs, tok_kwargs = dict(subfolder="text_encoder"), dict(subfolder="tokenizer")
    elif _is_local(text) and (Path(text).expanduser() / "text_encoder").is_dir():
        root, _ = _check_source(text, ("text_encoder", "tokenizer"))
        text, te_kwargs, tok_kwargs = root, dict(subfolder="text_encoder"), dict(subfolder="tokenizer")
    else:
        text, _ = _check_source(text, ())
        te_kwargs, tok_kwargs = {}, {}
    text_encoder, info = CLIPTextModel.from_pretrained(text, dtype=dtype, output_loading_info=True, **te_kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"text encoder at {text} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    tokenizer = CLIPTokenizer.from_pretrained(text, **tok_kwargs)
    return text_encoder, tokenizer


def _load_schedule(source: str, is_local: bool):
    from diffusers import DDPMScheduler

    if is_local and not (Path(source) / "scheduler").is_dir():
        return DDPMScheduler(**SD_SCHEDULE)
    config = DDPMScheduler.load_config(source, subfolder="scheduler")
    keep = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                   "trained_betas", "prediction_type", "timestep_spacing", "steps_offset",
                                   "rescale_betas_zero_snr") if k in config}
    # DDPM-only knobs that SD's (PNDM/DDIM) configs lack would otherwise take DDPM defaults.
    keep.setdefault("prediction_type", "epsilon")
    keep["clip_sample"] = bool(config.get("clip_sample", False))
    return DDPMScheduler(**keep)


def _lora_config(rank: int, alpha: float | None, targets: Iterable[str]):
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora_rank must be a positive integer or None, got {rank!r}")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                      target_modules=list(targets))


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------
class StableDiffusionDenoiser(ConditionalDenoiser):
    """eps_theta(z_t, t, prompt(c)) with a diffusers SD UNet; see the module docstring."""

    backend = BACKEND_NAME

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler, labels: list[str],
                 prompt_template: str = PromptTemplates.DEFAULT.template,
                 null_prompt: str = PromptTemplates.DEFAULT.null_prompt, label_join: str = ", ",
                 lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_target_modules: Iterable[str] = DEFAULT_LORA_TARGETS,
                 base_model: str | None = None, text_encoder_source: str | None = None):
        super().__init__()
        self.labels = _validate_prompting(labels, prompt_template, null_prompt, label_join)
        self.prompt_template = prompt_template
        self.null_prompt = null_prompt
        self.label_join = label_join

        width = getattr(text_encoder.config, "hidden_size", None)
        cross = unet.config.cross_attention_dim
        if isinstance(cross, (list, tuple)):
            cross = cross[0]
        if width != cross:
            raise ValueError(f"text encoder width {width} does not match the UNet's cross_attention_dim {cross}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"UNet in_channels {unet.config.in_channels} != VAE latent_channels "
                             f"{vae.config.latent_channels}")

        self._unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().clone().float(), persistent=False)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.max_prompt_tokens = min(int(tokenizer.model_max_length),
                                     int(text_encoder.config.max_position_embeddings))
        self.base_model = base_model
        self.text_encoder_source = text_encoder_source

        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.eval()

        self.lora_rank = lora_rank
        self.lora_alpha = None
        self.lora_target_modules = list(lora_target_modules)
        if lora_rank is None:
            self._unet.requires_grad_(True)
        else:
            config = _lora_config(lora_rank, lora_alpha, self.lora_target_modules)
            self.lora_alpha = config.lora_alpha
            self._unet.requires_grad_(False)
            self._unet.add_adapter(config)
            for name, param in self._unet.named_parameters():
                if "lora_" in name:
                    # trainable weights stay float32 under a half-precision base (diffusers' recipe)
                    param.data = param.data.float()
                param.requires_grad_("lora_" in name)

        self._text_cache: dict[str, torch.Tensor] = {}
        self._cache_hits = 0
        self._cache_misses = 0

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, labels: list[str],
                        prompt_template: str = PromptTemplates.DEFAULT.template,
                        null_prompt: str = PromptTemplates.DEFAULT.null_prompt,
                        lora_rank: int | None = None, text_encoder_path: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                        label_join: str = ", ", lora_alpha: float | None = None,
                        lora_target_modules: Iterable[str] = DEFAULT_LORA_TARGETS,
                        frozen_dtype: torch.dtype | None = None, variant: str | None = None,
                        ) -> StableDiffusionDenoiser:
        """A denoiser from a diffusers SD 1.x/2.x folder (or hub id where the hub is reachable).

        `labels`: label names in condition-index order. `lora_rank`: None = full UNet fine-tune, else
        peft LoRA of that rank (alpha `lora_alpha`, default = rank) on `lora_target_modules`.
        `text_encoder_path`: a separate CLIP text model (a folder with config.json + weights + tokenizer
        files, an SD-style folder with text_encoder/ and tokenizer/, or a hub id) replacing the SD one.
        `dtype` is the UNet's; `frozen_dtype` (default: `dtype`) the VAE's and text encoder's, e.g. a
        float32 UNet with float16 frozen parts as in the reference's mixed-precision training.
        `variant`: diffusers weight variant ("fp16") of the unet/ and vae/ files.
        Returned in eval mode; `train()` switches only the UNet to training mode.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel

        labels = _validate_prompting(labels, prompt_template, null_prompt, label_join)
        if lora_rank is not None:
            _lora_config(lora_rank, lora_alpha, lora_target_modules)  # validate before the heavy loading
        required = ("unet", "vae") if text_encoder_path is not None else ("unet", "vae", "text_encoder", "tokenizer")
        source, is_local = _check_source(path_or_hub_id, required)
        frozen_dtype = frozen_dtype or dtype
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, variant=variant)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=frozen_dtype, variant=variant)
        if text_encoder_path is None:
            text_encoder, tokenizer = _load_text_stack(source, frozen_dtype, from_sd_folder=True)
            te_source = None
        else:
            text_encoder, tokenizer = _load_text_stack(text_encoder_path, frozen_dtype, from_sd_folder=False)
            te_source = str(Path(text_encoder_path).expanduser().resolve()) if _is_local(text_encoder_path) \
                else str(text_encoder_path)
        scheduler = _load_schedule(source, is_local)
        model = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    labels=labels, prompt_template=prompt_template, null_prompt=null_prompt,
                    label_join=label_join, lora_rank=lora_rank, lora_alpha=lora_alpha,
                    lora_target_modules=lora_target_modules, base_model=source, text_encoder_source=te_source)
        return model.to(device).eval()

    # --- conditions -> prompts -> text embeddings ---------------------------------------------
    def _check_conditions(self, conditions: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        if not isinstance(conditions, torch.Tensor):
            raise TypeError(f"conditions must be a tensor [B, {self.num_labels}], got {type(conditions).__name__}")
        if conditions.ndim != 2 or conditions.shape[1] != self.num_labels:
            raise ValueError(f"conditions must have shape [B, {self.num_labels}] (one column per label), "
                             f"got {tuple(conditions.shape)}")
        if batch is not None and conditions.shape[0] != batch:
            raise ValueError(f"{conditions.shape[0]} conditions for a batch of {batch}")
        return conditions

    def prompts(self, conditions: torch.Tensor) -> list[str]:
        """The prompt of each condition row (multi-hot; all zeros = the null prompt)."""
        rows = self._check_conditions(conditions).detach().float().cpu()
        if not torch.all((rows == 0) | (rows == 1)):
            raise ValueError("conditions must be multi-hot (only 0 and 1); weighted labels have no prompt")
        return [self.prompt_for(row.nonzero().flatten().tolist()) for row in rows]

    def prompt_for(self, label_indices: Iterable[int] | int) -> str:
        """The prompt for a set of active label indices (an int for one label; empty = null)."""
        if isinstance(label_indices, int):
            label_indices = [label_indices]
        return build_prompt(self.labels, label_indices, self.prompt_template, self.null_prompt, self.label_join)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_prompt_tokens,
                                truncation=False, return_tensors="pt").input_ids
        if tokens.shape[1] > self.max_prompt_tokens:
            lengths = [len(self.tokenizer(p).input_ids) for p in prompts]
            worst = max(range(len(prompts)), key=lengths.__getitem__)
            raise ValueError(f"prompt {prompts[worst]!r} has {lengths[worst]} tokens, more than the text "
                             f"encoder's {self.max_prompt_tokens}; shorten the template or label names")
        return tokens

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, tokens, width] for prompts, cached per unique prompt."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        self._cache_hits += len(prompts) - sum(p in missing for p in prompts)
        if missing:
            self._cache_misses += len(missing)
            device = next(self.text_encoder.parameters()).device
            hidden = self.text_encoder(self._tokenize(missing).to(device))[0]
            for prompt, h in zip(missing, hidden):
                self._text_cache[prompt] = h
        return torch.stack([self._text_cache[p] for p in prompts])

    def text_embeddings(self, conditions: torch.Tensor) -> torch.Tensor:
        """Encoder hidden states for condition rows, on the UNet's device and dtype."""
        unet_param = next(self._unet.parameters())
        return self.encode_prompts(self.prompts(conditions)).to(device=unet_param.device, dtype=unet_param.dtype)

    def text_cache_info(self) -> dict[str, int]:
        """size: cached prompts; hits: prompts served from the cache; misses: prompts encoded."""
        return dict(size=len(self._text_cache), hits=self._cache_hits, misses=self._cache_misses)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def _apply(self, fn, *args, **kwargs):  # .to()/.half()/.cuda(): cached embeddings would be stale
        if getattr(self, "_text_cache", None):
            self._text_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # --- the model ----------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        return self._unet

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    @property
    def side_multiple(self) -> int:
        """Image sides must be multiples of this many pixels: the VAE's factor times the UNet's
        (64 for SD 1.x/2.x; registry.SIDE_MULTIPLES, which whole views round to)."""
        return self.vae_scale_factor * self.spatial_multiple

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/8, W/8] (scaled).

        The posterior mean by default (deterministic scoring); a posterior sample when a `generator` is
        given or `sample=True` (fine-tuning, as the reference does).
        """
        if images.ndim != 4 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"images must be [B, {self.vae.config.in_channels}, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(f"image size {h}x{w} is not a multiple of the VAE factor {self.vae_scale_factor}")
        vae_param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
        sample = generator is not None if sample is None else sample
        z = posterior.sample(generator=generator) if sample else posterior.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).to(images.dtype if images.is_floating_point()
                                                                  else torch.float32)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (clamped)."""
        vae_param = next(self.vae.parameters())
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = z.to(device=vae_param.device, dtype=vae_param.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.clamp(-1, 1).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) with this model's schedule."""
        ab = self._alpha_bar(timesteps, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def _alpha_bar(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=self.alphas_cumprod.device).long().reshape(-1)
        ab = self.alphas_cumprod[t].to(device=like.device, dtype=torch.float32)
        if ab.numel() == 1:
            ab = ab.expand(like.shape[0])
        return ab.reshape(-1, *([1] * (like.ndim - 1)))

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor | int,
                      conditions: torch.Tensor) -> torch.Tensor:
        """eps prediction [B, 4, h, w] in `noisy`'s dtype; v-/x0-prediction models are converted to eps."""
        batch = noisy.shape[0]
        self._check_conditions(conditions, batch)
        unet_param = next(self._unet.parameters())
        t = torch.as_tensor(timesteps, device=unet_param.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
        hidden = self.text_embeddings(conditions)
        x = noisy.to(device=unet_param.device, dtype=unet_param.dtype)
        out = self._unet(x, t, encoder_hidden_states=hidden, return_dict=False)[0].to(noisy.dtype)
        if self.prediction_type == "epsilon":
            return out
        ab = self._alpha_bar(t, noisy).to(noisy.dtype)
        if self.prediction_type == "v_prediction":
            return ab.sqrt() * out + (1 - ab).sqrt() * noisy
        return (noisy - ab.sqrt() * out) / (1 - ab).sqrt()  # "sample": x0-prediction

    # --- training -----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """All UNet parameters (full fine-tune) or only the LoRA adapter's."""
        if self.lora_rank is None:
            return list(self._unet.parameters())
        return [p for name, p in self._unet.named_parameters() if "lora_" in name]

    def enable_gradient_checkpointing(self) -> None:
        self._unet.enable_gradient_checkpointing()

    # --- persistence --------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "backend": BACKEND_NAME,
            "format_version": FORMAT_VERSION,
            "labels": list(self.labels),
            "prompt_template": self.prompt_template,
            "null_prompt": self.null_prompt,
            "label_join": self.label_join,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_target_modules": self.lora_target_modules if self.lora_rank is not None else None,
            "base_model": self.base_model,
            "text_encoder_source": self.text_encoder_source,
            "prediction_type": self.prediction_type,
            "num_train_timesteps": self.num_train_timesteps,
        }

    def _base_unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's weights without the LoRA adapter (peft wraps layers as `.base_layer`)."""
        return {k.replace(".base_layer", ""): v.detach().contiguous() for k, v in self._unet.state_dict().items()
                if "lora_" not in k}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights in peft naming (no "unet." prefix)."""
        from peft.utils import get_peft_model_state_dict

        if self.lora_rank is None:
            raise ValueError("this model has no LoRA adapter (full fine-tune)")
        return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self._unet).items()}

    def save(self, folder: str | Path, include_base_unet: bool = False) -> None:
        """Write a diffusers-style folder (see the module docstring for the LoRA layout)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.lora_rank is None:
            self._unet.save_pretrained(folder / "unet", safe_serialization=True)
            if (folder / LORA_FOLDER).is_dir():
                shutil.rmtree(folder / LORA_FOLDER)  # a stale adapter from an earlier save would mislead load
        else:
            lora_dir = folder / LORA_FOLDER
            lora_dir.mkdir(exist_ok=True)
            adapter_config = self._unet.peft_config["default"].to_dict()
            adapter_config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter_config.items()}
            weights = {f"unet.{k}": v.cpu() for k, v in self.lora_state_dict().items()}
            save_file(weights, str(lora_dir / LORA_WEIGHT_NAME), metadata={
                "format": "pt", "lora_adapter_metadata": json.dumps({"unet." + k: v for k, v in
                                                                     adapter_config.items()}, sort_keys=True)})
            if include_base_unet:
                unet_dir = folder / "unet"
                unet_dir.mkdir(exist_ok=True)
                self._unet.save_config(unet_dir)
                save_file({k: v.cpu() for k, v in self._base_unet_state_dict().items()},
                          str(unet_dir / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
            elif (folder / "unet").is_dir():
                shutil.rmtree(folder / "unet")  # a stale full UNet would be taken for the base
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        if (folder / "unet").is_dir() and self.lora_rank is None:
            self._write_model_index(folder)
        elif (folder / "model_index.json").exists():
            (folder / "model_index.json").unlink()
        (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))

    def _write_model_index(self, folder: Path) -> None:
        import diffusers

        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
                 "feature_extractor": [None, None], "image_encoder": [None, None],
                 "requires_safety_checker": False, "safety_checker": [None, None],
                 "scheduler": ["diffusers", type(self.scheduler).__name__],
                 "text_encoder": ["transformers", type(self.text_encoder).__name__],
                 "tokenizer": ["transformers", type(self.tokenizer).__name__],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))

    @classmethod
    def read_config(cls, folder: str | Path) -> dict:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a diffmine model folder")
        config = json.loads(path.read_text())
        if config.get("backend") != BACKEND_NAME:
            raise ValueError(f"{path} is for backend {config.get('backend')!r}, not {BACKEND_NAME!r}")
        if int(config.get("format_version", 1)) > FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {config['format_version']}, newer than this code's "
                             f"{FORMAT_VERSION}")
        for key in ("labels", "prompt_template", "null_prompt"):
            if key not in config:
                raise ValueError(f"{path} lacks {key!r}")
        return config

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             frozen_dtype: torch.dtype | None = None, base_model: str | os.PathLike | None = None,
             ) -> StableDiffusionDenoiser:
        """Load what `save` wrote, in eval mode. For a LoRA folder the base UNet comes from
        `base_model` if given, else from the folder's unet/ if saved with include_base_unet, else from
        diffmine.json's "base_model" (an explicit error when none is available)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from safetensors import safe_open

        folder = Path(folder).expanduser()
        config = cls.read_config(folder)
        lora_rank = config.get("lora_rank")
        frozen_dtype = frozen_dtype or dtype
        _check_source(folder, ("vae", "text_encoder", "tokenizer"))
        if lora_rank is None:
            _check_source(folder, ("unet",))
            unet_source = str(folder)
        else:
            _check_source(folder, (LORA_FOLDER,))
            if not (folder / LORA_FOLDER / LORA_WEIGHT_NAME).is_file():
                raise FileNotFoundError(f"{folder / LORA_FOLDER / LORA_WEIGHT_NAME} not found")
            if base_model is not None:
                unet_source, _ = _check_source(base_model, ("unet",))
            elif (folder / "unet").is_dir():
                unet_source = str(folder)
            elif config.get("base_model"):
                try:
                    unet_source, _ = _check_source(config["base_model"], ("unet",))
                except FileNotFoundError as err:
                    raise FileNotFoundError(
                        f"{folder} holds only a LoRA adapter; its base model {config['base_model']!r} is not "
                        f"available ({err}). Pass base_model=... or save with include_base_unet=True.") from err
            else:
                raise FileNotFoundError(f"{folder} holds only a LoRA adapter and names no base model")
        unet = UNet2DConditionModel.from_pretrained(unet_source, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=frozen_dtype)
        text_encoder, tokenizer = _load_text_stack(folder, frozen_dtype, from_sd_folder=True)
        scheduler = _load_schedule(str(folder), True)
        model = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    labels=config["labels"], prompt_template=config["prompt_template"],
                    null_prompt=config["null_prompt"], label_join=config.get("label_join", ", "),
                    lora_rank=lora_rank, lora_alpha=config.get("lora_alpha"),
                    lora_target_modules=config.get("lora_target_modules") or DEFAULT_LORA_TARGETS,
                    # LoRA: the UNet actually used as base, so a re-save references something loadable
                    base_model=unet_source if lora_rank is not None else config.get("base_model"),
                    text_encoder_source=config.get("text_encoder_source"))
        if lora_rank is not None:
            from peft.utils import set_peft_model_state_dict

            with safe_open(str(folder / LORA_FOLDER / LORA_WEIGHT_NAME), framework="pt") as f:
                weights = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}
            expected = set(model.lora_state_dict())
            if set(weights) != expected:
                extra, lacking = sorted(set(weights) - expected), sorted(expected - set(weights))
                raise ValueError(f"LoRA weights in {folder / LORA_FOLDER} do not fit the adapter: "
                                 f"unexpected {extra[:3]}, missing {lacking[:3]}")
            result = set_peft_model_state_dict(model.unet, weights)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"LoRA weights not loaded: {unexpected[:3]}")
            for name, param in model.unet.named_parameters():
                param.requires_grad_("lora_" in name)
        return model.to(device).eval()
