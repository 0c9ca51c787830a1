"""Training under `accelerate launch` (worker/launched_training.py): two launched processes on
this CPU (DDP over gloo) train the weights one in-process run trains; the worker follows the
launch's progress, a cancel stops every launched process and keeps the checkpoints; a failed
launch is a clear job error."""
from __future__ import annotations

import json

import psutil
import pytest
import torch
from safetensors.torch import load_file

from app.db import session_scope
from app.models import TrainedModel
from app.settings import Settings
from tests.cli_helpers import diffmine_in_process
from tests.helpers import job_row, wait_until
from tests.small_data import animal_folder
from worker.engine.training import latest_checkpoint

TRAIN = ["--size", "tiny", "--batch-size", "4", "--lr", "1e-3"]
#: weights agree to float rounding (summation order differs, and Adam amplifies it where
#: gradients are near zero: 2.4e-5 measured), far from what 6 steps move them (6e-3)
ATOL = 1e-4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return animal_folder(tmp_path_factory.mktemp("animals"), per_label=8)


@pytest.fixture
def home(source, tmp_path, capsys):
    home = tmp_path / "home"
    diffmine_in_process(capsys, "ingest", str(source), "--name", "a", "--min-per-label", "4", home=home)
    return home


def weights(home, model_id: int) -> dict[str, torch.Tensor]:
    folder = home / f"models/{model_id}/weights"
    return {f"{path.relative_to(folder)}:{name}": tensor
            for path in sorted(folder.rglob("*.safetensors"))
            for name, tensor in load_file(path).items()}


def launched_processes(spec) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(spec) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_two_launched_processes_train_the_weights_of_one_in_process_run(home, capsys):
    here = diffmine_in_process(capsys, "train", "a", *TRAIN, "--steps", "6", home=home)
    launched = diffmine_in_process(capsys, "train", "a", *TRAIN, "--steps", "6", "--processes", "2", home=home)
    log = (home / "models/2/launch/launch.log").read_text()
    assert "process 1 of 2 (DistributedType.MULTI_CPU)" in log  # really two processes
    assert launched["steps"] == here["steps"] == 6
    assert launched["final_loss"] == pytest.approx(here["final_loss"], abs=1e-6)
    initial = diffmine_in_process(capsys, "train", "a", *TRAIN, "--steps", "1", "--lr", "0", home=home)
    moved = 0.0
    for name, expected in weights(home, 1).items():
        torch.testing.assert_close(weights(home, 2)[name], expected, atol=ATOL, rtol=0, msg=name)
        moved = max(moved, (expected - weights(home, initial["model"])[name]).abs().max().item())
    assert moved > 20 * ATOL  # so the tolerance would catch a different training
    with session_scope(Settings(home=home)) as session:
        model = session.get(TrainedModel, 2)
        assert model.status == "ready" and "classifier_accuracy" in model.metrics


def test_the_worker_follows_a_launch_and_a_cancel_stops_it(home, capsys, start_worker):
    diffmine_in_process(capsys, "train", "a", *TRAIN, "--steps", "100000", "--checkpoint-every", "2",
                        "--processes", "2", "--queue", home=home)
    start_worker(home, "--lease", "2", "--poll", "0.1")
    running = wait_until(lambda: (row := job_row(home, 1)).stage == "train" and row.progress_done >= 3
                         and row, timeout=120, message="the launch's progress in the job")
    assert running.progress_total == 100000 and running.message.startswith("loss ")
    spec = home / "models/1/launch/spec.json"
    assert len(launched_processes(spec)) >= 2  # the accelerate launcher and its two processes

    diffmine_in_process(capsys, "cancel", "1", home=home)
    wait_until(lambda: job_row(home, 1).status == "cancelled", timeout=60, message="the cancel")
    wait_until(lambda: not launched_processes(spec), timeout=30, message="the launch to end")
    # The cancel may stop a checkpoint mid-write; the last complete one is what a resume takes.
    checkpoint = latest_checkpoint(home / "models/1/checkpoints")
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] >= 2 and len(state["losses"]) == state["step"]
    assert load_file(checkpoint / "trainable.safetensors")
    with session_scope(Settings(home=home)) as session:
        assert session.get(TrainedModel, 1).status != "ready"


def test_a_failed_launch_is_a_clear_job_error(home, capsys, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("compute_environment: [")  # not YAML: accelerate launch itself fails
    diffmine_in_process(capsys, "train", "a", *TRAIN, "--steps", "2", "--accelerate-config", str(config),
                        home=home, expect=1)
    error = job_row(home, 1).error
    assert error.startswith("LaunchFailed: launched training failed (exit code 1)")
    assert "ParserError" in error and "launch.log" in error
