#!/usr/bin/env bash
# The GPU path against the eager one, same run: training triples/s, full-catalogue users/s, served req/s, and
# CPU-vs-device equality (docs/performance.md, "GPU path"; benchmarks/gpu.py says what each row is).
#   bash benchmarks/gpu.sh                              # on a CUDA machine (an H200: under 6 minutes)
#   bash benchmarks/gpu.sh --device cpu --quick         # dry run where there is no GPU
#   bash benchmarks/gpu.sh --json /tmp/gpu.json         # also every row as JSON
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PYTHON" -m benchmarks.gpu "$@"
