"""Tiny real models and synthetic data shared by the engine tests."""
from __future__ import annotations

import pytest
import torch

from worker.engine.registry import create_pixel_denoiser
from worker.engine.training import train

# One intra-op thread: these tests run many small forward passes, which gain nothing from a
# second thread, and on shared CI cores OpenMP threads spinning against other jobs can make a
# forward pass 10x slower.
torch.set_num_threads(1)

LABELS = ["marked", "plain"]


@pytest.fixture(scope="session")
def tiny_denoiser():
    """An untrained tiny pixel model: enough to test plumbing and numerics."""
    return create_pixel_denoiser(LABELS, resolution=32, seed=0, size="tiny").eval()


@pytest.fixture(scope="session")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def blobs(count: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Dim, smooth random colour fields: a background with no planted structure."""
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    fields = torch.nn.functional.interpolate(coarse, size=resolution, mode="bicubic", align_corners=False)
    return (fields * 1.2 - 1.0).clamp(-1, 0.3)


def planted_dataset(count: int, resolution: int = 32, mark: int = 8, seed: int = 0,
                    random_place: bool = False):
    """Half the images (label 0, "marked") carry a bright square, at one fixed place (learnt in
    a few dozen steps) or, with `random_place`, anywhere (needs far longer training).

    Returns images [N, 3, R, R], conditions [N, 2] one-hot, and the mark's boolean mask [N, R, R]
    (all False for plain images).
    """
    g = torch.Generator().manual_seed(seed)
    images = blobs(count, resolution, g)
    labels = torch.arange(count) % 2
    masks = torch.zeros(count, resolution, resolution, dtype=torch.bool)
    for i in range(count):
        if labels[i] == 0:
            top, left = (torch.randint(0, resolution - mark + 1, (2,), generator=g).tolist()
                         if random_place else (resolution // 4, resolution // 2))
            masks[i, top:top + mark, left:left + mark] = True
    images = torch.where(masks[:, None], torch.ones_like(images), images)
    return images, torch.nn.functional.one_hot(labels, 2).float(), masks


@pytest.fixture(scope="session")
def planted_model():
    """A tiny model trained for seconds on `planted_dataset`: label 0's mark is what it learns."""
    images, conditions, _ = planted_dataset(256, seed=0)
    model = create_pixel_denoiser(LABELS, resolution=32, seed=0, size="tiny")
    # lr 1e-3 instead of the fine-tuning recipe's 1e-4: this model starts from scratch and has
    # seconds, not hours.
    result = train(model, torch.utils.data.TensorDataset(images, conditions), steps=80, batch_size=16,
                   seed=0, lr=1e-3)
    assert result.final_loss < result.losses[0]
    return model
