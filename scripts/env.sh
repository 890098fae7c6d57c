# Sourced by the other scripts: make sure .venv exists with torch and flashdelta (+ test/bench extras).
# Idempotent: a second run only re-checks. Override the interpreter with PYTHON=...
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
# torch first and pinned: on these machines torch==2.13.0 is a local CPU wheel; an unpinned torch would pull a CUDA build.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
"$py" -c "import flashdelta, pytest, matplotlib, transformers" 2>/dev/null || "$py" -m pip install -q -e "$root[test,bench]"
