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

from . import aot


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


# The Triton kernels pyfastpo launches: (module, attribute) of each triton.jit function.
_TRITON_KERNELS = (
    ("pyfastpo.kernels.logps_forward", "_logps_forward_kernel"),
    ("pyfastpo.kernels.logps_backward", "_logps_backward_kernel"),
)


def triton_resources(fns: list | None = None) -> list[dict]:
    """Registers and local memory of every specialization Triton's JIT compiled and
    loaded in this process for ``fns`` (default: pyfastpo's kernels, if imported), read
    from the JIT's cache of launched kernels (``CompiledKernel.n_regs``, ``n_spills``:
    set when the kernel is loaded on the device)."""
    if fns is None:
        fns = [getattr(sys.modules[m], a) for m, a in _TRITON_KERNELS if m in sys.modules]
    rows = []
    for fn in fns:
        for caches in getattr(fn, "device_caches", {}).values():
            for kernel in caches[0].values():  # (kernel cache, key cache, target, backend, binder)
                src, meta = kernel.src, kernel.metadata
                names = src.fn.arg_names
                consts = {names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
                # attrs: {(index,): [["tt.divisibility", 16]] or [] (not divisible)}
                divisible = {names[k[0]] for k, v in src.attrs.items() if len(k) == 1 and ["tt.divisibility", 16] in v}
                aligned = {"logits_ptr", "V", "stride_t"} <= divisible
                spills = getattr(kernel, "n_spills", None)
                dtype = src.signature["logits_ptr"].lstrip("*")
                spec = "aligned" if aligned else "unaligned"
                config = f"{dtype},BLOCK_V={consts.get('BLOCK_V')},{meta.num_warps} warps,{spec}"
                rows.append(
                    {
                        "backend": "triton",
                        "kernel": f"{fn.__name__}<{config}>",
                        "arch": f"sm_{meta.target.arch}",
                        "registers": getattr(kernel, "n_regs", None),
                        "local_bytes": None if spills is None else 4 * spills,  # n_spills is local bytes / 4
                    }
                )
    return sorted(rows, key=lambda r: r["kernel"])


def cuda_resources(dtype: str | None = None, arch: str | None = None) -> list[dict]:
    """Registers and local memory of the CUDA extension's kernels for ``dtype`` (all if
    None), from ``cuobjdump -res-usage`` of the built module: its SASS for ``arch``
    ("90"; default: the current device's). Empty when the extension was not imported
    (the run did not use it); "unknown" registers without cuobjdump or that SASS."""
    module = sys.modules.get("pyfastpo.backends._cuda")
    if module is None:
        return []
    if arch is None:
        arch = "{}{}".format(*torch.cuda.get_device_capability())
    unknown = {"backend": "cuda", "kernel": "all", "arch": f"sm_{arch}", "local_bytes": None}
    try:
        usage = subprocess.run(
            [aot.cuobjdump(), "-res-usage", module.__file__], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return [{**unknown, "registers": f"unknown (cuobjdump: {aot.first_line(err)})"}]
    found = aot.parse_res_usage(usage).get(arch)
    if not found:
        return [{**unknown, "registers": f"unknown (no sm_{arch} SASS in the extension: its PTX was JIT-compiled)"}]
    rows = [
        {
            "backend": "cuda",
            "kernel": aot.short_name(name),
            "arch": f"sm_{arch}",
            "registers": regs,
            "local_bytes": local,
        }
        for name, (regs, local) in found.items()
    ]
    return sorted((r for r in rows if dtype is None or f"<{dtype}," in r["kernel"]), key=lambda r: r["kernel"])


def kernel_resources(dtype: str | None = None) -> list[dict] | None:
    """The GPU kernels this process launched, with registers and local memory (None
    without a CUDA device): the bench records it after its sweep. ``dtype``: the
    bench's ("bfloat16"), to list only the CUDA extension's kernels of that dtype."""
    if not torch.cuda.is_available():
        return None
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    return triton_resources() + cuda_resources(short)


def kernel_lines(kernels: list[dict]) -> list[str]:
    """Markdown list items, one per kernel of :func:`kernel_resources`."""
    out = []
    for k in kernels:
        regs = k["registers"]
        local = "?" if k["local_bytes"] is None else k["local_bytes"]
        what = f"{regs} registers, {local} bytes local memory" if isinstance(regs, int) else regs or "unknown"
        out.append(f"  - {k['backend']} `{k['kernel']}` ({k['arch']}): {what}")
    return out
