"""Benchmark the patch map at 30,000 patches: the mining job's layout and atlases, then the page in
Debian's chromium (Playwright): time to first draw, and draw and frame times while panning and
zooming at three zoom levels, against drawing every patch as a thumbnail every frame.

    python bench/bench_patch_map.py                # 30 labels x 1,000 patches (~3 min)
    python bench/bench_patch_map.py --patches 3000 # a quick look

The run is synthetic where its content does not matter to the timing: rows written straight
into SQLite (bench/bench_gallery.py's `build`), features drawn from 4 blobs per label
(64-d, unit norm), crops cut at random from 1,000 builtin animal images (28 px, so the atlases
compress like real pixel crops). The layout and atlases are made by the mining stage itself
(`worker.handlers.run_views.mine_map`), the page is the real one. Prints Markdown (the "Patch
map" section of docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from bench_gallery import build, free_port  # noqa: E402

from app.db import session_scope  # noqa: E402
from app.models import MiningRun  # noqa: E402
from app.settings import Settings  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
MAP = "document.querySelector('canvas.patch-map').patchMap"


def make_run(home: Path, *, labels: int, per_label: int, seed: int = 0) -> dict:
    """The synthetic run, then the real map stage over it; returns the stage's timings."""
    from PIL import Image as PILImage

    from app.ingest.builtin import builtin_source
    from worker.handlers.run_views import mine_map

    build(home, labels=labels, per_label=per_label, clusters=8, seed=seed)
    entries, _, close = builtin_source("animals", limit_per_label=100)
    rng = random.Random(seed)
    crops = home / "runs" / "1" / "crops"
    for i, entry in enumerate(entries[:1000]):
        with PILImage.open(io.BytesIO(entry.read())) as image:
            side = rng.randrange(8, 17)
            x, y = rng.randrange(28 - side), rng.randrange(28 - side)
            image.convert("RGB").crop((x, y, x + side, y + side)).save(crops / f"{i}.png")
    close()
    total = labels * per_label
    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(labels * 4, 64))
    blob = np.arange(total) // per_label * 4 + generator.integers(0, 4, total)
    features = np.lib.format.open_memmap(home / "runs" / "1" / "features.npy", mode="w+", dtype=np.float32,
                                         shape=(total, 64))
    for start in range(0, total, 10_000):
        chunk = blob[start:start + 10_000]
        rows = centres[chunk] + generator.normal(scale=0.6, size=(len(chunk), 64))
        features[start:start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    features.flush()
    settings = Settings(home=home)
    timings: dict[str, float] = {}

    def progress(done, total, message=None, **_):
        timings.setdefault(message, time.perf_counter())

    context = SimpleNamespace(settings=settings, check=lambda: None, progress=progress)
    start = time.perf_counter()
    mine_map(context, SimpleNamespace(run_id=1, dir=home / "runs" / "1", seed=seed))
    end = time.perf_counter()
    atlases_from = timings.get("patch map thumbnails", end)
    with session_scope(settings) as session:
        run = session.get(MiningRun, 1)
        run.stages_done = [*run.stages_done, "map"]
    return {"layout_s": atlases_from - start, "atlas_s": end - atlases_from, "total_s": end - start,
            "atlas_bytes": sum(p.stat().st_size for p in (home / "runs/1/map").rglob("atlas-*.png")),
            "points_bytes": sum(p.stat().st_size for p in (home / "runs/1/map").rglob("points.bin"))}


def serve(home: Path):
    port = free_port()
    env = dict(os.environ, DIFFMINE_HOME=str(home), DIFFMINE_PORT=str(port))
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/runs/1/map", timeout=2).read()
            return process, base
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("the server did not answer")


RECORD = """() => {
    const map = MAP;
    map.stats.drawMs = [];
    map.stats.shownLog = [];
    window.__frames = [];
    window.__recording = true;
    const tick = (t) => { window.__frames.push(t); if (window.__recording) requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
}""".replace("MAP", MAP)
STOP = """() => {
    window.__recording = false;
    const map = MAP, f = window.__frames, gaps = [];
    for (let i = 1; i < f.length; i++) gaps.push(f[i] - f[i - 1]);
    return {draws: map.stats.drawMs.slice(), gaps: gaps, shown: map.stats.shownLog.slice(), mode: map.stats.mode,
            seconds: (f[f.length - 1] - f[0]) / 1000};
}""".replace("MAP", MAP)


def wait_js(page, expression: str, timeout: float = 60) -> None:
    """Poll an expression through the DevTools protocol: the page's CSP refuses the eval that
    page.wait_for_function would use."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def gesture(page, box, kind: str, seconds: float) -> dict:
    """Pan in a circle, or zoom in and out around the centre, for about `seconds`."""
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.evaluate(RECORD)
    end = time.perf_counter() + seconds
    if kind == "pan":
        page.mouse.move(cx, cy)
        page.mouse.down()
        angle = 0.0
        while time.perf_counter() < end:
            angle += 0.15
            page.mouse.move(cx + 120 * np.cos(angle), cy + 120 * np.sin(angle))
        page.mouse.up()
    else:
        page.mouse.move(cx, cy)
        step = 0
        while time.perf_counter() < end:
            page.mouse.wheel(0, -60 if step % 20 < 10 else 60)
            page.wait_for_timeout(16)
            step += 1
    page.wait_for_timeout(100)
    return page.evaluate(STOP)


def set_zoom(page, thumbnail_px: float | None, on_a_point: bool = False) -> None:
    """The whole map (None), or a view where a patch is `thumbnail_px` wide, centred on the
    map's centre or on the middle point in the map's order (in a blob, not between blobs);
    waits until every atlas it needs has arrived."""
    page.evaluate(f"{MAP}.reset()")
    if thumbnail_px is not None:
        centre = "const i = Math.floor(m.count / 2); m.cx = m.xs[i]; m.cy = m.ys[i];" if on_a_point else ""
        page.evaluate(f"""(() => {{ const m = {MAP}; {centre}
            m.scale = {thumbnail_px} / m.size; m.redraw(); }})()""")
    page.wait_for_timeout(300)
    page.wait_for_load_state("networkidle")
    wait_js(page, f"Object.values({MAP}.atlases).every(a => a.ready)")


REFERENCE = """async (px) => {
    const map = MAP, c = map.context;
    for (let n = 0; n * map.perAtlas < map.count; n++) map.atlas(n);
    while (!Object.values(map.atlases).every(a => a.ready)) await new Promise(r => setTimeout(r, 50));
    const times = [];
    for (let repeat = 0; repeat < 5; repeat++) {
        const began = performance.now();
        for (let i = 0; i < map.count; i++) {
            const cell = i % map.perAtlas, atlas = map.atlases[Math.floor(i / map.perAtlas)].image;
            const x = (map.xs[i] - map.cx) * map.scale + map.width / 2;
            const y = (map.ys[i] - map.cy) * map.scale + map.height / 2;
            c.drawImage(atlas, (cell % map.columns) * map.thumb, Math.floor(cell / map.columns) * map.thumb,
                        map.thumb, map.thumb, x - px / 2, y - px / 2, px, px);
        }
        c.getImageData(0, 0, 1, 1);  // wait for the drawing to finish
        times.push(performance.now() - began);
    }
    map.redraw();
    return times;
}""".replace("MAP", MAP)


def measure(base: str, seconds: float) -> tuple[list, list, list]:
    from playwright.sync_api import sync_playwright

    rows, first_draws, reference = [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for attempt in range(4):  # the first load fetches the points; later ones have them cached
            if attempt == 0:
                page.goto(base + "/runs/1/map")
            else:
                page.reload()
            wait_js(page, f"!!{MAP} && {MAP}.stats.firstDrawMs !== null")
            first_draws.append(page.evaluate(f"{MAP}.stats.firstDrawMs"))
        box = page.locator("canvas.patch-map").bounding_box()
        views = (("whole map", None, False), ("at the switch to thumbnails, map centre", 17, False),
                 ("at the switch to thumbnails, in a blob", 17, True), ("zoomed in, in a blob", 48, True))
        for name, px, on_a_point in views:
            for kind in ("pan", "zoom"):
                set_zoom(page, px, on_a_point)
                result = gesture(page, box, kind, seconds)
                rows.append(dict(result, view=name, kind=kind))
        set_zoom(page, None)
        reference = page.evaluate(REFERENCE, 17)
        browser.close()
    return rows, first_draws, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=30_000)
    parser.add_argument("--labels", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=3.0, help="per gesture")
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args()
    if not os.path.exists(CHROMIUM):
        sys.exit(f"needs {CHROMIUM}")
    home = args.home or Path(tempfile.mkdtemp(prefix="diffmine-bench-map-")) / "home"
    shutil.rmtree(home, ignore_errors=True)
    load_before = os.getloadavg()[0]
    stage = make_run(home, labels=args.labels, per_label=args.patches // args.labels)
    process, base = serve(home)
    try:
        rows, first_draws, reference = measure(base, args.seconds)
    finally:
        process.terminate()
        process.wait(timeout=20)
    total = args.labels * (args.patches // args.labels)
    print(f"# Patch map benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print(f"{total:,} patches in {args.labels} labels. Load average before: {load_before:.1f}, "
          f"after: {os.getloadavg()[0]:.1f}.\n")
    print(f"Mining stage `map`: layout {stage['layout_s']:.1f} s, atlases {stage['atlas_s']:.1f} s "
          f"(total {stage['total_s']:.1f} s); points file {stage['points_bytes'] / 1024:.0f} KiB, "
          f"atlases {stage['atlas_bytes'] / 2**20:.1f} MiB in all.\n")
    print(f"Time to first draw (navigation start to the map drawn): first load {first_draws[0]:.0f} ms, "
          f"reloads {', '.join(f'{t:.0f}' for t in first_draws[1:])} ms.\n")
    print("| view | gesture | patches drawn (median) | drawn as | draw p50 ms | draw p95 ms | draw max ms | "
          "frames/s | frame gap p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fps = len(r["gaps"]) / r["seconds"] if r["seconds"] else float("nan")
        print(f"| {r['view']} | {r['kind']} | {percentile(r['shown'], 50):,.0f} | {r['mode']} | "
              f"{percentile(r['draws'], 50):.1f} | "
              f"{percentile(r['draws'], 95):.1f} | {max(r['draws'] or [float('nan')]):.1f} | {fps:.0f} | "
              f"{percentile(r['gaps'], 95):.1f} |")
    print(f"\nReference, every patch as a 17 px thumbnail every frame (no level of detail, no culling): "
          f"{np.median(reference):.0f} ms a frame (median of {len(reference)}).")


if __name__ == "__main__":
    main()
