"""Ahead-of-time view of the GPU kernels, on a machine without a GPU.

Compiles the CUDA kernels (nvcc, ``csrc/cuda_logps.cu``) and the Triton kernels
(``triton.compile`` with a ``GPUTarget``) for a GPU architecture, disassembles them
with ``cuobjdump`` (shipped in the triton wheel) and reports, per kernel: registers,
local memory (spills), and the hot loop's SASS instructions per element. A
memory-bound kernel reaches HBM bandwidth only if the SM can issue its inner loop
fast enough (an H100 SM issues 4 warp-instructions per clock; at ~3 TB/s over 132
SMs a bf16 element arrives every ~0.1 ns per SM), so instructions per element is
the number to keep down. ``tests/test_aot_budget.py`` holds the budgets.

The hot loop is found from the SASS itself: a backward branch closes a loop; the
innermost loops that load from global memory are candidates, and the one moving
the most bytes per iteration is the hot one (the unrolled main loop, not its
remainder). Instructions per element = its instruction count / the elements its
global loads bring in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass
class Instr:
    """One SASS instruction: address, opcode with modifiers (``LDG.E.128``), operands."""

    addr: int
    op: str
    operands: str


@dataclass
class Loop:
    """Instructions from a backward branch's target to the branch, inclusive."""

    start: int
    end: int
    body: list = field(default_factory=list)

    def load_bytes(self) -> int:
        """Bytes read from global memory per iteration (``LDG``; ``.CONSTANT`` is the
        read-only cache path of ``__restrict__`` loads, still global memory)."""
        total = 0
        for ins in self.body:
            if ins.op.startswith("LDG"):
                width = [m for m in ins.op.split(".")[1:] if m in _LOAD_BYTES]
                total += _LOAD_BYTES[width[0]] if width else 4
        return total


@dataclass
class KernelCode:
    """One compiled kernel: its resources and SASS."""

    name: str
    registers: int
    local_bytes: int
    sass: list

    def loops(self) -> list:
        """Every loop (backward branch), innermost first."""
        found = []
        for ins in self.sass:
            if ins.op.startswith("BRA"):
                target = re.search(r"0x([0-9a-f]+)", ins.operands)
                if target and int(target.group(1), 16) <= ins.addr:
                    start = int(target.group(1), 16)
                    found.append(Loop(start, ins.addr, [x for x in self.sass if start <= x.addr <= ins.addr]))
        return sorted(found, key=lambda lp: lp.end - lp.start)

    def hot_loop(self, needs: str = "MUFU.EX2") -> Loop | None:
        """The innermost global-memory loop holding a ``needs`` instruction (the kernels'
        exp: this skips rare paths such as a NaN re-scan) that moves the most bytes per
        iteration (the unrolled main loop, not its remainder)."""
        loops = self.loops()
        inner = [lp for lp in loops if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)]
        candidates = [lp for lp in inner if lp.load_bytes() > 0 and any(i.op.startswith(needs) for i in lp.body)]
        return max(candidates, key=lambda lp: (lp.load_bytes(), -len(lp.body)), default=None)

    def instructions_per_element(self, elem_bytes: int, needs: str = "MUFU.EX2") -> float | None:
        """The hot loop's instruction count per element loaded (None without such a loop)."""
        loop = self.hot_loop(needs)
        if loop is None:
            return None
        return len(loop.body) / (loop.load_bytes() / elem_bytes)


def cuobjdump() -> str:
    """Path of ``cuobjdump``: on PATH, else the copy in the triton wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError("cuobjdump: not on PATH and not in the triton wheel")
    return str(path)


def parse_cubin(cubin: Path) -> dict:
    """``{mangled name: KernelCode}`` of every kernel in a cubin."""
    tool = cuobjdump()
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = {}
    for name, regs, stack, local in re.findall(
        r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage
    ):
        resources[name] = (int(regs), int(stack) + int(local))
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    kernels = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        instrs = [Instr(int(a, 16), op, rest.strip()) for a, _, op, rest in _LINE.findall(body)]
        regs, local = resources.get(name.strip(), (-1, -1))
        kernels[name.strip()] = KernelCode(name.strip(), regs, local, instrs)
    return kernels


def compile_cuda(arch: int = 90, source: Path = ROOT / "csrc" / "cuda_logps.cu") -> dict:
    """Compile the CUDA kernels for ``sm_<arch>`` with setup.py's flags; ``{name: KernelCode}``."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [
            nvcc,
            "-O3",
            "-std=c++17",
            f"-arch=sm_{arch}",
            "-cubin",
            f"-I{source.parent}",
            str(source),
            "-o",
            str(cubin),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return parse_cubin(cubin)


def compile_triton(
    fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90, divisible: tuple = ()
) -> KernelCode:
    """Compile one Triton kernel for ``sm_<arch>`` without a GPU; its KernelCode.

    ``divisible``: argument names the launch would find divisible by 16 (pointers
    16-byte aligned, integers multiples of 16). Triton's JIT specializes on exactly
    that at run time, and it decides whether loads are vectorized: without it the
    compiled code is the pessimistic one of an odd vocabulary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        (code,) = parse_cubin(cubin).values()
    return code


def short_name(mangled: str) -> str:
    """``forward<bf16,vec,512>``-style name of a cuda_logps.cu kernel: dtype, then the
    vector kernel at its block size (template argument THREADS) or ``scalar`` (THREADS = 0)."""
    kind = "forward" if "forward_kernel" in mangled else "backward" if "backward_kernel" in mangled else mangled
    dtype = "bf16" if "nv_bfloat16" in mangled else "fp16" if "__half" in mangled else "fp32"
    threads = re.search(r"Li(\d+)E", mangled)
    variant = "scalar" if threads is None or threads.group(1) == "0" else f"vec,{threads.group(1)}"
    return f"{kind}<{dtype},{variant}>"


ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def triton_kernels(arch: int = 90, vocab: int = 128256) -> dict:
    """``{"forward<bf16>": KernelCode, ...}``: the Triton kernels at their launch
    configuration for ``vocab``. Needs TRITON_INTERPRET unset when triton was first
    imported (the interpreter replaces the kernels): :func:`report` runs it in a
    fresh process."""
    import torch

    from pyfastpo.kernels import logps_backward, logps_forward
    from pyfastpo.kernels.config import launch_config

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    common = {"T": "i32", "V": "i32", "stride_n": "i64", "stride_t": "i64"}
    out = {}
    for dtype in ELEM_BYTES:
        block, warps = launch_config(vocab, torch_dtype[dtype])
        fwd = {
            "logits_ptr": f"*{dtype}",
            "labels_ptr": "*i64",
            "logp_ptr": "*fp32",
            "max_ptr": "*fp32",
            "log_sum_ptr": "*fp32",
            "entropy_ptr": "*fp32",
            "sum_logits_ptr": "*fp32",
            **common,
            "ignore_index": "i64",
            "BLOCK_V": "constexpr",
            "VEC": "constexpr",
        }
        bwd = {
            "logits_ptr": f"*{dtype}",
            "labels_ptr": "*i64",
            "max_ptr": "*fp32",
            "log_sum_ptr": "*fp32",
            "grad_scale_ptr": "*fp32",
            "out_ptr": f"*{dtype}",
            **common,
            "out_stride_n": "i64",
            "out_stride_t": "i64",
            "ignore_index": "i64",
            "BLOCK_V": "constexpr",
        }
        # As launched on contiguous logits with V = 128256 (a multiple of 16): aligned
        # pointers, V and the strides divisible by 16 (T too, in the usual case).
        aligned = tuple(k for k, v in fwd.items() if v.startswith("*") or k in ("T", "V", "stride_n", "stride_t"))
        out[f"forward<{dtype}>"] = compile_triton(
            logps_forward._logps_forward_kernel,
            fwd,
            {"BLOCK_V": block, "VEC": min(block, 16 // ELEM_BYTES[dtype])},
            warps,
            arch,
            aligned,
        )
        aligned = tuple(k for k, v in bwd.items() if v.startswith("*") or k in ("T", "V") or "stride" in k)
        out[f"backward<{dtype}>"] = compile_triton(
            logps_backward._logps_backward_kernel, bwd, {"BLOCK_V": block}, warps, arch, aligned
        )
    return out


def _row(backend: str, name: str, code: KernelCode) -> dict:
    dtype = re.search(r"<(\w+)", name).group(1)
    per_element = code.instructions_per_element(ELEM_BYTES[dtype])
    return {
        "backend": backend,
        "kernel": name,
        "registers": code.registers,
        "local_bytes": code.local_bytes,
        "per_element": None if per_element is None else round(per_element, 3),
    }


def report(arch: int = 90) -> list:
    """Registers, local memory and hot-loop instructions per element of every kernel,
    CUDA and Triton, compiled for ``sm_<arch>``: a list of dicts."""
    import json
    import sys

    rows = [
        _row("cuda", short_name(n), c) for n, c in sorted(compile_cuda(arch).items(), key=lambda kv: short_name(kv[0]))
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json; from pyfastpo.bench import aot; "
        f"print(json.dumps([aot._row('triton', n, c) for n, c in aot.triton_kernels({arch}).items()]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return rows + json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """``python -m pyfastpo.bench.aot [ARCH]``: the report as a markdown table."""
    import sys

    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    print(f"| backend | kernel (sm_{arch}) | registers | local bytes | SASS instructions / element (hot loop) |")
    print("|---|---|---|---|---|")
    for r in report(arch):
        print(f"| {r['backend']} | {r['kernel']} | {r['registers']} | {r['local_bytes']} | {r['per_element']} |")


if __name__ == "__main__":
    main()
