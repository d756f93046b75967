"""Where a benchmark ran: device name, library versions, date, git commit, command."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from pyfastpo.backends import cpp_backend
from pyfastpo.version import __version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} torch threads"


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist`` (its pip name, e.g. "liger-kernel"), or
    "not installed". The one place the bench reads package metadata."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def cpp_isa() -> str:
    """The instruction set the ``cpp`` backend's row kernels use here (avx512, avx2,
    default): CPU timings of that backend depend on it."""
    reason = cpp_backend.unavailable_reason(torch.device("cpu"))
    return cpp_backend.isa() if reason is None else f"unavailable ({reason})"


def git_commit() -> str:
    """The checkout's commit (with "+ uncommitted changes" when the tracked tree differs), or "unknown"."""
    root = Path(__file__).resolve().parents[2]  # the checkout holding pyfastpo/

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode:
            return "unknown (not a git checkout)"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not found)"


def command_line(argv: list[str] | None) -> str:
    """The command that reproduces this run."""
    args = sys.argv[1:] if argv is None else list(argv)
    script = argv is None and Path(sys.argv[0]).name == "pyfastpo-bench"
    prog = "pyfastpo-bench" if script else "python -m pyfastpo.bench"
    return " ".join([prog, *map(shlex.quote, args)])


def describe(device: torch.device, argv: list[str] | None) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "pyfastpo": __version__,
        "python": platform.python_version(),
        "cpp_isa": cpp_isa(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": command_line(argv),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
