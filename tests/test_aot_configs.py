"""Every launch configuration the backends can pick, compiled ahead of time without a GPU
and checked (``pyfastpo/bench/aot.py``: ``sweep``, ``problems``).

What is compiled, once per test session (``aot.sweep()``, shared with
``tests/test_aot_budget.py``; nvcc and the Triton compilations run side by side, one
process per CPU):

- Triton, at sm_90: both kernels at every ``(dtype, BLOCK_V, num_warps)`` that
  ``launch_config`` returns for the vocabularies of ``aot.VOCABS`` (powers of two 1..2^18,
  odd and real-model sizes between: 38 configurations), each with the aligned
  specialization (pointers, V and strides divisible by 16: V = 128256) and the unaligned
  one (nothing divisible by 16: V = 50257).
- Triton, at sm_80 and sm_100: a representative subset, to keep CI time down: per dtype
  the largest block of each warp count (12 configurations: every warp count, and the cap
  every vocabulary from 4096 up runs at), both kernels, both specializations. sm_100 only
  where triton's ptxas accepts it (else skipped with the reason).
- CUDA: ``csrc/cuda_logps.cu`` for sm_80, sm_90 and sm_100 (where nvcc lists it).

Checks: every compilation succeeds; no local memory (spills) and known registers in any
kernel; on the aligned specialization, wherever the block gives every thread at least 16
bytes, the forward's hot loop loads and the backward's hot loop stores 16-byte vectors
(LDG.E.128 / STG.E.128). Smaller blocks (V <= 128 in 16-bit, <= 64 in fp32) cannot.

Time, measured on the 2-core dev machine with a cold Triton cache (248 Triton
compilations, 3 nvcc runs): ~265 s of CPU; 230 s of wall time in the full suite (420 s
in a run while other jobs kept the load average near 6). A warm Triton cache
(~/.triton/cache) reads the compilations back: then nvcc and the disassembly dominate
(~110 s of CPU even for the full cross product). The full cross product on every
architecture: ``python -m pyfastpo.bench.aot --configs --full``
(benchmarks/results/aot-all-configs-2026-11-26).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyfastpo.bench import aot, environment, report

# Found by this sweep and tolerated (the kernels are not changed here): with triton 3.8.0's
# ptxas for sm_100 (CUDA 13.3), the 16-bit forward at BLOCK_V 1024 / 2 warps and 2048 / 4
# warps (V = 513..2048), aligned, keeps one register in local memory: an 8-byte stack, one
# STL before the main loop and one LDL after it (not in the hot loop), at 48 registers.
KNOWN = {
    f"sm_100 triton forward<{dtype},BLOCK_V={block},{warps} warps,aligned>: 8 bytes of local memory (spills)"
    for dtype in ("bf16", "fp16")
    for block, warps in ((1024, 2), (2048, 4))
}


@pytest.fixture(scope="module")
def result():
    return aot.sweep()


def _rows(result, backend, arch):
    why = result["skipped"][backend][arch]
    if why:
        pytest.skip(f"{backend} for sm_{arch}: {why}")
    rows = [r for r in result["rows"] if r["backend"] == backend and r["arch"] == arch]
    assert rows, f"nothing compiled for {backend} sm_{arch}"
    return rows


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_kernel_compiles_without_spills_or_scalar_streams(result, backend, arch):
    found = [p for r in _rows(result, backend, arch) for p in aot.problems(r)]
    unexpected = [p for p in found if p not in KNOWN]
    assert not unexpected, "\n".join(unexpected)


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_planned_configuration_was_compiled(result, arch):
    rows = _rows(result, "triton", arch)
    configs = [tuple(c) for c in result["configs"]]
    assert {c[0] for c in configs} == set(aot.ELEM_BYTES)
    done = {(r["kernel"], r["dtype"], r["block_v"], r["num_warps"], r["aligned"]) for r in rows}
    assert set(aot.sweep_plan(configs, arch)) == done
    if arch == aot.FULL_ARCH:
        assert len(done) == 4 * len(configs)
    else:  # the subset still has every warp count of every dtype
        assert {(d, w) for _, d, _, w, _ in done} == {(d, w) for d, _, w in configs}


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_the_vector_check_is_live(result, arch):
    """The check above is not vacuous: the rows it applies to were disassembled, and the
    launch configuration of V = 128256 is among them in every dtype."""
    rows = [r for r in _rows(result, "triton", arch) if aot.vector_expected(r)]
    assert all(r["loads"] is not None and r["stores"] is not None for r in rows)
    assert {(r["dtype"], r["kernel"]) for r in rows if r["default"]} == {
        (d, k) for d in aot.ELEM_BYTES for k in ("forward", "backward")
    }


def test_cuda_kernels_of_every_architecture_are_all_there(result):
    names = {}
    for r in result["rows"]:
        if r["backend"] == "cuda":
            names.setdefault(r["arch"], set()).add(r["kernel"])
    if not names:
        pytest.skip(f"no CUDA kernels compiled: {result['skipped']['cuda']}")
    assert len({frozenset(n) for n in names.values()}) == 1, names
    # 3 dtypes x (3 forward + 3 WPO forward + 3 vector backward + 1 scalar backward)
    assert len(next(iter(names.values()))) == 30


# -- The harness and the bench's record of registers, on made-up data (no compiler) --------


def test_access_widths_and_the_vector_rule():
    assert [aot.access_bytes(op) for op in ("LDG.E.128", "STG.E.U16", "LDG.E", "LDG.E.64.CONSTANT")] == [16, 2, 4, 8]
    row = {"aligned": True, "dtype": "bf16", "block_v": 4096, "num_warps": 8, "kernel": "forward"}
    assert aot.vector_expected(row) and not aot.vector_expected({**row, "block_v": 128, "num_warps": 1})
    assert not aot.vector_expected({**row, "aligned": False})
    assert aot.vectorized({**row, "loads": [16]}) and not aot.vectorized({**row, "loads": [2, 16]})
    bad = {**row, "backend": "triton", "arch": 90, "registers": 40, "local_bytes": 0, "loads": [2], "stores": []}
    assert aot.problems(bad) == [
        "sm_90 triton forward<bf16,BLOCK_V=4096,8 warps,aligned>: hot-loop loads of [2] bytes per thread, "
        "not 16-byte vectors"
    ]


def test_resource_usage_of_a_fat_binary_is_read_per_architecture():
    text = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Function _Z1kv:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:464 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
Resource usage:
 Function _Z1kv:
  REG:63 STACK:8 SHARED:0 LOCAL:4 CONSTANT[0]:464 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert aot.parse_res_usage(text) == {"80": {"_Z1kv": (40, 0)}, "90": {"_Z1kv": (63, 12)}}


class _FakeJit:
    """What ``environment.triton_resources`` reads of a ``triton.jit`` function after launches."""

    __name__ = "_logps_forward_kernel"

    def __init__(self):
        names = ["logits_ptr", "labels_ptr", "T", "V", "stride_n", "stride_t", "BLOCK_V"]
        src = SimpleNamespace(
            fn=SimpleNamespace(arg_names=names),
            signature={"logits_ptr": "*bf16"},
            constants={(6,): 4096},
            # As the JIT records them: every non-constexpr argument, [] where not divisible by 16.
            attrs={(i,): [["tt.divisibility", 16]] if i in (0, 3, 5) else [] for i in range(6)},
        )
        meta = SimpleNamespace(num_warps=8, target=SimpleNamespace(arch=90))
        loaded = SimpleNamespace(src=src, metadata=meta, n_regs=47, n_spills=0)
        unaligned = {(i,): [["tt.divisibility", 16]] if i == 0 else [] for i in range(6)}
        odd = SimpleNamespace(src=SimpleNamespace(**{**vars(src), "attrs": unaligned}), metadata=meta)  # never loaded
        self.device_caches = {0: ({"a": loaded, "b": odd}, {}, None, None, None)}


def test_triton_registers_are_read_from_the_jit_cache():
    rows = environment.triton_resources([_FakeJit()])
    assert rows == [
        {
            "backend": "triton",
            "kernel": "_logps_forward_kernel<bf16,BLOCK_V=4096,8 warps,aligned>",
            "arch": "sm_90",
            "registers": 47,
            "local_bytes": 0,
        },
        {
            "backend": "triton",
            "kernel": "_logps_forward_kernel<bf16,BLOCK_V=4096,8 warps,unaligned>",
            "arch": "sm_90",
            "registers": None,
            "local_bytes": None,
        },
    ]
    assert environment.kernel_lines(rows) == [
        "  - triton `_logps_forward_kernel<bf16,BLOCK_V=4096,8 warps,aligned>` (sm_90): "
        "47 registers, 0 bytes local memory",
        "  - triton `_logps_forward_kernel<bf16,BLOCK_V=4096,8 warps,unaligned>` (sm_90): unknown",
    ]


def _meta(device_type: str, **extra) -> dict:
    return {
        "device": "GPU" if device_type == "cuda" else "CPU",
        "device_type": device_type,
        "torch": "2",
        "triton": "3",
        "pyfastpo": "0",
        "python": "3",
        "date": "d",
        "git_commit": "c",
        "command": "python -m pyfastpo.bench",
        "dtype": "bfloat16",
        "repeats": 1,
        "warmup": 0,
        "cpp_isa": "avx2",
        "load_average": 0.0,
        "omp_wait_policy": "unset",
        **extra,
    }


def test_the_results_list_the_gpu_kernels_on_a_gpu_only():
    kernels = [
        {"backend": "cuda", "kernel": "forward<bf16,vec,512>", "arch": "sm_90", "registers": 63, "local_bytes": 0},
        {"backend": "cuda", "kernel": "all", "arch": "sm_100", "registers": "unknown (no SASS)", "local_bytes": None},
    ]
    text = report.markdown(_meta("cuda", gpu_kernels=kernels), [], [], [])
    assert "- GPU kernels the run launched (registers, local memory; nonzero local memory means spills):" in text
    assert "  - cuda `forward<bf16,vec,512>` (sm_90): 63 registers, 0 bytes local memory" in text
    assert "  - cuda `all` (sm_100): unknown (no SASS)" in text
    assert "  - none of pyfastpo's" in report.markdown(_meta("cuda", gpu_kernels=[]), [], [], [])
    assert "GPU kernels" not in report.markdown(_meta("cpu"), [], [], [])


def test_cuda_extension_registers_are_read_from_the_built_module():
    pytest.importorskip("pyfastpo.backends._cuda", reason="the CUDA extension is not built here")
    rows = environment.cuda_resources("bf16", "90")  # setup.py builds sm_80, sm_90 and sm_100 SASS
    assert {r["kernel"] for r in rows} == {"backward<bf16,scalar>"} | {
        f"{k}<bf16,vec,{t}>" for k in ("forward", "backward") for t in (128, 256, 512)
    } | {f"forward<bf16,vec,{t},sq>" for t in (128, 256, 512)}
    assert all(isinstance(r["registers"], int) and r["registers"] > 0 and r["local_bytes"] == 0 for r in rows)
    (unknown,) = environment.cuda_resources("bf16", "120")  # compute_100 PTX only: JIT-compiled on the device
    assert unknown["registers"].startswith("unknown")
