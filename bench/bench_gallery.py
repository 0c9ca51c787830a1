"""Benchmark the web gallery: a synthetic run with 100k patches in 100 labels, served by uvicorn
and loaded by wrk at 10 and 50 connections, HTML and JSON.

    python bench/bench_gallery.py                  # build (once) and measure (~3 min)
    python bench/bench_gallery.py --workers 1 2    # compare server process counts
    python bench/bench_gallery.py --quick          # 10k patches, short runs

Needs wrk (`apt-get install -y wrk`). The run is rows only (written straight into SQLite) plus
tiny crop files: 1,000 distinct PNGs that the 100k patches share (the gallery serves them as
files; their bytes do not matter). Each wrk request asks for a random label's gallery page
(5 clusters x 10 members = 50 patches), so the page is never the same twice in a row.
Prints a Markdown table (the "Web gallery" section of docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert  # noqa: E402

from app.db import engine_for, session_scope, upgrade  # noqa: E402
from app.models import Cluster, ClusterMember, Dataset, Image, Label, LabelSet, MiningRun, Patch, TrainedModel  # noqa: E402
from app.settings import Settings  # noqa: E402

LUA = """
local labels = {%(labels)s}
local suffix = "%(suffix)s"
math.randomseed(%(seed)d)
request = function()
  local label = labels[math.random(#labels)]
  return wrk.format("GET", "/runs/1/labels/" .. label .. suffix)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%%d duration_us=%%d p50_us=%%d p95_us=%%d p99_us=%%d "
    .. "connect=%%d read=%%d write=%%d status=%%d timeout=%%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def build(home: Path, *, labels: int, per_label: int, clusters: int, seed: int = 0) -> None:
    """A ready run: `labels` labels, `per_label` patches each in `clusters` clusters."""
    from PIL import Image as PILImage

    settings = Settings(home=home)
    upgrade(settings)
    rng = random.Random(seed)
    crops = home / "runs" / "1" / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        PILImage.new("RGB", (16, 16), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(crops / f"{i}.png")
    images_per_label = per_label // 5
    with session_scope(settings) as session:
        dataset = Dataset(name="synthetic", source="bench", image_count=labels * images_per_label)
        session.add(dataset)
        session.flush()
        label_set = LabelSet(dataset_id=dataset.id, name="label", kind="categorical")
        session.add(label_set)
        session.flush()
        session.execute(insert(Label), [dict(label_set_id=label_set.id, name=f"label {i:03d}",
                                             position=i, image_count=images_per_label)
                                        for i in range(labels)])
        session.execute(insert(Image), [dict(dataset_id=dataset.id, sha256=f"{i:064x}",
                                             stored_path=f"images/{i}.png", thumb_path=f"thumbs/{i}.png",
                                             original_path=f"{i}.png", width=256, height=256)
                                        for i in range(labels * images_per_label)])
        model = TrainedModel(dataset_id=dataset.id, label_set_id=label_set.id, backend="pixel",
                             config={"resolution": 256}, weights_dir="models/1/weights",
                             status="ready")
        session.add(model)
        session.flush()
        session.add(MiningRun(model_id=model.id, preset="paper", params={}, status="ready",
                              stages_done=["score", "patches", "features", "clusters", "crops"]))
    engine = engine_for(settings.db_url)
    patch_id = cluster_id = 0
    with engine.begin() as conn:
        for label in range(1, labels + 1):
            patches, members, cluster_rows = [], [], []
            scores = sorted((rng.random() for _ in range(per_label)), reverse=True)
            for i, score in enumerate(scores):
                patch_id += 1
                image = (label - 1) * images_per_label + i // 5 + 1
                x, y = rng.randrange(200), rng.randrange(200)
                patches.append(dict(id=patch_id, run_id=1, image_id=image, label_id=label,
                                    x0=x, y0=y, x1=x + 50, y1=y + 50, score=score,
                                    feature_row=patch_id - 1,
                                    crop_path=f"runs/1/crops/{patch_id % 1000}.png"))
            first = patch_id - per_label + 1
            for rank in range(clusters):
                cluster_id += 1
                ids = list(range(first + rank, patch_id + 1, clusters))
                cluster_rows.append(dict(id=cluster_id, run_id=1, label_id=label, rank=rank,
                                         size=len(ids), median_typicality=1 - rank / clusters,
                                         coherence=0.8, is_artifact=False))
                members += [dict(cluster_id=cluster_id, patch_id=p, position=n, distance=n / 100)
                            for n, p in enumerate(ids)]
            conn.execute(insert(Patch), patches)
            conn.execute(insert(Cluster), cluster_rows)
            conn.execute(insert(ClusterMember), members)
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(home: Path, workers: int, labels: int):
    port = free_port()
    env = dict(os.environ, DIFFMINE_HOME=str(home))
    command = [sys.executable, "-m", "uvicorn", "app.web:create_app", "--factory", "--host",
               "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level",
               "warning", "--no-access-log", "--backlog", "2048"]
    process = subprocess.Popen(command, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/runs/1/labels/1", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        # Warm every worker process (templates compiled, statements cached).
        for label in range(1, min(labels, 40) + 1):
            urllib.request.urlopen(f"{base}/runs/1/labels/{label}", timeout=5).read()
            urllib.request.urlopen(f"{base}/runs/1/labels/{label}.json", timeout=5).read()
    except BaseException:
        process.terminate()
        raise
    return process, base


def wrk(base: str, *, connections: int, seconds: int, suffix: str, labels: int, threads: int = 2,
        path: str | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if path is None:
            script.write(LUA % {"labels": ",".join(map(str, range(1, labels + 1))),
                                "suffix": suffix, "seed": 1})
        else:
            script.write((LUA % {"labels": "1", "suffix": "", "seed": 1})
                         .replace('"/runs/1/labels/" .. label .. suffix', repr(path).replace("'", '"')))
    output = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                             "--timeout", "5s", "-s", script.name, base], capture_output=True,
                            text=True, check=True).stdout
    os.unlink(script.name)
    fields = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", output.split("RESULT", 1)[1]))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    fields["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    fields["rate"] = fields["requests"] / (fields["duration_us"] / 1e6)
    fields["errors"] = sum(fields[k] for k in ("connect", "read", "write", "timeout")) + fields["non2xx"]
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "diffmine-bench-gallery")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--labels", type=int, default=100,
                        help="labels of 1,000 patches each (the issue's large case: 365)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    labels, per_label, clusters = (10, 1000, 32) if args.quick else (args.labels, 1000, 32)
    seconds = 5 if args.quick else args.seconds
    home = args.home.with_name(args.home.name + ("-quick" if args.quick else
                                                 "" if labels == 100 else f"-{labels}"))
    if args.rebuild or not (home / "diffmine.sqlite").exists():
        shutil.rmtree(home, ignore_errors=True)
        start = time.perf_counter()
        build(home, labels=labels, per_label=per_label, clusters=clusters)
        print(f"built {labels * per_label:,} patches in {labels} labels in "
              f"{time.perf_counter() - start:.0f} s at {home}", file=sys.stderr)
    print(f"# Web gallery benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print(f"{labels * per_label:,} patches in {labels} labels, {clusters} clusters per label; each "
          f"request a random label's gallery page (5 clusters x 10 members = 50 patches); "
          f"wrk 2 threads, {seconds} s per line.\n")
    print(f"Load average before: {os.getloadavg()[0]:.1f} (other processes on the machine "
          f"compete for its cores).\n")
    print("| server | what | connections | pages/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for workers in args.workers:
        process, base = serve(home, workers, labels)
        try:
            for what, suffix in (("HTML", ""), ("JSON", ".json")):
                for connections in (10, 50):
                    r = wrk(base, connections=connections, seconds=seconds, suffix=suffix,
                            labels=labels)
                    print(f"| uvicorn x{workers} | gallery {what} | {connections} | {r['rate']:.0f} | "
                          f"{r['p50_us'] / 1000:.1f} | {r['p95_us'] / 1000:.1f} | "
                          f"{r['p99_us'] / 1000:.1f} | {r['errors']} |", flush=True)
            for what, path in (("crop file", "/files/runs/1/crops/7.png"),
                               (f"dataset page ({labels} labels x 8 samples)", "/datasets/1")):
                r = wrk(base, connections=10, seconds=seconds, suffix="", labels=labels, path=path)
                print(f"| uvicorn x{workers} | {what} | 10 | {r['rate']:.0f} | {r['p50_us'] / 1000:.1f} | "
                      f"{r['p95_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} | {r['errors']} |", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=20)
    print(f"\nLoad average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
