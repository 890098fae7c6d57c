#!/usr/bin/env bash
# Runs the benchmark on whatever hardware is present (torch path on a CPU-only machine).
# Sets up .venv first if needed. Default: the quick preset; any args go to flashdelta.bench.
source "$(dirname "$0")/env.sh"
cd "$root"
if [ $# -eq 0 ]; then set -- --preset quick; fi
exec "$py" -m flashdelta.bench "$@"
