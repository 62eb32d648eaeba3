"""Environment record for benchmark results: card, driver, CUDA, library versions, commit, host.

Versions come from package metadata of modules that are importable (found on the path); heavy
packages (tensorrt_llm) are not imported just to read a version.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__

# module name -> distribution names to try (the first that has metadata wins)
PACKAGES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "tensorrt_llm": ("tensorrt_llm", "tensorrt-llm"),
    "modelopt": ("nvidia-modelopt",),
    "triton": ("triton", "pytorch-triton"),
    "tritonclient": ("tritonclient",),
    "numpy": ("numpy",),
    "af3trt": ("af3trt",),
}
REPO = Path(__file__).resolve().parents[2]


def package_version(module: str, dists: tuple[str, ...]) -> str | None:
    """Version of an importable module (None when it is not on the path)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if module == "af3trt":
        return __version__
    return "importable (version unknown)"


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_record(repo: Path = REPO) -> dict:
    """Commit of the working tree (read-only git calls); AF3TRT_GIT_COMMIT when there is no .git."""
    if shutil.which("git") and (repo / ".git").exists():
        commit = _run(["git", "rev-parse", "HEAD"], repo)
        if commit:
            dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
            return {"commit": commit, "dirty": bool(dirty), "source": "git"}
    env = os.environ.get("AF3TRT_GIT_COMMIT")
    if env:
        return {"commit": env, "dirty": None, "source": "AF3TRT_GIT_COMMIT"}
    return {"commit": None, "dirty": None, "source": "no .git and no AF3TRT_GIT_COMMIT"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_record() -> dict | None:
    """The CUDA card torch sees (None without CUDA): name, capability, memory, SMs, driver."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    smi = None
    if shutil.which("nvidia-smi"):
        smi = _run(["nvidia-smi", f"--id={i}", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                    "--format=csv,noheader"])
    fields = [f.strip() for f in smi.split(",")] if smi else []
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 2),
        "sm_count": props.multi_processor_count,
        "driver": fields[0] if fields else None,
        "max_sm_clock": fields[1] if len(fields) > 1 else None,
        "max_mem_clock": fields[2] if len(fields) > 2 else None,
        "power_limit": fields[3] if len(fields) > 3 else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def environment() -> dict:
    """Everything a reader needs to compare two benchmark files (STYLE rule 13)."""
    try:
        import torch

        cuda = torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        threads = torch.get_num_threads()
    except ImportError:
        cuda = cudnn = threads = None
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
                 "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": threads},
        "gpu": gpu_record(),
        "cuda": cuda,
        "cudnn": cudnn,
        "versions": {m: package_version(m, d) for m, d in PACKAGES.items()},
        "git": git_record(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="print (or write) the benchmark environment record as JSON")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    text = json.dumps(environment(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
