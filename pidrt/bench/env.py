"""Where a benchmark ran: device name, library versions, git commit, date."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "polygraphy", "triton", "numpy", "pidrt")


def cpu_name() -> str:
    """lscpu's model name, else /proc/cpuinfo's, else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False, env={**os.environ, "LC_ALL": "C"})
        for line in out.stdout.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_average_start": load_average()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info |= {"name": torch.cuda.get_device_name(index), "capability": f"sm_{props.major}{props.minor}",
                 "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    else:
        info["name"] = info["cpu"]
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes on a shared machine skew timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path | None = None) -> dict:
    """HEAD, and `dirty`: whether the working tree differs from it in tracked files or has untracked
    files under pidrt/ (code the run used that HEAD does not hold). Read-only: no locks taken."""
    repo = repo or Path(__file__).resolve().parents[2]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20, env=env, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        untracked = git("status", "--porcelain", "--untracked-files=normal", "--", "pidrt")
        if status.returncode or untracked.returncode:
            return {"commit": head.stdout.strip(), "dirty": None}
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip() or untracked.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
