"""bench/bench_image_size.py's CPU path runs and reports what docs/benchmarks.md quotes."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_image_size.py"


def test_quick_path_reports_scoring_and_planted(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_image_size", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--quick", "--sections", "scoring,planted", "--steps", "2", "--images", "8",
                         "--draws", "2", "--out", str(tmp_path / "out.json")])
    sizes = [row["image_size"] for row in report["scoring"]]
    assert sizes == [32, 64] and report["scoring"][0]["vs_32"] == 1
    assert report["scoring"][-1]["shape"] == [64, 96]  # the whole 3:2 image
    variants = report["planted"]["variants"]
    assert len(variants) == 5 and all(0 <= v["top_patches_on_mark"] <= 1 for v in variants.values())
    assert sum("tiles" in name for name in variants) == 2
    assert (tmp_path / "out.json").exists()
