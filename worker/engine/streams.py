"""Independent random streams derived from one seed, one per purpose.

Every random number the engine draws comes from a generator named here by its purpose (and,
where one purpose needs many streams, further integer keys). The seed of each is NumPy's
`SeedSequence` hash of (seed, purpose id, keys...), so streams of different purposes, or of
different keys of one purpose, share no values however the seeds relate: the typicality draws
of seed s no longer coincide with the VAE posterior sample of seed s, and two typicality presets
at the same seed draw different noise (`sampling_key`).

The holdout split is drawn by the ingest (app/ingest/service.py, Python's `random.Random` over
the images' sorted hashes), which cannot import the engine; it consumes no torch stream.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

#: purpose -> id. Training's ids (0-6) are the ones `training.py` always used, so trained
#: weights are unchanged; scoring's streams are new.
PURPOSES = {
    "training-order": 0, "training-crops": 1, "training-timesteps": 2, "training-noise": 3,
    "training-dropout": 4, "training-encode": 5, "training-global": 6,
    "typicality-draws": 7,  # timesteps and eps, keyed by the preset's sampling_key
    "vae-posterior": 8,  # the latent of an image for scoring and DIFT features (one per image and seed)
    "dift-noise": 9,
}


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A well-mixed 63-bit seed for one purpose (and keys) of `seed`."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream {purpose!r}; choose from {sorted(PURPOSES)}")
    if seed < 0:
        raise ValueError(f"seeds are non-negative integers, got {seed}")
    entropy = [int(seed), PURPOSES[purpose], *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


def generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU generator for one purpose (and keys) of `seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *keys))


def text_key(text: str) -> tuple[int, ...]:
    """Integer keys for a stream named by text (e.g. a preset's sampling identity)."""
    digest = hashlib.sha256(text.encode()).digest()
    return tuple(int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4))
