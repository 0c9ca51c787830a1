"""bench/gpu_check.py is run once on a lent GPU; make sure the script itself works, on CPU."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_quick(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "| pixel | fp32 |" in run.stdout
    assert out.exists()


def test_gpu_fast_options_runs_on_cpu_quick(tmp_path):
    """The script of the half-precision comparison (bench/gpu_fast_options.py), its SD part."""
    import json

    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_fast_options.py"), "--cpu", "--quick",
                          "--parts", "sd", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "sd.json").read_text())["rows"]
    assert [r["option"].split(",")[0] for r in rows] == ["paper fp32", "paper fp32", "paper fp16",
                                                          "fast fp16 (24 stratified draws)"]
    assert rows[0]["spearman"] == 1.0 and all(-1 <= r["spearman"] <= 1 for r in rows)
