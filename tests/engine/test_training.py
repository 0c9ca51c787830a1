"""Training: the data order is a pure function of (seed, step), and a killed run resumes exactly."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import LABELS
from PIL import Image

from worker.engine.data import ImageDataset, multi_hot
from worker.engine.registry import create_pixel_denoiser
from worker.engine.training import batch_indices, train

REPO = Path(__file__).resolve().parents[2]


def write_images(folder: Path, count: int = 12) -> ImageDataset:
    """Small PNGs larger than the model resolution, so random crops matter."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        pixels = (torch.rand(40, 36, 3, generator=g) * 255).byte().numpy()
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return ImageDataset(paths, multi_hot([i % 2 for i in range(count)], 2), 32, train=True)


def test_batch_order_is_a_pure_function_covering_each_epoch():
    assert batch_indices(5, 3, 4, 10) == batch_indices(5, 3, 4, 10)
    epoch = sum((batch_indices(5, step, 5, 10) for step in range(2)), [])
    assert sorted(epoch) == list(range(10))
    assert batch_indices(5, 0, 10, 10) != batch_indices(5, 1, 10, 10)  # a new permutation each epoch


def test_same_seed_same_run_other_seed_other_run():
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    data = torch.utils.data.TensorDataset(x, multi_hot([0, 1] * 4, 2))
    runs = []
    for seed in (0, 0, 1):
        model = create_pixel_denoiser(LABELS, seed=0, size="tiny")
        runs.append(train(model, data, steps=2, batch_size=4, seed=seed).losses)
    assert runs[0] == runs[1] and runs[0] != runs[2]


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from test_training import write_images
    from worker.engine.registry import create_pixel_denoiser
    from worker.engine.training import train
    from pathlib import Path

    def die_at_step_5(step, total, loss):
        if step == 5:  # after the step-4 checkpoint, before the next one
            os.kill(os.getpid(), signal.SIGKILL)

    model = create_pixel_denoiser(["marked", "plain"], seed=0, size="tiny")
    train(model, write_images(Path({images!r})), steps=8, batch_size=4, seed=11,
          checkpoint_dir={checkpoints!r}, checkpoint_every=2, progress=die_at_step_5)
""")


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    (tmp_path / "images").mkdir()
    dataset = write_images(tmp_path / "images")
    checkpoints = tmp_path / "checkpoints"
    script = KILLED_RUN.format(repo=str(REPO), tests=str(Path(__file__).parent),
                               images=str(tmp_path / "images"), checkpoints=str(checkpoints))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    # A kill during a checkpoint's write leaves its .tmp folder, state.json perhaps half written.
    (checkpoints / "step-00000006.tmp").mkdir()
    (checkpoints / "step-00000006.tmp" / "state.json").write_text('{"step": 6, "reci')

    resumed_model = create_pixel_denoiser(LABELS, seed=0, size="tiny")
    resumed = train(resumed_model, dataset, steps=8, batch_size=4, seed=11,
                    checkpoint_dir=checkpoints, checkpoint_every=2)
    assert resumed.resumed_from == 4 and len(resumed.losses) == 8

    straight_model = create_pixel_denoiser(LABELS, seed=0, size="tiny")
    straight = train(straight_model, dataset, steps=8, batch_size=4, seed=11)
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    for (name, a), b in zip(resumed_model.named_parameters(), straight_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_resuming_with_other_settings_is_an_error(tmp_path):
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3, 32, 32), multi_hot([0, 1, 0, 1], 2))
    model = create_pixel_denoiser(LABELS, seed=0, size="tiny")
    train(model, data, steps=1, batch_size=2, seed=0, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(ValueError, match="checkpoint"):
        train(model, data, steps=2, batch_size=2, seed=0, lr=5e-4, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="past"):
        train(model, data, steps=0, batch_size=2, seed=0, checkpoint_dir=tmp_path)


def test_nothing_to_train_is_an_error():
    model = create_pixel_denoiser(LABELS, seed=0, size="tiny").requires_grad_(False)
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), multi_hot([0, 1], 2))
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, data, steps=1, batch_size=2, seed=0)


def test_precision_can_change_between_runs_in_one_process():
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), multi_hot([0, 1], 2))
    for precision in ("no", "bf16", "no"):
        model = create_pixel_denoiser(LABELS, seed=0, size="tiny")
        assert train(model, data, steps=1, batch_size=2, seed=0, mixed_precision=precision).steps == 1
