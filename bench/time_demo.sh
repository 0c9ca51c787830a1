#!/usr/bin/env bash
# Time the README's first command as a newcomer runs it: a fresh clone, an empty pip cache,
# `make demo`, until the galleries' URL is printed. Usage: bench/time_demo.sh [REPO]
set -u
repo=${1:-$(git rev-parse --show-toplevel)}
work=$(mktemp -d)
git clone -q "$repo" "$work/clone" && cd "$work/clone" || exit 1
mkdir "$work/pip-cache"
start=$(date +%s)
PIP_CACHE_DIR="$work/pip-cache" DIFFMINE_PORT=${DIFFMINE_PORT:-8765} make demo > "$work/demo.log" 2>&1 &
pid=$!
while sleep 2; do
  if grep -q "http://127.0.0.1" "$work/demo.log"; then
    echo "galleries served after $(( $(date +%s) - start )) s (log: $work/demo.log)"; break
  fi
  kill -0 $pid 2>/dev/null || { echo "make demo exited after $(( $(date +%s) - start )) s"; break; }
done
pkill -P $pid; pkill -f "$work/clone/.venv/bin/python"
