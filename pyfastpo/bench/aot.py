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

Every launch configuration: :func:`sweep` compiles the Triton kernels at each
``(dtype, BLOCK_V, num_warps)`` that ``launch_config`` picks for :data:`VOCABS`, with the
aligned and the unaligned specialization, and the CUDA kernels, for each of :data:`ARCHS`
(in parallel processes); :func:`problems` says what a row fails (compilation, spills,
16-byte vectors). ``tests/test_aot_configs.py`` holds it to that;
``python -m pyfastpo.bench.aot --configs [--full]`` prints the table.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
_ACCESS_BYTES = {"256": 32, "128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def access_bytes(op: str) -> int:
    """Bytes one thread moves with a global load or store opcode: ``LDG.E.128`` 16,
    ``STG.E.U16`` 2, ``LDG.E`` (no width modifier) 4."""
    width = [m for m in op.split(".")[1:] if m in _ACCESS_BYTES]
    return _ACCESS_BYTES[width[0]] if width else 4


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
        return sum(access_bytes(ins.op) for ins in self.body if ins.op.startswith("LDG"))

    def widths(self, prefix: str) -> list:
        """The distinct widths in bytes of this loop's ``prefix`` accesses (``"LDG"``, ``"STG"``)."""
        return sorted({access_bytes(ins.op) for ins in self.body if ins.op.startswith(prefix)})


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


_RESOURCES = re.compile(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict:
    """``{arch: {mangled name: (registers, local bytes)}}`` from ``cuobjdump -res-usage``
    of a cubin (arch None) or of a fat binary / shared library (one section per
    ``arch = sm_XX``). Local bytes count the stack too (spills live there)."""
    out = {}
    arch = None
    for part in re.split(r"(arch = sm_\w+)", text):
        found = re.fullmatch(r"arch = sm_(\w+)", part)
        if found:
            arch = found.group(1)
            continue
        for name, regs, stack, local in _RESOURCES.findall(part):
            out.setdefault(arch, {})[name] = (int(regs), int(stack) + int(local))
    return out


def parse_cubin(cubin: Path, sass: bool = True) -> dict:
    """``{mangled name: KernelCode}`` of every kernel in a cubin; ``sass`` False: resources
    only, no disassembly (``cuobjdump -sass`` costs ~0.5 s of CPU per Triton kernel, most
    of a compilation's time; its ``sass`` is then empty)."""
    tool = cuobjdump()
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = {}
    for per_arch in parse_res_usage(usage).values():
        resources.update(per_arch)
    if not sass:
        return {name: KernelCode(name, regs, local, []) for name, (regs, local) in resources.items()}
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    kernels = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        instrs = [Instr(int(a, 16), op, rest.strip()) for a, _, op, rest in _LINE.findall(body)]
        regs, local = resources.get(name.strip(), (-1, -1))
        kernels[name.strip()] = KernelCode(name.strip(), regs, local, instrs)
    return kernels


def nvcc() -> str:
    return shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")


def _nvcc_command(arch: int, source: Path, cubin: Path) -> list:
    """setup.py's flags, one architecture, a cubin out."""
    return [
        nvcc(),
        "-O3",
        "-std=c++17",
        f"-arch=sm_{arch}",
        "-cubin",
        f"-I{source.parent}",
        str(source),
        "-o",
        str(cubin),
    ]


_CUDA_SOURCE = ROOT / "csrc" / "cuda_logps.cu"
_cuda_cache: dict = {}  # arch -> {name: KernelCode} of _CUDA_SOURCE: each architecture is compiled once per process


def compile_cuda(arch: int = 90, source: Path = _CUDA_SOURCE) -> dict:
    """Compile the CUDA kernels for ``sm_<arch>`` with setup.py's flags; ``{name: KernelCode}``."""
    if source == _CUDA_SOURCE and arch in _cuda_cache:
        return _cuda_cache[arch]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        subprocess.run(_nvcc_command(arch, source, cubin), check=True, capture_output=True, text=True)
        code = parse_cubin(cubin)
    if source == _CUDA_SOURCE:
        _cuda_cache[arch] = code
    return code


def nvcc_unsupported(arch: int) -> str | None:
    """Why nvcc cannot compile for ``sm_<arch>`` here (None: it can)."""
    try:
        listed = subprocess.run([nvcc(), "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return f"nvcc not usable ({first_line(err)})"
    return None if f"compute_{arch}" in listed.split() else f"nvcc does not list compute_{arch} (--list-gpu-arch)"


def triton_unsupported(arch: int) -> str | None:
    """Why the installed triton cannot compile for ``sm_<arch>`` (None: it can): the
    ptxas it runs for that architecture must accept the target name it passes."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        ptxas = get_ptxas(arch).path
        name = sm_arch_from_capability(arch)
        usage = subprocess.run([ptxas, "--help"], capture_output=True, text=True, check=True).stdout
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot target it"
        return f"triton's NVIDIA backend is not usable ({first_line(err)})"
    return None if f"'{name}'" in usage else f"triton's ptxas ({ptxas}) does not accept --gpu-name {name}"


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def use_checkout_kernels() -> None:
    """Import ``pyfastpo.kernels`` from this checkout's ``kernels/`` (as ``csrc/`` is):
    an editable install maps that package to the checkout it was installed from,
    which in a second git worktree is not the one under test. A no-op when the
    package is already imported or when this is no source checkout (a wheel)."""
    import importlib.util
    import sys

    init = ROOT / "kernels" / "__init__.py"
    if "pyfastpo.kernels" in sys.modules or not init.exists():
        return
    spec = importlib.util.spec_from_file_location(
        "pyfastpo.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyfastpo.kernels"] = module
    spec.loader.exec_module(module)


def compile_triton(
    fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90, divisible: tuple = (), sass: bool = True
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
        (code,) = parse_cubin(cubin, sass).values()
    return code


def short_name(mangled: str) -> str:
    """``forward<bf16,vec,512>``-style name of a cuda_logps.cu kernel: dtype, then the
    vector kernel at its block size (template argument THREADS) or ``scalar`` (THREADS = 0),
    then ``,sq`` for the forward's WPO instantiation (template argument SQ = true)."""
    kind = "forward" if "forward_kernel" in mangled else "backward" if "backward_kernel" in mangled else mangled
    dtype = "bf16" if "nv_bfloat16" in mangled else "fp16" if "__half" in mangled else "fp32"
    threads = re.search(r"Li(\d+)E", mangled)
    variant = "scalar" if threads is None or threads.group(1) == "0" else f"vec,{threads.group(1)}"
    sq = ",sq" if "Lb1E" in mangled else ""
    return f"{kind}<{dtype},{variant}{sq}>"


ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _triton_source(kernel: str, dtype: str) -> tuple:
    """``(jit function, signature, arguments divisible by 16 on an aligned launch)`` of
    the Triton ``kernel`` ("forward" or "backward") on ``dtype`` logits. Aligned: as
    launched on contiguous logits whose V is a multiple of 16 (V = 128256), pointers
    16-byte aligned, V and the strides multiples of 16 (T too, in the usual case)."""
    from pyfastpo.kernels import logps_backward, logps_forward

    common = {"T": "i32", "V": "i32", "stride_n": "i64", "stride_t": "i64"}
    if kernel == "forward":
        sig = {
            "logits_ptr": f"*{dtype}",
            "labels_ptr": "*i64",
            "logp_ptr": "*fp32",
            "max_ptr": "*fp32",
            "log_sum_ptr": "*fp32",
            "entropy_ptr": "*fp32",
            "sum_logits_ptr": "*fp32",
            "sq_ptr": "*fp32",
            **common,
            "ignore_index": "i64",
            "BLOCK_V": "constexpr",
            "VEC": "constexpr",
            "WITH_SQ": "constexpr",
        }
        fn = logps_forward._logps_forward_kernel
    else:
        sig = {
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
        fn = logps_backward._logps_backward_kernel
    aligned = tuple(k for k, v in sig.items() if v.startswith("*") or k in ("T", "V") or "stride" in k)
    return fn, sig, aligned


def compile_triton_config(
    kernel: str,
    dtype: str,
    block_v: int,
    num_warps: int,
    aligned: bool,
    arch: int,
    sass: bool = True,
    with_sq: bool = False,
) -> KernelCode:
    """One Triton kernel at one launch configuration; ``aligned`` False: the
    specialization of an odd vocabulary (nothing known divisible by 16). ``with_sq``:
    the forward's WPO variant (one accumulator more)."""
    fn, sig, divisible = _triton_source(kernel, dtype)
    constexprs = {"BLOCK_V": block_v}
    if kernel == "forward":
        constexprs["VEC"] = min(block_v, 16 // ELEM_BYTES[dtype])  # as logps_forward launches it
        constexprs["WITH_SQ"] = with_sq
    return compile_triton(fn, sig, constexprs, num_warps, arch, divisible if aligned else (), sass)


def triton_kernels(arch: int = 90, vocab: int = 128256, with_sq: bool = False) -> dict:
    """``{"forward<bf16>": KernelCode, ...}``: the Triton kernels at their launch
    configuration for ``vocab``, aligned (``with_sq``: the forward's WPO variant alone,
    as ``forward<bf16,sq>``). Needs TRITON_INTERPRET unset when triton was first imported
    (the interpreter replaces the kernels): :func:`report` runs it in a fresh process."""
    use_checkout_kernels()
    from pyfastpo.kernels.config import launch_config

    out = {}
    for dtype in ELEM_BYTES:
        block, warps = launch_config(vocab, torch_dtype(dtype))
        if with_sq:
            code = compile_triton_config("forward", dtype, block, warps, True, arch, with_sq=True)
            out[f"forward<{dtype},sq>"] = code
            continue
        for kernel in ("forward", "backward"):
            out[f"{kernel}<{dtype}>"] = compile_triton_config(kernel, dtype, block, warps, True, arch)
    return out


def torch_dtype(dtype: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


# -- Every launch configuration ---------------------------------------------------------

ARCHS = (80, 90, 100)
"""What the configuration sweep compiles for: A100, H100 and B200 (sm_100 only where the
installed nvcc and triton target it; skipped with the reason otherwise)."""

FULL_ARCH = 90
"""The architecture compiled at every Triton launch configuration; the others at a subset (:func:`sweep_plan`)."""

DEFAULT_VOCAB = 128256
"""The vocabulary whose launch configuration the budgets of ``tests/test_aot_budget.py`` hold (Llama 3's)."""

VOCABS = tuple(
    sorted(
        {2**k for k in range(19)}
        | {3, 5, 7, 17, 100, 1000, 4097, 32000, 32001, 32064, 50257, 50280, 65024, 100277}
        | {128256, 151936, 152064, 256000, 262143}
    )
)
"""Vocabulary sizes ``launch_config`` is asked about: the powers of two 1..2^18 and odd and
real-model sizes between (GPT-2's 50257, Llama 2's 32000, Llama 3's 128256, Qwen's 151936
and 152064, Gemma's 256000)."""


def launch_configs(vocabs: tuple = VOCABS) -> list:
    """Every distinct ``(dtype, BLOCK_V, num_warps)`` that ``launch_config`` picks for ``vocabs``."""
    use_checkout_kernels()
    from pyfastpo.kernels.config import launch_config

    return sorted({(d, *launch_config(v, torch_dtype(d))) for d in ELEM_BYTES for v in vocabs})


def sweep_plan(configs: list, arch: int, full: bool = False) -> list:
    """The Triton compilations ``(kernel, dtype, BLOCK_V, num_warps, aligned)`` at ``sm_<arch>``:
    both kernels, aligned and unaligned, at every configuration on :data:`FULL_ARCH` (or
    ``full``), elsewhere at the largest block of each warp count per dtype (every warp
    count, the cap that every vocabulary from 4096 up runs at, the most work per thread)."""
    if not full and arch != FULL_ARCH:
        largest = {}
        for dtype, block, warps in configs:
            largest[(dtype, warps)] = max(block, largest.get((dtype, warps), 0))
        configs = [c for c in configs if largest[(c[0], c[2])] == c[1]]
    return [(k, d, b, w, a) for d, b, w in configs for k in ("forward", "backward") for a in (True, False)]


def vector_expected(row: dict) -> bool:
    """Whether a Triton row must stream 16-byte vectors: an aligned launch whose block
    gives every thread at least 16 bytes (a smaller block cannot: at BLOCK_V 64 in bf16
    and one warp a thread owns 4 bytes)."""
    return row["aligned"] and row["block_v"] * ELEM_BYTES[row["dtype"]] >= 16 * 32 * row["num_warps"]


def vectorized(row: dict) -> bool:
    """The forward's hot-loop loads, the backward's hot-loop stores: all 16 bytes or wider."""
    widths = row["loads"] if row["kernel"] == "forward" else row["stores"]
    return bool(widths) and min(widths) >= 16  # None (not disassembled) or [] (no hot loop): no


def label(row: dict) -> str:
    if row["backend"] == "cuda":
        return f"sm_{row['arch']} cuda {row['kernel']}"
    spec = "aligned" if row["aligned"] else "unaligned"
    return (
        f"sm_{row['arch']} triton {row['kernel']}<{row['dtype']},BLOCK_V={row['block_v']},"
        f"{row['num_warps']} warps,{spec}>"
    )


def problems(row: dict) -> list:
    """What a row fails: compilation, local memory (spills), registers unknown, and for
    Triton rows that :func:`vector_expected` the 16-byte vectors."""
    if row.get("error"):
        return [f"{label(row)}: does not compile: {row['error']}"]
    out = []
    if row["local_bytes"] != 0:
        out.append(f"{label(row)}: {row['local_bytes']} bytes of local memory (spills)")
    if row["registers"] <= 0:
        out.append(f"{label(row)}: registers unknown")
    if row["backend"] == "triton" and vector_expected(row) and not vectorized(row):
        what = "loads" if row["kernel"] == "forward" else "stores"
        out.append(f"{label(row)}: hot-loop {what} of {row[what]} bytes per thread, not 16-byte vectors")
    return out


def _code_row(code: KernelCode, elem_bytes: int) -> dict:
    """Resources; and from the SASS, if disassembled (else None): the hot loop's global
    load and store widths in bytes per thread and its instructions per element."""
    loop = code.hot_loop()
    per_element = code.instructions_per_element(elem_bytes)
    return {
        "registers": code.registers,
        "local_bytes": code.local_bytes,
        "loads": None if not code.sass else loop.widths("LDG") if loop else [],
        "stores": None if not code.sass else loop.widths("STG") if loop else [],
        "per_element": None if per_element is None else round(per_element, 3),
        "error": None,
    }


def _worker(archs: tuple, full: bool, index: int, count: int) -> None:
    """One of :func:`sweep`'s compiling processes: its share of the Triton compilations, as JSON on stdout."""
    import json

    use_checkout_kernels()
    from pyfastpo.kernels.config import launch_config

    configs = launch_configs()
    skipped = {arch: triton_unsupported(arch) for arch in archs}
    jobs = [(arch, *job) for arch in archs if skipped[arch] is None for job in sweep_plan(configs, arch, full)]
    rows = []
    for arch, kernel, dtype, block, warps, aligned in jobs[index::count]:
        row = {"backend": "triton", "arch": arch, "kernel": kernel, "dtype": dtype, "block_v": block}
        row.update(num_warps=warps, aligned=aligned)
        row["default"] = aligned and (block, warps) == launch_config(DEFAULT_VOCAB, torch_dtype(dtype))
        # Disassembled where the vector check applies (the rest: resources only, to save time).
        sass = vector_expected(row)
        try:
            code = compile_triton_config(kernel, dtype, block, warps, aligned, arch, sass)
            row.update(_code_row(code, ELEM_BYTES[dtype]))
        except Exception as err:  # noqa: BLE001 - a configuration that does not compile is a finding
            row.update(registers=-1, local_bytes=-1, loads=None, stores=None, per_element=None, error=first_line(err))
        rows.append(row)
    print("\n" + json.dumps({"configs": configs, "skipped": skipped, "rows": rows}))


def _compile_env() -> dict:
    """The environment of a process that compiles Triton kernels: TRITON_INTERPRET unset
    (the interpreter would replace the kernels), this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def sweep(archs: tuple = ARCHS, full: bool = False) -> dict:
    """Every kernel at every launch configuration it can be run at, compiled for each of
    ``archs`` (once per process): ``{"configs": [(dtype, BLOCK_V, num_warps)], "skipped":
    {"cuda"|"triton": {arch: reason or None}}, "rows": [...]}``, a row per CUDA kernel
    and per Triton compilation of :func:`sweep_plan`.

    nvcc (one process per architecture) and the Triton compilations (one process per CPU,
    TRITON_INTERPRET unset, this checkout's kernels) run side by side."""
    import json
    import sys

    skipped = {"cuda": {arch: nvcc_unsupported(arch) for arch in archs}}
    env = _compile_env()
    workers = _cpus()
    with tempfile.TemporaryDirectory() as tmp:
        nvccs = {}
        for arch in archs:
            if skipped["cuda"][arch] is None and arch not in _cuda_cache:
                log = open(Path(tmp) / f"sm_{arch}.log", "w")  # noqa: SIM115 - closed below
                cmd = _nvcc_command(arch, _CUDA_SOURCE, Path(tmp) / f"sm_{arch}.cubin")
                nvccs[arch] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"from pyfastpo.bench import aot; aot._worker({archs!r}, {full!r}, {i}, {workers})",
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(workers)
        ]
        outs = [p.communicate() for p in procs]
        for arch, (proc, log) in nvccs.items():
            proc.wait()
            log.close()
            if proc.returncode:
                text = (Path(tmp) / f"sm_{arch}.log").read_text()
                raise RuntimeError(f"nvcc failed for sm_{arch}:\n{text[-3000:]}")
            _cuda_cache[arch] = parse_cubin(Path(tmp) / f"sm_{arch}.cubin")
    rows = []
    for arch in archs:
        for name, code in sorted(_cuda_cache.get(arch, {}).items(), key=lambda kv: short_name(kv[0])):
            dtype = re.search(r"<(\w+)", short_name(name)).group(1)
            rows.append(
                {"backend": "cuda", "arch": arch, "kernel": short_name(name), **_code_row(code, ELEM_BYTES[dtype])}
            )
    result = None
    for proc, (out, err) in zip(procs, outs):
        if proc.returncode:
            raise RuntimeError(f"a Triton compiling process failed:\n{err[-3000:]}")
        part = json.loads(out.strip().splitlines()[-1])
        rows += part["rows"]
        result = part
    order = {"forward": 0, "backward": 1}
    rows.sort(
        key=lambda r: (
            r["backend"],
            r["arch"],
            order.get(r["kernel"], 2),
            r.get("dtype", ""),
            r.get("block_v", 0),
            not r.get("aligned", 0),
        )
    )
    skipped["triton"] = {int(k): v for k, v in result["skipped"].items()}
    return {"configs": [tuple(c) for c in result["configs"]], "skipped": skipped, "rows": rows}


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


def triton_rows(arch: int = 90, with_sq: bool = False) -> list:
    """:func:`triton_kernels`' rows (as :func:`report`'s), compiled in a fresh process
    without the interpreter."""
    import json
    import sys

    code = (
        "import json; from pyfastpo.bench import aot; print(json.dumps([aot._row('triton', n, c) "
        f"for n, c in aot.triton_kernels({arch}, with_sq={with_sq}).items()]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_compile_env(), cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(arch: int = 90) -> list:
    """Registers, local memory and hot-loop instructions per element of every kernel,
    CUDA and Triton, compiled for ``sm_<arch>``: a list of dicts."""
    rows = [
        _row("cuda", short_name(n), c) for n, c in sorted(compile_cuda(arch).items(), key=lambda kv: short_name(kv[0]))
    ]
    return rows + triton_rows(arch) + triton_rows(arch, with_sq=True)


def default_rows(result: dict, arch: int = 90) -> list:
    """:func:`report`'s rows taken from a :func:`sweep`: the CUDA kernels of ``sm_<arch>`` and
    the Triton kernels at the launch configuration of :data:`DEFAULT_VOCAB`, aligned."""
    keep = ("registers", "local_bytes", "per_element")
    out = []
    for r in result["rows"]:
        if r["arch"] == arch and r["backend"] == "cuda":
            out.append({"backend": "cuda", "kernel": r["kernel"], **{k: r[k] for k in keep}})
        elif r["arch"] == arch and r.get("default"):
            out.append({"backend": "triton", "kernel": f"{r['kernel']}<{r['dtype']}>", **{k: r[k] for k in keep}})
    return out


def _widths(widths) -> str:
    return "-" if widths is None else ",".join(map(str, widths)) or "none"


def config_table(result: dict) -> list:
    """A :func:`sweep` as markdown: every problem, then a table of the Triton compilations
    (aligned and unaligned side by side) and one of the CUDA kernels."""
    found = [p for r in result["rows"] for p in problems(r)]
    out = ["Problems:", ""] + ([f"- {p}" for p in found] or ["- none"]) + [""]
    for backend, skipped in result["skipped"].items():
        out += [f"- {backend} sm_{arch}: skipped, {why}" for arch, why in skipped.items() if why]
    out += [
        "| arch | kernel | dtype | BLOCK_V | warps | registers (aligned / unaligned) | local bytes (aligned / "
        "unaligned) | hot-loop load / store bytes per thread (aligned) | 16-byte vectors (aligned) | "
        "SASS / element (aligned) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = {}
    for r in result["rows"]:
        if r["backend"] == "triton":
            pairs.setdefault((r["arch"], r["kernel"], r["dtype"], r["block_v"], r["num_warps"]), {})[r["aligned"]] = r
    for (arch, kernel, dtype, block, warps), pair in pairs.items():
        a, u = pair.get(True), pair.get(False)
        if a is None or u is None or a.get("error") or u.get("error"):
            out.append(f"| sm_{arch} | {kernel} | {dtype} | {block} | {warps} | does not compile | | | | |")
            continue
        vec = "yes" if vectorized(a) else "**NO**" if vector_expected(a) else "n/a (< 16 B per thread)"
        out.append(
            f"| sm_{arch} | {kernel} | {dtype} | {block} | {warps} | {a['registers']} / {u['registers']} | "
            f"{a['local_bytes']} / {u['local_bytes']} | {_widths(a['loads'])} / {_widths(a['stores'])} | {vec} | "
            f"{'-' if a['per_element'] is None else a['per_element']} |"
        )
    out += ["", "| arch | CUDA kernel | registers | local bytes | SASS / element (hot loop) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["backend"] == "cuda":
            out.append(
                f"| sm_{r['arch']} | {r['kernel']} | {r['registers']} | {r['local_bytes']} | {r['per_element']} |"
            )
    return out


def main() -> None:
    """``python -m pyfastpo.bench.aot [ARCH]``: the report as a markdown table.
    ``python -m pyfastpo.bench.aot --configs [--full] [--json PATH]``: every launch
    configuration on every architecture of :data:`ARCHS` (:func:`sweep`, :func:`config_table`)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m pyfastpo.bench.aot")
    parser.add_argument("arch", nargs="?", type=int, default=90)
    parser.add_argument("--configs", action="store_true", help="every launch configuration, every architecture")
    parser.add_argument("--full", action="store_true", help="with --configs: every configuration on every arch")
    parser.add_argument("--json", help="with --configs: also write the rows to this file")
    args = parser.parse_args()
    if args.configs:
        result = sweep(ARCHS, args.full)
        if args.json:  # a row per line
            rows = ",\n  ".join(json.dumps(r) for r in result["rows"])
            head = f'"configs": {json.dumps(result["configs"])},\n "skipped": {json.dumps(result["skipped"])}'
            Path(args.json).write_text(f'{{{head},\n "rows": [\n  {rows}\n]}}\n')
        print("\n".join(config_table(result)))
        return
    arch = args.arch
    print(f"| backend | kernel (sm_{arch}) | registers | local bytes | SASS instructions / element (hot loop) |")
    print("|---|---|---|---|---|")
    for r in report(arch):
        print(f"| {r['backend']} | {r['kernel']} | {r['registers']} | {r['local_bytes']} | {r['per_element']} |")


if __name__ == "__main__":
    main()
