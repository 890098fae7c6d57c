#!/usr/bin/env bash
# Runs the benchmark on whatever hardware is present (torch path on a CPU-only machine).
# Sets up .venv first if needed. Any args go to flashdelta.bench (without a preset or shapes: --preset quick).
source "$(dirname "$0")/env.sh"
cd "$root"
exec "$py" -m flashdelta.bench "$@"
