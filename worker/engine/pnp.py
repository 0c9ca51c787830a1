"""Plug-and-Play feature injection (Tumanyan et al. 2023), as the paper's translation code uses it.

While the target branches of a batch are denoised, the *source* branch (row 0 of every UNet
batch: the inverted source latent at the current timestep, under the source condition) hands
them its structure:

* ResNet features: the residual branch of `up_blocks[1].resnets[1]` (its `conv2` output, before
  the skip connection is added) is copied from the source row into every other row, for the
  first 80% of the sampling steps;
* self-attention: the queries and keys of the up-blocks' self-attention layers (pnp-diffusers'
  `res_dict = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}`: block -> attention indices) are copied
  from the source row, for the first 50% of the steps. Values stay the target's own, so the
  target keeps its appearance but attends like the source.

Both are forward hooks on the diffusers UNet's own submodules (`conv2`, `to_q`, `to_k`: their
outputs are replaced), not a copy of any forward method, so they work with any attention
processor and with LoRA-wrapped projections. `PlugAndPlay.injecting()` is a context manager that
removes every hook on exit, error or not; outside it the UNet is untouched.

On the pixel backend's UNet2DModel the attention sits in `up_blocks[0]` only, so the reference
selection injects ResNet features alone there.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

#: pnp-diffusers' self-attention injection sites: up-block index -> attention indices
REFERENCE_ATTENTION = {1: (1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}
#: the ResNet whose features are injected: (up-block index, resnet index)
REFERENCE_RESNET = (1, 1)
#: fractions of the sampling steps with injection (the reference's pnp_f_t and pnp_attn_t)
RESNET_FRACTION = 0.8
ATTENTION_FRACTION = 0.5


def resnet_sites(unet: torch.nn.Module, site: tuple[int, int] = REFERENCE_RESNET) -> list[torch.nn.Module]:
    """The `conv2` of up_blocks[block].resnets[index] (the block's last ResNet if it has fewer)."""
    block, index = site
    blocks = unet.up_blocks
    if block >= len(blocks) or not getattr(blocks[block], "resnets", None):
        return []
    resnets = blocks[block].resnets
    return [resnets[min(index, len(resnets) - 1)].conv2]


def attention_sites(unet: torch.nn.Module,
                    sites: dict[int, tuple[int, ...]] = REFERENCE_ATTENTION) -> list[torch.nn.Module]:
    """`to_q` and `to_k` of every self-attention layer at the given up-block attention indices."""
    from diffusers.models.attention_processor import Attention

    modules = []
    for block, indices in sites.items():
        if block >= len(unet.up_blocks):
            continue
        attentions = getattr(unet.up_blocks[block], "attentions", None) or []
        for index in indices:
            if index >= len(attentions):
                continue
            for module in attentions[index].modules():
                if isinstance(module, Attention) and not module.is_cross_attention:
                    modules += [module.to_q, module.to_k]
    return modules


@dataclass
class PlugAndPlay:
    """Injection from source rows into target rows, switched per sampling step.

    By default row 0 of every batch is the source of all other rows; set `origin` (a [batch]
    index tensor, source rows pointing at themselves) for several sources in one batch.

    Use::

        pnp = PlugAndPlay(denoiser.unet)
        with pnp.injecting():
            for step in range(steps):
                pnp.set_step(step, steps)
                eps = denoiser.predict_noise(batch_with_source_first, t, conditions)
    """

    unet: torch.nn.Module
    resnet_fraction: float = RESNET_FRACTION
    attention_fraction: float = ATTENTION_FRACTION
    resnet_site: tuple[int, int] = REFERENCE_RESNET
    attention_site: dict = field(default_factory=lambda: dict(REFERENCE_ATTENTION))

    def __post_init__(self):
        for name in ("resnet_fraction", "attention_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.resnet_modules = resnet_sites(self.unet, self.resnet_site)
        self.attention_modules = attention_sites(self.unet, self.attention_site)
        self.inject_resnet = self.inject_attention = False
        #: row i of each UNet batch takes its injected features from row origin[i]; None: from row 0
        self.origin: torch.Tensor | None = None
        #: how many module outputs were replaced (for tests and logs)
        self.injections = 0
        self._handles: list = []

    def set_step(self, step: int, total: int) -> None:
        """Enable each kind of injection for the first `fraction` of the `total` steps
        (the reference: timesteps[:int(total * fraction)])."""
        self.inject_resnet = step < int(total * self.resnet_fraction)
        self.inject_attention = step < int(total * self.attention_fraction)

    def off(self) -> None:
        self.inject_resnet = self.inject_attention = False

    @contextmanager
    def injecting(self) -> Iterator[PlugAndPlay]:
        if self._handles:
            raise RuntimeError("PlugAndPlay hooks are already installed")
        try:
            for module in self.resnet_modules:
                self._handles.append(module.register_forward_hook(self._hook("resnet")))
            for module in self.attention_modules:
                self._handles.append(module.register_forward_hook(self._hook("attention")))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.off()
            self.origin = None

    def _hook(self, kind: str):
        def hook(_module, _inputs, output):
            enabled = self.inject_resnet if kind == "resnet" else self.inject_attention
            if not enabled or output.shape[0] < 2:
                return None
            self.injections += 1
            if self.origin is None:
                source = output[:1]
                return torch.cat([source, source.expand(output.shape[0] - 1, *output.shape[1:])])
            if len(self.origin) != output.shape[0]:
                raise RuntimeError(f"PlugAndPlay.origin has {len(self.origin)} rows, the batch {output.shape[0]}")
            return output.index_select(0, self.origin.to(output.device))
        return hook
