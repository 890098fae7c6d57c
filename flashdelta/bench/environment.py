"""What the numbers were measured on: device, driver, library versions, date, command line."""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

# distribution name -> module name (for __version__ when installed without metadata, e.g. on PYTHONPATH)
LIBRARIES = {"torch": "torch", "triton": "triton", "tilelang": "tilelang", "fla-core": "fla",
             "flash-qla": "flash_qla", "flashdelta": "flashdelta"}


def version(dist: str, module: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    mod = sys.modules.get(module)            # only modules already loaded: importing fla here has side effects
    return getattr(mod, "__version__", None) if mod else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def short_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'; CPUs -> 'cpu'. For file names."""
    if name.startswith("CPU"):
        return "cpu"
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return match.group(1) if match else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 (12 hex digits) over flashdelta's Python sources, path by path: identifies the code that ran
    where git cannot (the GPU machine's copy of the tree may carry a stale .git)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment(device: torch.device, command: str) -> dict:
    env = {"device_name": device_name(device), "driver": None, "cuda": torch.version.cuda,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command,
           "versions": {dist: version(dist, mod) for dist, mod in LIBRARIES.items()},
           "flashdelta_commit": _git_commit(),
           "flashdelta_sources": source_digest(),
           "cache_dirs": {k: os.environ.get(k) for k in ("TILELANG_CACHE_DIR", "TRITON_CACHE_DIR")}}
    if device.type == "cuda":
        env["driver"] = _driver()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env
