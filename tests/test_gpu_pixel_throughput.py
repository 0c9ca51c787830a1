"""bench/gpu_pixel_throughput.py runs once on a lent GPU: check its CPU quick path end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cpu_quick_path_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_pixel_throughput.py"), "--device", "cpu",
                          "--quick", "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "startup_flags", "spec_peak", "matmul_ceiling", "models", "grid", "e2e", "skipped",
            "best", "elapsed_s"} <= set(report)
    assert report["device"]["type"] == "cpu" and report["spec_peak"]["tflops"] is None  # no spec peak for a CPU

    demo = report["models"]["demo"]
    assert demo["architecture_of_size"] == "small" and positive(demo["parameters"]) and positive(demo["flops_per_row"])

    grid = [r for r in report["grid"] if r["status"] == "ok"]
    assert {(r["batch"], r["channels_last"]) for r in grid} == {(8, False), (16, False), (8, True), (16, True)}
    for row in grid:
        for key in ("ms_per_call", "calls_per_s", "rows_per_s", "tflops", "paper_images_per_s_ceiling"):
            assert positive(row[key]), (key, row)
    assert report["best"]["demo_eager"]["rows_per_s"] == max(r["rows_per_s"] for r in grid)

    rows = {r["name"]: r for r in report["e2e"]["rows"]}
    assert set(rows) == {"reference", "floor (seed 1)", "current", "best eager (in a child process)"}
    assert report["e2e"]["path"] == "worker.handlers.score.compute_shard"
    for row in rows.values():
        assert row["status"] == "ok", row
        assert positive(row["images_per_s"]) and positive(row["speedup_vs_current"]) and row["images"] == 8
        for key in ("max_abs_score_diff", "max_score_diff_in_ref_stderr", "max_abs_map_diff"):
            assert math.isfinite(row[key]) and row[key] >= 0
        assert -1 <= row["spearman"] <= 1
    assert rows["reference"]["max_abs_score_diff"] == 0 and rows["reference"]["spearman"] == 1
    # the same draws through another process and layout: equal up to float rounding
    assert rows["best eager (in a child process)"]["max_score_diff_in_ref_stderr"] < 0.01
    assert rows["floor (seed 1)"]["max_abs_score_diff"] > 0  # other draws, other numbers
    assert any(s["phase"] == "compile" for s in report["skipped"])  # no compile on CPU by default
    assert "| demo | eager | fp32 |" in run.stdout
