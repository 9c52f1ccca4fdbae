#!/usr/bin/env bash
# Stamping benchmark (see bench.py): builds cellplane and sample-cell, then compares
# cellplane's stamp of a `local` cell with bare terraform on the same rendered stack, and
# times 20 cells at concurrency 4. Prints a markdown table.
#   bench/stamp/run.sh                 # release build
#   PROFILE=dev bench/stamp/run.sh     # debug build (faster to build)
#   REPS=11 FLEET=20 CONCURRENCY=4 bench/stamp/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
    cargo build --release -p cellplane -p sample-cell >&2
    dir=release
else
    cargo build -p cellplane -p sample-cell >&2
    dir=debug
fi
target=${CARGO_TARGET_DIR:-$PWD/target}
export CELLPLANE_BIN="$target/$dir/cellplane" SAMPLE_CELL_BIN="$target/$dir/sample-cell"
export TEMPLATES_DIR="$PWD/cell-templates"
exec python3 bench/stamp/bench.py
