#!/usr/bin/env bash
# Runs the whole test suite: CPU tests, the sm_90a compile checks (needs nvcc; no GPU), and the
# GPU tests when a CUDA GPU is present. Sets up .venv first if needed. Extra args go to pytest.
source "$(dirname "$0")/env.sh"
cd "$root"
exec "$py" -m pytest -q "$@"
