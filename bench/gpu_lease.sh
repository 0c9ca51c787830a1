#!/usr/bin/env bash
# On a lent GPU machine, from the repository root, with $OUT set by the device tool:
#
#     bash bench/gpu_lease.sh [BUDGET_S]        # default 240 s of measuring, stopped at BUDGET_S + 60 s
#
# Installs the wheels carried in .whl/ (if any; the machine cannot download) into /tmp/site,
# shows what the machine has, then runs bench/gpu_pixel_throughput.py within the budget, writing
# $OUT/gpu_pixel_throughput.json and a copy of the log to $OUT/gpu_pixel_throughput.log.
set -u
BUDGET_S="${1:-240}"
OUT="${OUT:-/tmp/gpu-bench-out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
PYTHON="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 3; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ folder: using the machine's own packages"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  "$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "triton", "diffusers", "huggingface_hub", "safetensors", "sqlalchemy", "pydantic",
             "pydantic_settings", "numpy", "PIL"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:
        print(f"{name} MISSING: {type(error).__name__}: {error}")
EOF
  # hard stop: the script skips what does not fit in BUDGET_S; if something hangs, SIGTERM (it saves
  # its JSON and kills its child process) and SIGKILL 15 s later
  timeout -k 15 $((BUDGET_S + 60)) "$PYTHON" bench/gpu_pixel_throughput.py --budget-s "$BUDGET_S" \
    --out "$OUT/gpu_pixel_throughput.json"
  echo "exit code $?"
} 2>&1 | tee "$OUT/gpu_pixel_throughput.log"
