"""Peak memory of ingesting one large image (docs/security.md, "Ingest input").

    python bench/bench_ingest_memory.py [--side 7900] [--modes RGB,L,RGBA,LA]

For each image mode, a zip holding one side x side PNG (a few KB: the pixels are flat) and a
tiny one are ingested by fresh `diffmine ingest` processes; each reports its own peak resident
memory (VmHWM: ru_maxrss would also count the parent's, from before exec). The table gives the
large image's peak above the tiny one's, and per pixel.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PEAK = """
import sys
from app.cli import main
code = main(["ingest", sys.argv[1], "--name", "x", "--min-per-label", "1", "--home", sys.argv[2], "--json"])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(peak * 1024, code)
"""


def zip_of(folder: Path, name: str, mode: str, side: int) -> Path:
    """Two labels, one image each: the large (or tiny) one and a 9 x 9 companion."""
    path = folder / f"{name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for label, size in (("a", side), ("b", 9)):
            buffer = io.BytesIO()
            Image.new(mode, (size, size)).save(buffer, format="PNG")
            archive.writestr(f"{label}/{name}.png", buffer.getvalue())
    return path


def peak_bytes(zip_path: Path, home: Path) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK, str(zip_path), str(home)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    peak, code = done.stdout.split()[-2:]
    if code != "0":
        raise SystemExit(done.stderr)
    return int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=7_900)
    parser.add_argument("--modes", default="RGB,L,RGBA,LA")
    args = parser.parse_args()
    print(f"| mode | peak above a tiny image (MiB) | bytes per pixel | ({args.side} x {args.side} PNG) |")
    print("|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for mode in args.modes.split(","):
            tiny = peak_bytes(zip_of(folder, f"tiny-{mode}", mode, 8), folder / f"home-tiny-{mode}")
            large = peak_bytes(zip_of(folder, f"large-{mode}", mode, args.side), folder / f"home-{mode}")
            above = large - tiny
            print(f"| {mode} | {above / 2**20:.0f} | {above / args.side ** 2:.1f} | |", flush=True)


if __name__ == "__main__":
    main()
