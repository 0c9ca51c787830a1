"""On a lent GPU: where does the pixel model's scoring time go, and which settings make it fast?

    python bench/gpu_pixel_throughput.py --budget-s 240                 # CUDA; JSON to $OUT if set
    python bench/gpu_pixel_throughput.py --device cpu --quick --out F   # the same code on CPU, < 1 min

(bench/gpu_lease.sh installs carried wheels and runs this on the lent machine.) A GPU session
measured the 1.1 M-parameter pixel model at 123 images/s with the paper preset (200 UNet passes
an image) on an H200, with fp16 autocast slower than fp32 (docs/benchmarks.md, "GPU check").
This script measures, within --budget-s seconds (items that do not fit are skipped and listed):

1. models: the shipped demo model (demo/weights/twemoji-category, loaded as the product loads
   it: worker.engine.registry.load_denoiser), and "base" (and "small", "tiny", "<size>@64")
   built from worker.engine.pixel's config with random weights (weights do not change speed;
   "small" is the demo's own architecture, so it is timed as "demo");
2. FLOPs per UNet pass of one row (torch.utils.flop_counter.FlopCounterMode: convolutions,
   matmuls and attention; norms and activations are not counted), achieved TFLOP/s and the share
   of the device's spec-sheet peak for the precision (dense, no sparsity), beside an 8192^3
   matmul measured on the device;
3. UNet forward passes (`PixelDenoiser.predict_noise`, what the scoring loop calls) per second
   over batch rows (--batches; --other-batches for the models after the first) x precision (fp32
   with TF32 off, fp16 / bf16 autocast, tf32) x channels_last, eager; then cudnn.benchmark at
   each precision's best and the product's own point ("fp32-default": fp32 under torch's startup
   flags, where convolutions run in TF32, at 512 rows); then torch.compile ("reduce-overhead" =
   CUDA graphs, "max-autotune-no-cudagraphs") at the best eager setting and its best 1-2 batch
   sizes, each compile in a child process killed at its time limit;
4. the product's scoring path end to end (worker.handlers.score.compute_shard: PNG files ->
   preset_for -> typicality -> float16 maps, shards of SHARD_IMAGES) with the paper preset on
   --images synthetic images: the fp32 reference (TF32 off) at seeds 0 and 1 (the second is the
   floor any faster setting is judged against), the current product setting, `--precision fp16`,
   the best eager setting and the best compiled one, each with its images/s and its agreement
   with the reference (max abs score difference, in reference standard errors too, Spearman rho
   of the image ranking, max abs map difference, mean map correlation).

Phases run in the order above (end to end before compiling), each up to a cumulative share of
the budget (DEADLINES; time a phase leaves flows to the next). Writes JSON to --out (default
$OUT/gpu_pixel_throughput.json when $OUT is set) after every phase, and on SIGTERM, so a run
stopped at its limit still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEMO = REPO / "demo" / "weights" / "twemoji-category"
PRECISIONS = ("fp32", "fp16", "bf16", "tf32")  # grid order: what a cut-short run loses last comes first
COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs")
PAPER_PASSES = 200  # paper preset: 100 draws x (label, null)
#: NVIDIA's datasheet numbers, dense (no sparsity), TFLOP/s. Spec sheet, not measured here.
SPEC_PEAKS = {
    "H100 SXM / H200 SXM (NVIDIA datasheet, dense)": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe (NVIDIA datasheet, dense)": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
}
#: the order phases may run up to, as cumulative shares of --budget-s (unused time flows on)
DEADLINES = {"eager:demo": 0.17, "eager:other": 0.29, "extras": 0.32, "e2e": 0.48, "compile": 0.80,
             "e2e-compiled": 1.0}


_T0 = time.perf_counter()


def log(text: str) -> None:
    """A progress line stamped with seconds since start (PYTHONUNBUFFERED or not: flushed)."""
    stripped = text.lstrip("\n")
    print("\n" * (len(text) - len(stripped)) + f"[{time.perf_counter() - _T0:4.0f} s] {stripped}", flush=True)


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def now(self) -> float:
        return time.perf_counter() - self.start

    def left(self, phase: str) -> float:
        """Seconds left before `phase`'s deadline."""
        return self.budget * DEADLINES[phase] - self.now()


# --- torch settings -------------------------------------------------------------------------------
def torch_flags() -> dict:
    import torch

    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def set_flags(flags: dict) -> None:
    import torch

    with warnings.catch_warnings():  # torch >= 2.9 prefers fp32_precision; the old flags still work
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = flags["matmul_allow_tf32"]
        torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]
        torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]


@contextlib.contextmanager
def flags_for(setting: dict, startup: dict):
    """Torch's global flags for a setting: tf32 True/False sets both TF32 flags, None keeps the
    process's startup values (the product sets none); the same for cudnn_benchmark."""
    saved = torch_flags()
    flags = dict(startup)
    tf32 = setting.get("tf32")
    if setting.get("precision") == "tf32":
        tf32 = True
    if tf32 is not None:
        flags.update(matmul_allow_tf32=tf32, cudnn_allow_tf32=tf32)
    if setting.get("cudnn_benchmark") is not None:
        flags["cudnn_benchmark"] = setting["cudnn_benchmark"]
    set_flags(flags)
    try:
        yield
    finally:
        set_flags(saved)


def autocast_for(precision: str, device):
    import torch

    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    return contextlib.nullcontext()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def free_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- models -------------------------------------------------------------------------------------
def build_model(name: str, device):
    """(denoiser in eval mode on device, info). "demo" is the shipped model; "<size>[@res]" a
    random one from worker.engine.pixel's config."""
    from worker.engine.pixel import SIZES, unet_config
    from worker.engine.registry import (
        create_pixel_denoiser,
        load_denoiser,
        read_model_config,
    )

    if name == "demo":
        config = read_model_config(DEMO)
        model = load_denoiser(DEMO, device)
        unet = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.unet.config).items()}
        same = [size for size in SIZES if all(
            unet.get(k) == (list(v) if isinstance(v, tuple) else v)
            for k, v in unet_config(model.resolution, size).items())]
        info = {"source": str(DEMO.relative_to(REPO)), "weights": "trained (shipped demo)",
                "size": config.get("size"), "architecture_of_size": same[0] if same else None}
    else:
        size, _, resolution = name.partition("@")
        model = create_pixel_denoiser([f"label {i}" for i in range(10)], resolution=int(resolution or 32),
                                      seed=0, size=size).to(device).eval()
        info = {"source": f"worker.engine.pixel.SIZES[{size!r}]", "weights": "random (seed 0)", "size": size}
    info.update(resolution=model.resolution, labels=model.num_labels,
                parameters=sum(p.numel() for p in model.parameters()))
    return model, info


def flops_per_row(model) -> tuple[float, dict]:
    """FLOPs of one UNet pass of one row, counted on a CPU copy (2 rows: a label and the null)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cpu = copy.deepcopy(model).cpu().float()
    r = cpu.resolution
    x, t = torch.randn(2, 3, r, r), torch.tensor([300, 300])
    c = torch.cat([cpu.condition([0]), cpu.null_condition(1)])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        cpu.predict_noise(x, t, c)
    by_op = {str(op): n / 2 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops() / 2, by_op


def make_inputs(model, batch: int, device, channels_last: bool):
    """Noisy images, timesteps in the paper's [100, 700) and conditions alternating label / null,
    as the scoring loop sends them."""
    import torch

    g = torch.Generator().manual_seed(batch)
    r = model.resolution
    x = torch.randn(batch, 3, r, r, generator=g).to(device)
    t = torch.randint(100, 700, (batch,), generator=g).to(device)
    c = model.condition([i % model.num_labels for i in range(batch)], device=device)
    c[1::2] = 0  # every other row is the null condition
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, t, c


# --- timing the UNet ----------------------------------------------------------------------------
def time_forward(model, batch: int, precision: str, channels_last: bool, device, min_time: float,
                 max_calls: int = 200, min_calls: int = 3) -> dict:
    """Timed `predict_noise` calls after two warm-up calls (the first, with cudnn's set-up or a
    compile, is reported) and one synchronised call to size the run: then enough calls for
    `min_time` (at least `min_calls`) between two synchronisations."""
    import torch

    x, t, c = make_inputs(model, batch, device, channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), autocast_for(precision, device):
        began = time.perf_counter()
        model.predict_noise(x, t, c)
        sync(device)
        first = time.perf_counter() - began
        if min_calls >= 3:  # a second warm-up (a CUDA graph is recorded on the second call); not --quick
            model.predict_noise(x, t, c)
            sync(device)
        began = time.perf_counter()
        model.predict_noise(x, t, c)
        sync(device)
        one = time.perf_counter() - began
        floor = min_calls if one < 0.05 else 2  # slow calls: two timed ones are enough
        calls = max(floor, min(max_calls, math.ceil(min_time / max(one, 1e-6))))
        began = time.perf_counter()
        for _ in range(calls):
            out = model.predict_noise(x, t, c)
        sync(device)
        seconds = time.perf_counter() - began
    del out
    row = {"calls": calls, "seconds": seconds, "first_call_s": first, "ms_per_call": 1e3 * seconds / calls,
           "calls_per_s": calls / seconds, "rows_per_s": calls * batch / seconds}
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return row


def finish_row(row: dict, flops: float, peaks: dict | None, ceilings: dict) -> dict:
    """Derived numbers: TFLOP/s, share of the spec peak and of the measured matmul, paper images/s."""
    if "rows_per_s" in row:
        tflops = row["rows_per_s"] * flops / 1e12
        row["tflops"] = tflops
        row["paper_images_per_s_ceiling"] = row["rows_per_s"] / PAPER_PASSES
        key = row.get("peak_precision", row["precision"])
        peak = (peaks or {}).get(key)
        row["spec_peak_tflops"] = peak
        row["pct_of_spec_peak"] = 100 * tflops / peak if peak else None
        ceiling = ceilings.get(key)
        row["pct_of_measured_matmul"] = 100 * tflops / ceiling if ceiling else None
    return row


def set_layout(model, channels_last: bool) -> None:
    import torch

    model.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def matmul_ceilings(device) -> dict:
    """TFLOP/s of a square matmul per precision on this device (random data)."""
    import torch

    n, warm, repeats = (8192, 3, 10) if device.type == "cuda" else (1024, 1, 3)
    precisions = ("fp32",) if device.type != "cuda" else PRECISIONS
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out, startup = {}, torch_flags()
    for precision in precisions:
        with flags_for({"precision": precision, "tf32": precision == "tf32"}, startup):
            a = torch.randn(n, n, device=device, dtype=dtypes[precision])
            b = torch.randn(n, n, device=device, dtype=dtypes[precision])
            for _ in range(warm):
                a @ b
            sync(device)
            began = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync(device)
            out[precision] = 2 * n ** 3 * repeats / (time.perf_counter() - began) / 1e12
        del a, b
    free_memory(device)
    return {"size": n, "tflops": out}


def spec_peaks(device_name: str) -> tuple[str | None, dict | None]:
    if "H200" in device_name or ("H100" in device_name and "PCIe" not in device_name):
        key = "H100 SXM / H200 SXM (NVIDIA datasheet, dense)"
    elif "H100" in device_name:
        key = "H100 PCIe (NVIDIA datasheet, dense)"
    else:
        return None, None
    return key, SPEC_PEAKS[key]


# --- the product's scoring path -------------------------------------------------------------------
def synthetic_images(folder: Path, count: int, resolution: int, num_labels: int, seed: int = 0) -> list[dict]:
    """PNG files of smooth colour fields with some texture, each with one random label:
    the score job reads image files, so the bench does too."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    fields = F.interpolate(torch.rand(count, 3, 4, 4, generator=g), size=resolution, mode="bicubic")
    fields = (fields + 0.15 * torch.randn(count, 3, resolution, resolution, generator=g)).clamp(0, 1)
    labels = torch.randint(0, num_labels, (count,), generator=g)
    examples = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        Image.fromarray((fields[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        examples.append({"image_id": i + 1, "path": str(path), "label_indices": [int(labels[i])]})
    return examples


def product_scorer():
    """(compute(denoiser, shard, label_ids, params, overrides) -> ShardScores-like, description).

    The score job's own `compute_shard`, with `preset_for` wrapped to apply the overrides the
    product has no option for (forward batch, channels_last). If the handler cannot be imported
    (a package missing on the machine), the same steps through the engine, marked as such."""
    try:
        from app.params import RunParams
        from app.services.runs import Example
        from worker.handlers import score
    except ImportError as error:
        return fallback_scorer(f"{type(error).__name__}: {error}"), \
            f"FALLBACK worker.engine.typicality.typicality (worker.handlers.score not importable: {error})"

    def compute(denoiser, shard, label_ids, params, overrides):
        original = score.preset_for

        def preset_for(params_, denoiser_):
            preset = original(params_, denoiser_)
            return preset.with_(name=preset.name, **overrides) if overrides else preset

        score.preset_for = preset_for
        try:
            return score.compute_shard(denoiser, [Example(**e) for e in shard], label_ids,
                                       RunParams.model_validate(params))
        finally:
            score.preset_for = original

    return compute, "worker.handlers.score.compute_shard"


def fallback_scorer(reason: str):
    from types import SimpleNamespace

    def compute(denoiser, shard, label_ids, params, overrides):
        import numpy as np

        from worker.engine.data import load_views, multi_hot
        from worker.engine.presets import get_preset
        from worker.engine.typicality import typicality

        device = next(denoiser.parameters()).device.type
        preset = get_preset(params["preset"])
        if params.get("draws"):
            preset = preset.with_(draws=params["draws"])
        if params.get("precision", "fp32") != "fp32":
            preset = preset.with_(autocast=params["precision"])
        preset = preset.with_(**({"forward_batch": max(preset.forward_batch, 512)} if device == "cuda" else
                                 {"forward_batch": 64, "channels_last": True}))
        if overrides:
            preset = preset.with_(**overrides)
        images = load_views([e["path"] for e in shard], denoiser.resolution)
        result = typicality(denoiser, images, multi_hot([e["label_indices"] for e in shard], len(label_ids)),
                            preset, seed=params["seed"])
        keys = [f"{e['image_id']}_{label_ids[e['label_indices'][0]]}" for e in shard]
        return SimpleNamespace(
            maps={k: result.maps[i].cpu().numpy().astype(np.float16) for i, k in enumerate(keys)},
            records=[{"image_id": e["image_id"], "typicality": float(result.scores[i]),
                      "std_error": float(result.stderr[i]), "map_key": keys[i]} for i, e in enumerate(shard)])

    return compute


def e2e_score(model, examples: list[dict], setting: dict, seed: int, draws: int | None, shard_size: int,
              device, startup: dict) -> dict:
    """The score job over `examples` in shards: one warm-up shard (cudnn plans, compiled graphs),
    then every shard timed. Returns speed, scores, stderr and maps in image-id order."""
    import numpy as np

    compute, path = product_scorer()
    label_ids = list(range(1, model.num_labels + 1))
    params = {"preset": "paper", "seed": seed, "all_labels": False,
              "precision": "fp32" if setting["precision"] == "tf32" else setting["precision"]}
    if draws:
        params["draws"] = draws
    overrides = {k: setting[k] for k in ("forward_batch", "channels_last") if setting.get(k) is not None}
    shards = [examples[i:i + shard_size] for i in range(0, len(examples), shard_size)]
    with flags_for(setting, startup):
        flags = torch_flags()
        began = time.perf_counter()
        compute(model, shards[0], label_ids, params, overrides)
        sync(device)
        warmup = time.perf_counter() - began
        began = time.perf_counter()
        results = [compute(model, shard, label_ids, params, overrides) for shard in shards]
        sync(device)
        seconds = time.perf_counter() - began
    rows = {}
    for result in results:
        for record in result.records:
            rows[record["image_id"]] = (record["typicality"], record["std_error"], result.maps[record["map_key"]])
    ids = sorted(rows)
    return {"path": path, "flags": flags, "overrides": overrides, "params": params, "shard_size": shard_size,
            "images": len(ids), "warmup_shard_s": warmup, "seconds": seconds, "images_per_s": len(ids) / seconds,
            "rows_per_s": len(ids) * 2 * (draws or 100) / seconds,
            "scores": np.array([rows[i][0] for i in ids], dtype=np.float64),
            "stderr": np.array([rows[i][1] for i in ids], dtype=np.float64),
            "maps": np.stack([rows[i][2].astype(np.float32) for i in ids])}


def spearman(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def agreement(reference: dict, result: dict) -> dict:
    import numpy as np

    diff = np.abs(result["scores"] - reference["scores"])
    ref_maps, maps = reference["maps"].reshape(len(diff), -1), result["maps"].reshape(len(diff), -1)
    correlations = [np.corrcoef(a, b)[0, 1] for a, b in zip(ref_maps, maps)]
    return {"max_abs_score_diff": float(diff.max()), "mean_abs_score_diff": float(diff.mean()),
            "max_score_diff_in_ref_stderr": float((diff / reference["stderr"]).max()),
            "spearman": spearman(reference["scores"], result["scores"]),
            "max_abs_map_diff": float(np.abs(maps - ref_maps).max()),
            "mean_map_correlation": float(np.nanmean(correlations)),
            "mean_abs_score": float(np.abs(reference["scores"]).mean())}


# --- child processes: anything compiled runs in one, killed at its time limit --------------------
def child_main(spec_path: str) -> int:
    """Run one spec: build the model, apply the setting, compile, time `batches`, then the e2e
    scoring if asked. Each result is a JSON line in spec["results"] as soon as it exists."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    results = Path(spec["results"])

    def emit(**line):
        with results.open("a") as f:
            f.write(json.dumps(line, default=float) + "\n")

    device = torch.device(spec["device"])
    setting, startup = spec["setting"], spec["startup_flags"]
    try:
        model, _ = build_model(spec["model"], device)
        if setting.get("channels_last"):
            set_layout(model, True)
        mode = setting.get("compile")
        with flags_for(setting, startup):
            if mode:
                model.unet.compile(mode=mode, dynamic=False)
            for batch in spec.get("batches", []):
                began = time.perf_counter()
                try:
                    row = time_forward(model, batch, setting["precision"], bool(setting.get("channels_last")),
                                       device, spec["min_time"])
                except Exception as error:  # noqa: BLE001 - report and go on to the next batch
                    free_memory(device)
                    emit(kind="grid", batch=batch, status="oom" if is_oom(error) else "error",
                         error=f"{type(error).__name__}: {error}"[:500], seconds_total=time.perf_counter() - began)
                    traceback.print_exc()
                    continue
                row.update(compile_and_warmup_s=row["first_call_s"], **compile_counters())
                emit(kind="grid", batch=batch, status="ok", seconds_total=time.perf_counter() - began, **row)
                log(f"child: batch {batch}: {row['rows_per_s']:.0f} rows/s (first call {row['first_call_s']:.1f} s)")
        if spec.get("e2e"):
            e2e = spec["e2e"]
            if setting.get("channels_last"):
                set_layout(model, False)  # the product converts the model per call itself
            result = e2e_score(model, e2e["examples"], setting, e2e["seed"], e2e["draws"], e2e["shard_size"],
                               device, startup)
            import numpy as np

            np.savez(e2e["arrays"], scores=result.pop("scores"), stderr=result.pop("stderr"), maps=result.pop("maps"))
            emit(kind="e2e", status="ok", **result, **compile_counters())
            log(f"child: e2e {result['images_per_s']:.1f} images/s")
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        emit(kind="error", error=f"{type(error).__name__}: {error}"[:2000])
        return 1
    return 0


def compile_counters() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {"graph_breaks": int(sum(counters["graph_break"].values())),
                "unique_graphs": int(counters["stats"]["unique_graphs"])}
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}


class Children:
    """Starts child processes of this script and collects their JSON lines."""

    def __init__(self, workdir: Path, device, startup: dict, min_time: float):
        self.workdir, self.device, self.startup, self.min_time, self.count = workdir, device, startup, min_time, 0
        self.active: subprocess.Popen | None = None

    def kill_active(self) -> None:
        """Kill the running child's process group (it is a session of its own, which outlives us)."""
        if self.active is not None and self.active.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.active.pid, signal.SIGKILL)

    def run(self, model: str, setting: dict, timeout: float, batches=(), e2e: dict | None = None) -> dict:
        self.count += 1
        name = f"child-{self.count}"
        spec = {"model": model, "device": str(self.device), "setting": setting, "startup_flags": self.startup,
                "batches": list(batches), "min_time": self.min_time,
                "results": str(self.workdir / f"{name}.jsonl"), "e2e": e2e}
        spec_path = self.workdir / f"{name}.json"
        spec_path.write_text(json.dumps(spec))
        log_path = self.workdir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        began = time.perf_counter()
        with log_path.open("w") as log_file:
            process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                       stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                       start_new_session=True)  # its own group: a kill takes its compile workers too
            self.active = process
            try:
                code = process.wait(timeout=max(1.0, timeout))
                status = "ok" if code == 0 else f"exit {code}"
            except subprocess.TimeoutExpired:
                self.kill_active()
                process.wait()
                status = f"killed at its {timeout:.0f} s limit"
            finally:
                self.active = None
        lines = []
        if Path(spec["results"]).exists():
            lines = [json.loads(line) for line in Path(spec["results"]).read_text().splitlines() if line.strip()]
        tail = log_path.read_text(errors="replace")[-1500:]
        return {"status": status, "seconds": time.perf_counter() - began, "lines": lines,
                "log_tail": tail if status != "ok" or any(line_.get("status") != "ok" for line_ in lines) else ""}


# --- printing -----------------------------------------------------------------------------------
def fmt(value, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(line: str) -> None:
    print(line, flush=True)


def print_grid(rows: list[dict]) -> None:
    table("| model | compile | precision | ch_last | cudnn bm | batch | ms/call | rows/s | paper img/s ceiling "
        "| TFLOP/s | % spec peak | % matmul | GiB | status |")
    table("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        table(f"| {r['model']} | {r['compile']} | {r['precision']} | {'on' if r['channels_last'] else 'off'} | "
            f"{'on' if r.get('cudnn_benchmark') else 'off'} | {r['batch']} | {fmt(r.get('ms_per_call'), '.2f')} | "
            f"{fmt(r.get('rows_per_s'), '.0f')} | {fmt(r.get('paper_images_per_s_ceiling'), '.1f')} | "
            f"{fmt(r.get('tflops'), '.2f')} | {fmt(r.get('pct_of_spec_peak'), '.1f')} | "
            f"{fmt(r.get('pct_of_measured_matmul'), '.1f')} | {fmt(r.get('max_memory_gib'), '.1f')} | "
            f"{r['status']}{(': ' + r['error'][:80]) if r.get('error') else ''} |")


def print_e2e(rows: list[dict]) -> None:
    table("| scoring | images/s | speed-up vs current | max abs score diff | max diff / ref stderr | Spearman rho "
        "| max abs map diff | mean map corr |")
    table("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("status") != "ok":
            table(f"| {r['name']} | {r.get('status')} {r.get('error', '')[:100]} | | | | | | |")
            continue
        table(f"| {r['name']} | {r['images_per_s']:.1f} | {fmt(r.get('speedup_vs_current'), '.2f')}x | "
            f"{fmt(r.get('max_abs_score_diff'), '.2e')} | {fmt(r.get('max_score_diff_in_ref_stderr'), '.3f')} | "
            f"{fmt(r.get('spearman'), '.4f')} | {fmt(r.get('max_abs_map_diff'), '.2e')} | "
            f"{fmt(r.get('mean_map_correlation'), '.4f')} |")


# --- the parent ---------------------------------------------------------------------------------
def describe(setting: dict) -> str:
    precision = setting["precision"]
    if precision == "fp32":
        precision += " (TF32 off)" if setting.get("tf32") is False else " (torch's startup TF32 flags)"
    parts = [precision]
    if setting.get("forward_batch"):
        parts.append(f"{setting['forward_batch']} rows/call")
    if setting.get("channels_last") is not None:
        parts.append("channels_last" if setting["channels_last"] else "contiguous")
    if setting.get("cudnn_benchmark"):
        parts.append("cudnn.benchmark")
    if setting.get("compile"):
        parts.append(f"compile {setting['compile']}")
    return ", ".join(parts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny grid, 8 images, few draws (tests the script)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip what would run past this (seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_pixel_throughput.json if $OUT)")
    parser.add_argument("--models", default=None, help="comma list: demo, small, base, tiny, <size>@64")
    parser.add_argument("--batches", default=None, help="rows per UNet call, comma list")
    parser.add_argument("--other-batches", default="512,2048,8192",
                        help="rows per call for the models after the first (default: no 128)")
    parser.add_argument("--precisions", default=None, help=f"comma list of {PRECISIONS}")
    parser.add_argument("--compile-modes", default=",".join(COMPILE_MODES),
                        help="comma list; empty for none")
    parser.add_argument("--compile-cap-s", type=float, default=100.0, help="time limit of one compile child")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also compile with --device cpu")
    parser.add_argument("--images", type=int, default=None, help="end-to-end images (default 512, quick 8)")
    parser.add_argument("--draws", type=int, default=None, help="end-to-end draws (default the paper's 100)")
    parser.add_argument("--shard", type=int, default=None, help="images per score shard (default the job's)")
    parser.add_argument("--min-time", type=float, default=None, help="timed seconds per grid point")
    parser.add_argument("--e2e-compiled-min-gain", type=float, default=1.05,
                        help="score end to end compiled only if the compiled UNet beat eager by this factor")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    import shutil

    workdir = Path(tempfile.mkdtemp(prefix="gpu-pixel-"))  # images, child specs, results and logs
    try:
        return measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args, workdir: Path) -> int:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("no CUDA device visible to torch; use --device cpu --quick to test the script")
        return 2
    quick = args.quick
    clock = Clock(args.budget_s)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_pixel_throughput.json"
                                           if os.environ.get("OUT") else None)
    models = (args.models or ("demo" if quick else "demo,base")).split(",")
    batches = [int(b) for b in (args.batches or ("8,16" if quick else "128,512,2048,8192")).split(",")]
    precisions = (args.precisions or ("fp32" if device.type == "cpu" else ",".join(PRECISIONS))).split(",")
    layouts = (False, True)
    model_batches = [int(b) for b in args.other_batches.split(",")]
    compile_modes = [m for m in args.compile_modes.split(",") if m]
    if device.type == "cpu" and not args.compile_on_cpu:
        compile_modes = []
    images = args.images or (8 if quick else 512)
    draws = args.draws or (4 if quick else None)
    min_time = args.min_time or (0.05 if device.type == "cpu" else 0.2)
    try:
        from worker.handlers.score import SHARD_IMAGES
    except ImportError:
        SHARD_IMAGES = 64  # the job's value, when the handler cannot be imported
    shard = args.shard or (images if quick else SHARD_IMAGES)

    startup = torch_flags()
    import diffusers

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    peak_name, peaks = spec_peaks(name)
    report: dict = {
        "schema": 1, "script": "bench/gpu_pixel_throughput.py", "args": vars(args),
        "device": {"name": name, "type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                   "diffusers": diffusers.__version__, "python": sys.version.split()[0]},
        "startup_flags": startup, "budget_s": args.budget_s,
        "spec_peak": {"source": peak_name, "tflops": peaks,
                      "note": "spec sheet numbers (NVIDIA datasheet, dense, no sparsity), not measured"},
        "models": {}, "grid": [], "e2e": {"rows": []}, "skipped": [], "notes": []}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        report["device"].update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                                memory_gib=props.total_memory / 2 ** 30)
    log(f"{name}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}; "
        f"budget {args.budget_s:.0f} s; startup flags {startup}")
    if peaks:
        log(f"peak used: {peak_name}: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
            + " TFLOP/s - spec sheet numbers, not measured")
    else:
        log("peak: no spec sheet number for this device; % of peak left empty")

    def save():
        report["elapsed_s"] = clock.now()
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=float))

    def skip(phase: str, item: str, reason: str):
        report["skipped"].append({"phase": phase, "item": item, "reason": reason})
        log(f"SKIPPED [{phase}] {item}: {reason}")

    children = Children(workdir, device, startup, min_time)

    def terminated(signum, frame):  # `timeout` (bench/gpu_lease.sh) ran out: keep what we have
        children.kill_active()
        report["terminated"] = f"signal {signum} at {clock.now():.0f} s"
        log(f"TERMINATED by signal {signum}: writing what was measured")
        save()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)

    # --- ceilings and FLOPs -------------------------------------------------------------------
    report["matmul_ceiling"] = matmul_ceilings(device)
    ceilings = report["matmul_ceiling"]["tflops"]
    log(f"measured {report['matmul_ceiling']['size']}^3 matmul TFLOP/s: "
        + ", ".join(f"{k} {v:.3g}" for k, v in ceilings.items()))
    loaded = {}
    # FLOPs of the bigger sizes too (cheap), so the numbers can be scaled to them; not with --quick
    for model_name in dict.fromkeys(models + ([] if quick else ["small", "base"])):
        try:
            model, info = build_model(model_name, device)
            info["flops_per_row"], info["flops_by_op"] = flops_per_row(model)
            info["timed"] = model_name in models
            if model_name == "small" and "demo" in models:
                info["note"] = "the demo model's architecture; timed as 'demo' (weights do not change speed)"
            report["models"][model_name] = info
            if model_name in models:
                loaded[model_name] = model
            log(f"model {model_name}: {info['parameters'] / 1e6:.2f} M parameters, {info['resolution']} px, "
                f"{info['flops_per_row'] / 1e9:.3f} GFLOP per row per pass ({info['source']})")
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            report["models"][model_name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    save()

    def grid_point(model_name, batch, precision, channels_last, cudnn_benchmark=False, phase="eager"):
        """One eager point. precision "fp32-default" is fp32 under torch's startup flags (the product)."""
        model = loaded[model_name]
        row = {"model": model_name, "batch": batch, "precision": precision, "channels_last": channels_last,
               "compile": "eager", "cudnn_benchmark": cudnn_benchmark}
        setting = {"precision": precision, "tf32": precision == "tf32", "cudnn_benchmark": cudnn_benchmark}
        if precision == "fp32-default":
            setting = {"precision": "fp32", "tf32": None, "cudnn_benchmark": None}
            row.update(cudnn_benchmark=startup["cudnn_benchmark"],
                       peak_precision="tf32" if startup["cudnn_allow_tf32"] else "fp32",
                       note="the product's current point: fp32 under torch's startup flags (convolutions, "
                            "nearly all the FLOPs, run in TF32 when cudnn_allow_tf32 is on)")
        set_layout(model, channels_last)
        try:
            for _attempt in (1, 2):  # an out-of-memory error is retried once with the allocator's cache emptied
                try:
                    with flags_for(setting, startup):
                        row.update(status="ok", **time_forward(model, batch, setting["precision"], channels_last,
                                                               device, min_time, min_calls=2 if quick else 3))
                    row.pop("error", None)
                    break
                except Exception as error:  # noqa: BLE001
                    free_memory(device)
                    row.update(status="oom" if is_oom(error) else "error",
                               error=f"{type(error).__name__}: {error}"[:300])
                    if not is_oom(error):
                        traceback.print_exc()
                        break
        finally:
            set_layout(model, False)
        row["phase"] = phase
        finish_row(row, report["models"][model_name]["flops_per_row"], peaks, ceilings)
        report["grid"].append(row)
        return row

    # --- eager grid -----------------------------------------------------------------------------
    for model_name in loaded:
        phase = "eager:demo" if model_name == models[0] else "eager:other"
        log(f"\n== eager grid, {model_name} ==")
        these = batches if model_name == models[0] or quick else model_batches
        for precision in precisions:
            for channels_last in layouts:
                for batch in these:
                    item = f"{model_name} {precision} {'channels_last' if channels_last else 'contiguous'} {batch}"
                    if clock.left(phase) <= 0:
                        skip(phase, item, f"past this phase's share of the budget ({clock.now():.0f} s)")
                        continue
                    row = grid_point(model_name, batch, precision, channels_last)
                    log(f"  {item}: " + (f"{row['ms_per_call']:.2f} ms/call, {row['rows_per_s']:.0f} rows/s, "
                                         f"{row['tflops']:.2f} TFLOP/s" if row["status"] == "ok" else row["status"]))
                    if row["status"] == "oom":
                        for larger in [b for b in these if b > batch]:
                            skip(phase, f"{model_name} {precision} {channels_last} {larger}",
                                 "a smaller batch ran out of memory")
                        break
        free_memory(device)
        save()

    def ok(rows):
        return [r for r in rows if r.get("status") == "ok"]

    def best_of(rows):
        rows = ok(rows)
        return max(rows, key=lambda r: r["rows_per_s"]) if rows else None

    # --- extras: cudnn.benchmark at each precision's best; the product's own point ---------------
    if device.type == "cuda":
        log("\n== extras: cudnn.benchmark at each precision's best; the product's current point ==")
        for model_name in loaded:
            if clock.left("extras") > 0:
                grid_point(model_name, 512, "fp32-default", False, phase="extras")
            for precision in precisions:
                best = best_of(r for r in report["grid"] if r["model"] == model_name and r["precision"] == precision
                               and r["phase"].startswith("eager"))
                if best is None:
                    continue
                item = f"{model_name} {precision} cudnn.benchmark at batch {best['batch']}"
                if clock.left("extras") <= 0:
                    skip("extras", item, "past this phase's share of the budget")
                    continue
                grid_point(model_name, best["batch"], precision, best["channels_last"], cudnn_benchmark=True,
                           phase="extras")
        save()
    report["notes"].append("grid precision fp32 = TF32 off for matmuls and convolutions; the product runs with "
                           "torch's startup flags (startup_flags), where cudnn_allow_tf32 is True by default")

    # --- end to end: the product's scoring path ---------------------------------------------------
    demo = "demo" if "demo" in loaded else next(iter(loaded))
    e2e_rows = report["e2e"]["rows"]
    examples = synthetic_images(workdir / "images", images, loaded[demo].resolution, loaded[demo].num_labels)
    report["e2e"].update(model=demo, images=images, draws=draws or 100, preset="paper", shard_size=shard,
                         image_kind="synthetic PNGs (smooth colour fields + noise), one random label each")
    arrays: dict[str, dict] = {}

    def record_e2e(name: str, setting: dict, seed: int, result: dict | None, error: str | None = None):
        row = {"name": name, "setting": setting, "seed": seed}
        if result is None:
            row.update(status="error", error=error or "")
        else:
            arrays[name] = {k: result.pop(k) for k in ("scores", "stderr", "maps")}
            row.update(status="ok", **result)
            reference = arrays.get("reference")
            if reference is not None:
                row.update(agreement(reference, arrays[name]))
        e2e_rows.append(row)
        log(f"  {name} ({describe(setting)}, seed {seed}): "
            + (f"{row['images_per_s']:.1f} images/s" if row["status"] == "ok" else row["status"] + " " + row["error"]))
        save()
        return row

    def e2e_in_process(name, setting, seed):
        try:
            set_layout(loaded[demo], False)
            record_e2e(name, setting, seed, e2e_score(loaded[demo], examples, setting, seed, draws, shard,
                                                      device, startup))
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            record_e2e(name, setting, seed, None, f"{type(error).__name__}: {error}"[:500])
        finally:
            free_memory(device)

    def e2e_in_child(name, setting, seed, limit):
        spec = {"examples": examples, "seed": seed, "draws": draws, "shard_size": shard,
                "arrays": str(workdir / f"e2e-{len(e2e_rows)}.npz")}
        child = children.run(demo, setting, limit, e2e=spec)
        line = next((line_ for line_ in child["lines"] if line_.get("kind") == "e2e"), None)
        if line is None:
            error = next((line_["error"] for line_ in child["lines"] if line_.get("kind") == "error"), child["status"])
            row = record_e2e(name, setting, seed, None, f"child {child['status']}: {error}")
            row["log_tail"] = child["log_tail"]
            return
        import numpy as np

        loaded_arrays = np.load(spec["arrays"])
        line.update({k: loaded_arrays[k] for k in ("scores", "stderr", "maps")})
        line.pop("kind"), line.pop("status")
        row = record_e2e(name, setting, seed, line)
        row["child_seconds"] = child["seconds"]

    log(f"\n== end to end: {images} images, paper preset ({draws or 100} draws), shards of {shard} ==")
    reference_setting = {"precision": "fp32", "tf32": False}
    plan = [("reference", reference_setting, 0), ("floor (seed 1)", reference_setting, 1),
            ("current", {"precision": "fp32"}, 0)]
    if device.type == "cuda":
        plan.append(("product --precision fp16", {"precision": "fp16"}, 0))
    demo_eager = [r for r in report["grid"] if r["model"] == demo and r["compile"] == "eager"
                  and r["precision"] in PRECISIONS]
    best_eager = best_of(demo_eager)
    if best_eager:
        best_setting = {"precision": best_eager["precision"], "tf32": best_eager["precision"] == "tf32",
                        "forward_batch": best_eager["batch"], "channels_last": best_eager["channels_last"],
                        "cudnn_benchmark": best_eager.get("cudnn_benchmark") or None}
        plan.append(("best eager", best_setting, 0))
    for name_, setting, seed in plan:
        estimate = 3.0
        if arrays:
            estimate = 1.5 * max(r["seconds"] + r["warmup_shard_s"] for r in e2e_rows if r["status"] == "ok")
        must = name_ in ("reference", "current") and clock.now() < 0.9 * args.budget_s
        if clock.left("e2e") < estimate and not must:
            skip("e2e", name_, f"{clock.left('e2e'):.0f} s left in the phase, a run takes ~{estimate:.0f} s")
            continue
        if quick and name_ == "best eager":
            # the CPU test's check of the child-process path that the compiled rows take on a GPU
            e2e_in_child(name_ + " (in a child process)", setting, seed, limit=120)
        else:
            e2e_in_process(name_, setting, seed)
    report["e2e"]["path"] = next((r["path"] for r in e2e_rows if r.get("path")), None)

    # --- torch.compile, one child process each --------------------------------------------------
    compiled_rows = []

    def compile_child(model_name, setting, child_batches, phase="compile", cap=None):
        item = f"{model_name} {describe(setting)} at {child_batches}"
        limit = min(cap or args.compile_cap_s, clock.left(phase))
        if limit < 25:
            skip(phase, item, f"{clock.left(phase):.0f} s left in the phase (a compile needs ~25 s or more)")
            return
        log(f"  compiling {item} (limit {limit:.0f} s)")
        child = children.run(model_name, setting, limit, batches=child_batches)
        got = [line_ for line_ in child["lines"] if line_.get("kind") == "grid"]
        for line in got:
            row = {"model": model_name, "precision": setting["precision"], "channels_last": setting["channels_last"],
                   "compile": setting["compile"], "cudnn_benchmark": bool(setting.get("cudnn_benchmark")),
                   "phase": phase,
                   "child_status": child["status"], "child_seconds": child["seconds"]}
            row.update({k: v for k, v in line.items() if k != "kind"})
            finish_row(row, report["models"][model_name]["flops_per_row"], peaks, ceilings)
            report["grid"].append(row)
            compiled_rows.append(row)
            log(f"    batch {row['batch']}: " + (f"{row['rows_per_s']:.0f} rows/s, {row['tflops']:.2f} TFLOP/s, "
                                                 f"compile+warm-up {row['first_call_s']:.0f} s, graph breaks "
                                                 f"{row.get('graph_breaks')}" if row["status"] == "ok"
                                                 else row["status"] + " " + row.get("error", "")))
        for missing in [b for b in child_batches if b not in [line_["batch"] for line_ in got]]:
            error = next((line_["error"] for line_ in child["lines"] if line_.get("kind") == "error"), "")
            row = {"model": model_name, "batch": missing, "precision": setting["precision"],
                   "channels_last": setting["channels_last"], "compile": setting["compile"], "phase": phase,
                   "status": f"not measured: child {child['status']}", "error": error[:300],
                   "child_seconds": child["seconds"], "log_tail": child["log_tail"]}
            report["grid"].append(row)
            log(f"    batch {missing}: {row['status']} {error[:200]}")
        save()

    if compile_modes and best_eager:
        log("\n== torch.compile (each in a child process with a time limit) ==")
        free_memory(device)  # the children need the GPU's memory more than our allocator's cache
        ranked = sorted(ok(r for r in demo_eager if r["precision"] == best_eager["precision"]
                           and r["channels_last"] == best_eager["channels_last"]),
                        key=lambda r: -r["rows_per_s"])
        top_batches = [r["batch"] for r in ranked[:2]]
        base = {"precision": best_eager["precision"], "tf32": best_eager["precision"] == "tf32",
                "channels_last": best_eager["channels_last"],
                "cudnn_benchmark": best_eager.get("cudnn_benchmark") or None}
        plans = []
        if "reduce-overhead" in compile_modes:
            plans.append((demo, dict(base, compile="reduce-overhead"), top_batches))
        if "max-autotune-no-cudagraphs" in compile_modes:
            plans.append((demo, dict(base, compile="max-autotune-no-cudagraphs"), top_batches[:1]))
        if "reduce-overhead" in compile_modes and (base["precision"], base["channels_last"]) != ("fp32", False):
            plans.append((demo, {"precision": "fp32", "tf32": False, "channels_last": False,
                                 "compile": "reduce-overhead"}, [512]))
        half = {"fp16": "bf16", "bf16": "fp16"}.get(base["precision"], "fp16")
        other = best_of(r for r in demo_eager if r["precision"] == half)
        if "reduce-overhead" in compile_modes and other and half in precisions:
            plans.append((demo, {"precision": half, "tf32": False, "channels_last": other["channels_last"],
                                 "cudnn_benchmark": other.get("cudnn_benchmark") or None,
                                 "compile": "reduce-overhead"}, [other["batch"]]))
        for model_name in [m for m in loaded if m != demo]:
            best_other = best_of(r for r in report["grid"] if r["model"] == model_name and r["compile"] == "eager"
                                 and r["precision"] in PRECISIONS)
            if best_other and "reduce-overhead" in compile_modes:
                plans.append((model_name, {"precision": best_other["precision"],
                                           "tf32": best_other["precision"] == "tf32",
                                           "channels_last": best_other["channels_last"],
                                           "cudnn_benchmark": best_other.get("cudnn_benchmark") or None,
                                           "compile": "reduce-overhead"}, [best_other["batch"]]))
        for model_name, setting, child_batches in plans:
            compile_child(model_name, setting, child_batches)
    elif not compile_modes:
        skip("compile", "all compile modes", "compile skipped on CPU (pass --compile-on-cpu to try)"
             if device.type == "cpu" else "--compile-modes is empty")

    # --- end to end at the best compiled setting ----------------------------------------------------
    best_compiled = best_of(r for r in compiled_rows if r["model"] == demo)
    if best_compiled and best_eager:
        gain = best_compiled["rows_per_s"] / best_eager["rows_per_s"]
        setting = {"precision": best_compiled["precision"], "tf32": best_compiled["precision"] == "tf32",
                   "forward_batch": best_compiled["batch"], "channels_last": best_compiled["channels_last"],
                   "cudnn_benchmark": best_compiled.get("cudnn_benchmark") or None,
                   "compile": best_compiled["compile"]}
        if gain < args.e2e_compiled_min_gain:
            skip("e2e-compiled", describe(setting), f"compiled UNet only {gain:.2f}x the best eager one")
        else:
            limit = min(args.compile_cap_s + 60, clock.left("e2e-compiled"))
            if limit < 30:
                skip("e2e-compiled", describe(setting), f"{clock.left('e2e-compiled'):.0f} s left")
            else:
                log(f"\n== end to end, best compiled ({describe(setting)}; limit {limit:.0f} s) ==")
                e2e_in_child("best compiled", setting, 0, limit)

    # --- summary --------------------------------------------------------------------------------
    current = next((r for r in e2e_rows if r["name"] == "current" and r["status"] == "ok"), None)
    for row in e2e_rows:
        if current and row["status"] == "ok":
            row["speedup_vs_current"] = row["images_per_s"] / current["images_per_s"]
    demo_rows = ok(r for r in report["grid"] if r["model"] == demo)
    current_grid = next((r for r in demo_rows if r["precision"] == "fp32-default"), None)
    report["best"] = {
        "demo_eager": best_eager, "demo_compiled": best_compiled,
        "per_model": {m: best_of(r for r in report["grid"] if r["model"] == m) for m in loaded},
        "demo_current_point": current_grid}
    log("\n== UNet forward passes (rows = one image under one condition) ==")
    print_grid(report["grid"])
    log("\n== end to end (the score job's compute_shard), agreement with the fp32 reference at seed 0 ==")
    print_e2e(e2e_rows)
    if report["skipped"]:
        log(f"\nskipped ({len(report['skipped'])}):")
        for s in report["skipped"]:
            log(f"  [{s['phase']}] {s['item']}: {s['reason']}")
    for key, row in report["best"]["per_model"].items():
        if row:
            log(f"best for {key}: {row['rows_per_s']:.0f} rows/s = {row['paper_images_per_s_ceiling']:.1f} paper "
                f"images/s ceiling ({row['precision']}, {row['compile']}, batch {row['batch']}, "
                f"channels_last {row['channels_last']}, {row['tflops']:.2f} TFLOP/s"
                + (f", {row['pct_of_spec_peak']:.1f}% of spec peak" if row.get("pct_of_spec_peak") else "") + ")")
    log(f"e2e path: {report['e2e'].get('path')}")
    log(f"total {clock.now():.0f} s of a {args.budget_s:.0f} s budget" + (f"; JSON: {out}" if out else
                                                                          "; no --out and no $OUT: no JSON written"))
    save()
    return 0 if any(r["status"] == "ok" for r in e2e_rows) and demo_rows else 1


if __name__ == "__main__":
    sys.exit(main())
