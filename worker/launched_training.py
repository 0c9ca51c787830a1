"""Fine-tuning under `accelerate launch` on several GPUs or machines, followed by a worker's job.

The job writes what training needs to `models/<id>/launch/spec.json` and runs
`accelerate launch ... -m worker.launched_training SPEC`. Every launched process builds the
same denoiser and dataset and calls the same `train` as the in-process path; `train` splits each
global batch over the processes, so the weights do not depend on how many there are. The main
process writes `progress.json` as it goes and, at the end, the weights and `result.json`.

Meanwhile the job keeps its lease, reports that progress and checks for cancel; on cancel (or
any stop) it ends the launched processes, which never outlive the launch or the worker. A job
taken over after its worker died launches again and resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

POLL_SECONDS = 0.5  # progress file: write at most, and read, this often
STOP_GRACE_SECONDS = 15  # launched processes get this long to exit on SIGTERM before SIGKILL
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class LaunchFailed(RuntimeError):
    pass


class LaunchFiles:
    """The launch folder next to the model's checkpoints (on shared storage for several machines)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.spec, self.progress = self.folder / "spec.json", self.folder / "progress.json"
        self.result, self.log = self.folder / "result.json", self.folder / "launch.log"

    def error(self, rank: int) -> Path:
        return self.folder / f"error-{rank}.txt"

    def errors(self) -> list[Path]:
        return sorted(self.folder.glob("error-*.txt"))

    def prepare(self, spec: dict) -> None:
        """A fresh start: what an earlier attempt left must not pass for this one's outcome."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in [self.progress, self.result, *self.errors()]:
            stale.unlink(missing_ok=True)
        write_json(self.spec, spec)


def write_json(path: Path, value) -> None:
    """Written whole or not at all: the job may read it at any moment."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


# --- the worker's side ---------------------------------------------------------------------------
def launch_and_follow(context, spec: dict):
    """Launch training for `spec` (see worker.handlers.train), follow it, return its TrainResult."""
    from worker.engine.training import TrainResult

    files = LaunchFiles(Path(spec["model_dir"]).parent / "launch")
    files.prepare(spec)
    command = launch_command(spec["config"], files.spec, worker_pid=os.getpid())
    context.log(f"launching: {shlex.join(command)}", *other_machines_hint(spec["config"], files))
    with open(files.log, "a") as log:
        log.write(f"--- job {context.job_id}: {shlex.join(command)}\n")
        log.flush()
        # Its own process group, so stopping it reaches the launcher and its children.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=launch_environment())
    try:
        follow(context, process, files)
    finally:
        stop(process)
    if process.returncode != 0 or not files.result.exists():
        raise LaunchFailed(failure_message(process.returncode, files))
    return TrainResult(**json.loads(files.result.read_text()))


def launch_command(config: dict, spec_path: Path, *, worker_pid: int | None) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.get("accelerate_config"):  # machines, GPUs and precision as the file says
        command += ["--config_file", str(config["accelerate_config"])]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if config["processes"] > 1:  # DDP: NCCL on GPUs, gloo on a machine without any
            command.append("--multi_gpu")
    if config.get("processes"):
        command += ["--num_processes", str(config["processes"])]
    command += ["-m", "worker.launched_training", str(spec_path)]
    return command + (["--worker-pid", str(worker_pid)] if worker_pid else [])


def other_machines_hint(config: dict, files: LaunchFiles) -> list[str]:
    if not config.get("accelerate_config"):
        return []
    rest = launch_command({**config, "accelerate_config": "CONFIG_OF_THAT_MACHINE"}, files.spec,
                          worker_pid=None)
    return ["on every other machine of the launch (same data directory path), run: "
            + shlex.join(rest[1:])]


def launch_environment() -> dict:
    """The worker's environment (CUDA_VISIBLE_DEVICES included), with this project importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def follow(context, process: subprocess.Popen, files: LaunchFiles) -> None:
    """Report the main process's progress until the launch ends; stop at a cancel or yield."""
    while process.poll() is None:
        report_progress(context, files)
        context.check()
        time.sleep(POLL_SECONDS)
    report_progress(context, files)


def report_progress(context, files: LaunchFiles) -> None:
    try:
        progress = json.loads(files.progress.read_text())
    except FileNotFoundError:  # still starting
        return
    context.progress(progress["done"], progress["total"], f"loss {progress['loss']:.4f}",
                     stage="train")


def stop(process: subprocess.Popen) -> None:
    """End the launch: SIGTERM its process group (accelerate passes it on to the processes it
    started), then SIGKILL whatever is left after a grace period."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def failure_message(returncode: int, files: LaunchFiles) -> str:
    errors = files.errors()
    if errors:
        cause = errors[0].read_text().strip()
    elif returncode == 0:
        cause = "it ended without writing its result"
    else:
        cause = last_error_line(files.log.read_text(errors="replace"))
    return f"launched training failed (exit code {returncode}): {cause} (log: {files.log})"


def last_error_line(log: str) -> str:
    """The last "SomeError: message" line of a log (a traceback's point), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1]


# --- the launched processes' side ----------------------------------------------------------------
class ProgressFile:
    """`train`'s progress callback in the main process: the latest step, at most every POLL_SECONDS."""

    def __init__(self, path: Path):
        self.path, self.last = path, 0.0

    def __call__(self, done: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= POLL_SECONDS or done == total:
            write_json(self.path, {"done": done, "total": total, "loss": loss})
            self.last = now


def exit_when_orphaned(worker_pid: int | None) -> None:
    """Exit as soon as the launcher that started this process, or the worker following the launch,
    is gone: a new worker will launch again, and two trainings must never share checkpoints."""
    import psutil

    launcher = os.getppid()
    worker = psutil.Process(worker_pid) if worker_pid else None

    def gone(process) -> bool:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE

    def watch() -> None:
        while True:
            time.sleep(1)
            try:
                orphaned = os.getppid() != launcher or (worker is not None and gone(worker))
            except psutil.NoSuchProcess:
                orphaned = True
            if orphaned:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def train_launched(spec: dict, files: LaunchFiles, accelerator) -> None:
    from worker.engine.training import train
    from worker.training_spec import build_training, train_options

    denoiser, dataset = build_training(spec, str(accelerator.device))
    progress = ProgressFile(files.progress) if accelerator.is_main_process else None
    result = train(denoiser, dataset, **train_options(spec), progress=progress,
                   accelerator=accelerator)
    if accelerator.is_main_process:
        denoiser.save(spec["model_dir"])
        write_json(files.result, asdict(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def launched_accelerator():
    """The Accelerator of one launched process, part of the whole launch.

    accelerate sets up several processes on a machine without GPUs (gloo) only when told
    `cpu=True`, which `accelerate launch --multi_gpu` never tells it; unhelped, each process
    would train alone and all of them would write the same files.
    """
    import torch

    from worker.engine.training import make_accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = make_accelerator(cpu=world_size > 1 and not torch.cuda.is_available())
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"accelerate set up {accelerator.num_processes} of the launch's "
                           f"{world_size} processes ({accelerator.distributed_type})")
    return accelerator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one process of a launched diffmine training")
    parser.add_argument("spec", help="the spec.json the worker wrote")
    parser.add_argument("--worker-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    exit_when_orphaned(args.worker_pid)
    files = LaunchFiles(Path(args.spec).parent)
    spec = json.loads(files.spec.read_text())

    accelerator = launched_accelerator()
    print(f"process {accelerator.process_index} of {accelerator.num_processes} "
          f"({accelerator.distributed_type}) on {accelerator.device}", flush=True)
    try:
        train_launched(spec, files, accelerator)
    except BaseException as error:  # the job shows the first process's error, not the launcher's
        files.error(accelerator.process_index).write_text(f"{type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    main()
