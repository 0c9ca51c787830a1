"""The one interface every conditional denoiser backend implements.

A *condition* is a float multi-hot tensor of shape [B, n_labels]: one-hot for a single label,
several ones for multi-label images (e.g. several diseases), all zeros for the null condition
(the unconditional model p(x) learned through label dropout). Using one representation for all
label kinds keeps typicality, training and translation backend-agnostic.

Images enter and leave as float tensors in [-1, 1], shape [B, 3, H, W]. `encode` maps them to
the space the model denoises in (identity for pixel models, the VAE latent for Stable
Diffusion); every loss and typicality map lives in that space.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class ConditionalDenoiser(torch.nn.Module, abc.ABC):
    """eps_theta(x_t, t, c) plus what the method needs around it."""

    #: label names, in condition-index order
    labels: list[str]
    #: number of diffusion training timesteps (1000 for every backend here)
    num_train_timesteps: int = 1000

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    # --- conditions -------------------------------------------------------------------------
    def condition(self, label_indices: list[list[int]] | list[int], device=None) -> torch.Tensor:
        """Multi-hot conditions from label indices (an int per image, or a list per image)."""
        rows = torch.zeros(len(label_indices), self.num_labels, device=device)
        for row, idx in enumerate(label_indices):
            rows[row, idx if isinstance(idx, list) else [idx]] = 1.0
        return rows

    def null_condition(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.num_labels, device=device)

    # --- the model --------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the denoising space."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The denoising space -> images in [-1, 1]."""

    @abc.abstractmethod
    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                      conditions: torch.Tensor) -> torch.Tensor:
        """eps prediction for a batch; `conditions` is [B, n_labels] multi-hot (zeros = null)."""

    @property
    @abc.abstractmethod
    def unet(self) -> torch.nn.Module:
        """The diffusers UNet, for feature hooks (DIFT, Plug-and-Play injection)."""

    @property
    def spatial_multiple(self) -> int:
        """The UNet halves the denoising space this many times over, so its sides must be a
        multiple of 2 ** (levels - 1); scoring pads other sizes up to it (typicality.py)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @abc.abstractmethod
    def save(self, folder: str | Path) -> None:
        """Save as a diffusers-style folder (safetensors weights + json config)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ConditionalDenoiser:
        """Load what `save` wrote."""

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode without autograd for the block; the training flag is restored after."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    # --- intermediate features, through a hook rather than a copy of the forward pass -------
    @contextmanager
    def capture(self, module_name: str = "up_blocks.1") -> Iterator[list[torch.Tensor]]:
        """Collect the output of `module_name` for every forward pass run inside the block."""
        module = self.unet.get_submodule(module_name)
        outputs: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            outputs.append(output[0] if isinstance(output, tuple) else output)

        handle = module.register_forward_hook(hook)
        try:
            yield outputs
        finally:
            handle.remove()

    def block_output(self, module_name: str, noisy: torch.Tensor, timesteps: torch.Tensor,
                     conditions: torch.Tensor) -> torch.Tensor:
        """The output of `module_name` in one forward pass, stopping the pass there: DIFT
        needs `up_blocks.1` only, and the blocks after it (the UNet's widest, at full
        resolution) would cost about a third of the pass for nothing."""
        module = self.unet.get_submodule(module_name)
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _BlockReached

        handle = module.register_forward_hook(hook)
        try:
            self.predict_noise(noisy, timesteps, conditions)
        except _BlockReached:
            return captured[0]
        finally:
            handle.remove()
        raise RuntimeError(f"{module_name} did not run in the forward pass")


class _BlockReached(Exception):
    """Raised by `block_output`'s hook to end a forward pass at the block it wants."""
