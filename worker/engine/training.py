"""Fine-tune any `ConditionalDenoiser` with the reference recipe, resumable bit for bit.

The recipe (docs/method.md section 1): AdamW with a constant learning rate, betas (0.9, 0.999),
weight decay 1e-2, gradient-norm clip 1.0; timesteps uniform in [0, 1000); epsilon-MSE in the
denoising space (`denoiser.encode`); noise added with the denoiser's DDPM scheduler; label
dropout: each sample's condition is replaced by the null condition with probability
`null_dropout`, so one model learns p(x | c) and p(x).

Reproducibility by construction: every random choice of step `s` (which images, their crops,
timesteps, noise, dropout, and the global RNG that stochastic layers read) is drawn from
generators seeded by (seed, s) alone. A checkpoint therefore only needs the weights, the
optimizer state and `s`; resuming replays exactly the steps an uninterrupted run would have
taken. (Checkpoints also carry the global RNG states, so the caller's RNG continues as it would
have.) `batch_size` is the global batch; under `accelerate launch` each process takes an equal
slice of it, so the sequence of global batches does not depend on the number of processes:
images, crops, timesteps, noise, dropout and encoder samples are drawn per global position, and
DDP's mean of per-process mean losses is the global mean. The weights after N steps are then the
same (to float rounding) on 1 or 8 processes; only layers drawing from the global RNG (dropout
inside the network, off in the shipped models) draw per process.

Only parameters with `requires_grad` are trained and checkpointed; a backend freezes whatever
it keeps fixed (a VAE, a text encoder) or swaps in LoRA layers before calling `train`.
"""
from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .denoiser import ConditionalDenoiser
from .streams import derive_seed, generator

ProgressCallback = Callable[[int, int, float], None]

# How many recent step losses `final_loss` averages: one step's loss swings with its random t.
FINAL_LOSS_WINDOW = 20


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)  # one per step, resumed steps included
    resumed_from: int | None = None


def batch_indices(seed: int, step: int, batch_size: int, dataset_size: int) -> list[int]:
    """Dataset indices of global batch `step`: epochs of seeded permutations, a pure function."""
    if dataset_size == 0:
        raise ValueError("cannot train on an empty dataset")
    orders: dict[int, torch.Tensor] = {}  # a batch spans at most a few epochs
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, dataset_size)
        if epoch not in orders:
            orders[epoch] = torch.randperm(dataset_size, generator=generator(seed, "training-order", epoch))
        indices.append(int(orders[epoch][offset]))
    return indices


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's slice of every global batch from `start_step` to `steps`."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int, start_step: int, steps: int,
                 rank: int = 0, world_size: int = 1, seeded_keys: bool = False):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must divide evenly over {world_size} processes")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_step, self.steps = start_step, steps
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.seeded_keys = seeded_keys

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            keys = batch_indices(self.seed, step, self.batch_size, self.dataset_size)
            if self.seeded_keys:  # per-sample crop seeds, so augmentation replays too
                keys = [(index, derive_seed(self.seed, "training-crops", step, position))
                        for position, index in enumerate(keys)]
            yield keys[self.local]


class EpsilonLoss(torch.nn.Module):
    """The training objective as a module, so DistributedDataParallel sees the forward pass."""

    def __init__(self, denoiser: ConditionalDenoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, noisy, timesteps, conditions, noise):
        prediction = self.denoiser.predict_noise(noisy, timesteps, conditions)
        return F.mse_loss(prediction.float(), noise.float())


def trainable_parameters(denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the denoiser has no parameter with requires_grad=True: nothing to train")
    return params


def train(denoiser: ConditionalDenoiser, dataset: torch.utils.data.Dataset, *, steps: int,
          batch_size: int, seed: int, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 1e-2, grad_clip: float = 1.0, null_dropout: float = 0.1,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 500,
          keep_checkpoints: int = 2, resume: bool = True, num_workers: int = 0,
          mixed_precision: str = "no", progress: ProgressCallback | None = None,
          accelerator=None) -> TrainResult:
    """Train `denoiser` in place for `steps` global steps of `batch_size` samples.

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps and at the end,
    and (if `resume`) training continues from the newest one found there. Returns the loss per
    step; `final_loss` is the mean of the last `FINAL_LOSS_WINDOW` steps. The denoiser is left
    in eval mode.
    """
    if not 0.0 <= null_dropout <= 1.0:
        raise ValueError(f"null_dropout must be in [0, 1], got {null_dropout}")
    accelerator = accelerator or make_accelerator(mixed_precision)
    recipe = dict(seed=seed, batch_size=batch_size, lr=lr, betas=list(betas), weight_decay=weight_decay,
                  grad_clip=grad_clip, null_dropout=null_dropout, dataset_size=len(dataset))
    scheduler = denoiser.scheduler
    params = trainable_parameters(denoiser)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    loss_module, optimizer = accelerator.prepare(EpsilonLoss(denoiser), optimizer)

    start_step, losses = 0, []
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None and resume else None
    if latest is not None:
        start_step, losses = load_checkpoint(latest, denoiser, optimizer, accelerator, recipe)
        if start_step > steps:
            raise ValueError(f"{latest} is at step {start_step}, past the {steps} steps asked for")

    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, steps,
                               accelerator.process_index, accelerator.num_processes,
                               seeded_keys=getattr(dataset, "accepts_seeded_keys", False))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
    local = sampler.local
    device = accelerator.device
    denoiser.train()
    for step, (images, conditions) in enumerate(loader, start=start_step):
        images, conditions = images.to(device), conditions.to(device).float()
        latents = encode_slice(denoiser, images, seed, step, range(batch_size)[local])
        # Draw for the whole global batch, then keep this process's slice.
        global_shape = (batch_size, *latents.shape[1:])
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator(seed, "training-timesteps", step))[local].to(device)
        noise = torch.randn(global_shape, generator=generator(seed, "training-noise", step))[local].to(device)
        drop = torch.rand(batch_size, generator=generator(seed, "training-dropout", step))[local] < null_dropout
        conditions = torch.where(drop.to(device)[:, None], torch.zeros_like(conditions), conditions)
        noisy = scheduler.add_noise(latents, noise.to(latents.dtype), timesteps)

        with _seeded_global_rng(derive_seed(seed, "training-global", step, accelerator.process_index), device):
            loss = loss_module(noisy, timesteps, conditions, noise)
            accelerator.backward(loss)
        if grad_clip:
            accelerator.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
        done = step + 1
        if progress is not None and accelerator.is_main_process:
            progress(done, steps, losses[-1])
        if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(checkpoint_dir / f"step-{done:08d}", denoiser, optimizer, accelerator,
                            recipe, done, losses)
            prune_checkpoints(checkpoint_dir, keep_checkpoints, accelerator)

    denoiser.eval()
    window = losses[-FINAL_LOSS_WINDOW:]
    return TrainResult(steps=len(losses), final_loss=float(np.mean(window)) if window else float("nan"),
                       losses=losses, resumed_from=start_step if latest is not None else None)


@torch.no_grad()
def encode_slice(denoiser: ConditionalDenoiser, images: torch.Tensor, seed: int, step: int,
                 positions: range) -> torch.Tensor:
    """Encode this process's images, each with its own generator keyed by its position in the
    global batch: a sampling encoder (SD's VAE posterior) then draws the same latents whatever
    the number of processes (one generator per process would not)."""
    return torch.cat([denoiser.encode(images[i:i + 1],
                                      generator=generator(seed, "training-encode", step, position))
                      for i, position in enumerate(positions)])


def make_accelerator(mixed_precision: str = "no", **kwargs):
    """An `accelerate.Accelerator`, even when an earlier one in this process used another precision.

    accelerate keeps one process-wide state and refuses a second Accelerator with a different
    `mixed_precision`; a worker that trains several models in a row needs exactly that. The
    per-run part of the state is reset, never the distributed setup (`PartialState`).
    """
    from accelerate import Accelerator  # imported here: scoring-only users need not have it
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
    except ValueError as error:
        if "already been initialized" not in str(error):
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision, **kwargs)


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """Seed torch's global RNG (CPU and the device) for one step, restoring it afterwards.

    Dropout or any other layer that draws from the global RNG then depends on (seed, step) only.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --- checkpoints ---------------------------------------------------------------------------------
def completed_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint folders in step order, without a `.tmp` folder a kill left mid-write (its
    state.json may be there, even half written, before the rename that completes it)."""
    if not checkpoint_dir.exists():
        return []
    return sorted(state.parent for state in checkpoint_dir.glob("step-*/state.json")
                  if not state.parent.name.endswith(".tmp"))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = completed_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def save_checkpoint(folder: Path, denoiser, optimizer, accelerator, recipe: dict, step: int,
                    losses: list[float]) -> None:
    """Weights of trainable parameters, optimizer, step, recipe, losses and global RNG states.

    Written to a temporary folder and renamed, so a kill mid-write never leaves a checkpoint
    that looks complete (`state.json` is what marks one).
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {name: p.detach().contiguous().cpu()
                     for name, p in denoiser.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"python": random.getstate(), "numpy": np.random.get_state(),
               "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save(rng, tmp / "rng.pt")
        if accelerator.scaler is not None:  # fp16 loss scaling
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "recipe": recipe, "losses": losses}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, denoiser, optimizer, accelerator, recipe: dict) -> tuple[int, list[float]]:
    state = json.loads((folder / "state.json").read_text())
    if state["recipe"] != recipe:
        raise ValueError(f"checkpoint {folder} was made with {state['recipe']}, not {recipe}; "
                         "resume with the same settings or use another checkpoint_dir")
    weights = load_file(folder / "trainable.safetensors")
    trainable = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
    if weights.keys() != trainable.keys():
        raise ValueError(f"checkpoint {folder} does not match this denoiser's trainable parameters")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=accelerator.device,
                                         weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if accelerator.scaler is not None and (folder / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    return state["step"], list(state["losses"])


def prune_checkpoints(checkpoint_dir: Path, keep: int, accelerator) -> None:
    if accelerator.is_main_process and keep > 0:
        for old in completed_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old)
