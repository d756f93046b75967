"""GPU kernels checked ahead of time, without a GPU: compiled for sm_90 (nvcc for the
CUDA kernels, ``triton.compile`` with a GPUTarget for Triton), disassembled, and held
to budgets: no local memory (spills), registers, and SASS instructions per element in
each kernel's hot loop (``pyfastpo/bench/aot.py``). A memory-bound kernel keeps up with
HBM only if its inner loop is lean, so a regression here is a bandwidth regression.

Budgets are the measured counts plus a small margin (measured 2026-11-26, nvcc 13.0,
triton 3.8.0); the CUDA backward's is the issue's target itself (5 per element).

The rows come from ``aot.sweep()``, the compilation of every launch configuration on
every architecture that ``tests/test_aot_configs.py`` checks (done once per session):
here its sm_90 CUDA kernels and the Triton kernels at V = 128256's launch configuration.
"""

from __future__ import annotations

import os
import shutil

import pytest

from pyfastpo.bench import aot

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
    reason="nvcc is not installed: the CUDA kernels cannot be compiled ahead of time here",
)

# Hot-loop SASS instructions per element and registers, history (bf16 unless said):
# - CUDA forward: 23.6 (expf, compare+select max, one vector per re-base) -> 10.8 (ex2,
#   fmaxf, pairs of vectors) -> 7.97 (base-2 fast pass: one FFMA for (x - m) log2e, one
#   clamp in t's factor so that -inf logits stay on the one-read pass, packed bf16x2 max,
#   4 vectors per re-base, 32-bit vector index); fp32 8.2; 63 registers at
#   __launch_bounds__(THREADS, 1024 / THREADS) (at a 40-register cap ptxas spills). The
#   exact pass's loop (rows the fast pass cannot finish) is not the hot loop: no budget.
# - CUDA forward, WPO's instantiation (SQ: q2 += e * e beside s and u): exactly one FFMA
#   per element more than the plain kernel (bf16 9.0, fp32 9.25), 64 registers, no spills.
# - CUDA backward: 24.9 -> 8.5 -> 4.9 (exp2 of one FFMA, g and the exponent's low part
#   folded into one multiplier; 4 vectors per step, immediate offsets). fp32: 3.8.
# - CUDA backward's scalar kernel (an out-of-place output misaligned unlike the logits): 38 -> 27.
# - Triton, at the launch configuration of V = 128256 with the run-time specialization of
#   an aligned launch (pointers, V and strides divisible by 16): forward bf16 94 registers,
#   22.0 per element -> 108, 14.9 (ex2.approx.ftz, unmasked full blocks) -> 47, 11.75
#   (state per 16-byte tile row, reduced once after the loop); backward 34, 19.5 -> 40, 13.3.
#   WPO's forward (WITH_SQ): bf16 48 registers, 13.4 per element; fp32 39, 13.75.
BUDGET = {  # kernel name prefix -> (max registers, max instructions per element)
    ("cuda", "forward", "16-bit"): (64, 8.0),
    ("cuda", "forward", "fp32"): (64, 8.5),
    ("cuda", "forward", "16-bit,sq"): (64, 9.0),
    ("cuda", "forward", "fp32,sq"): (64, 9.5),
    ("cuda", "backward", "vec"): (40, 5.0),
    ("cuda", "backward", "scalar"): (48, 28.0),
    ("triton", "forward", "16-bit"): (56, 12.5),
    ("triton", "forward", "fp32"): (40, 12.5),
    ("triton", "forward", "16-bit,sq"): (56, 14.0),
    ("triton", "forward", "fp32,sq"): (48, 14.25),
    ("triton", "backward", "16-bit"): (48, 14.0),
    ("triton", "backward", "fp32"): (40, 13.5),
}


def _budget(row: dict) -> tuple:
    kind = row["kernel"].split("<")[0]
    if row["backend"] == "cuda":
        if kind == "forward":
            sq = ",sq" if row["kernel"].endswith(",sq>") else ""
            return BUDGET[("cuda", kind, ("fp32" if "fp32" in row["kernel"] else "16-bit") + sq)]
        return BUDGET[("cuda", kind, "vec" if ",vec" in row["kernel"] else "scalar")]
    sq = ",sq" if row["kernel"].endswith(",sq>") else ""
    return BUDGET[("triton", kind, ("fp32" if "fp32" in row["kernel"] else "16-bit") + sq)]


@pytest.fixture(scope="module")
def rows():
    return aot.default_rows(aot.sweep(), 90)


def test_every_kernel_is_compiled(rows):
    names = {(r["backend"], r["kernel"]) for r in rows}
    dtypes = ("bf16", "fp16", "fp32")
    # The forward always streams vectors (it peels a misaligned row's lead); the backward
    # keeps a scalar kernel for an out whose misalignment differs from the logits'.
    blocks = (128, 256, 512)  # cuda_logps.cu's threads_for: the block size is a template argument
    want = {("cuda", f"forward<{d},vec,{b}{sq}>") for d in dtypes for b in blocks for sq in ("", ",sq")}
    want |= {("cuda", f"backward<{d},vec,{b}>") for d in dtypes for b in blocks}
    want |= {("cuda", f"backward<{d},scalar>") for d in dtypes}
    want |= {("triton", f"{k}<{d}>") for k in ("forward", "backward") for d in dtypes}
    assert want <= names


def over_budget(rows: list) -> list:
    """What each row exceeds of its budget: spills, registers, instructions per element."""
    over = []
    for r in rows:
        max_registers, max_per_element = _budget(r)
        if r["local_bytes"]:
            over.append(f"{r['backend']} {r['kernel']}: {r['local_bytes']} bytes of local memory (spills)")
        if r["registers"] > max_registers:
            over.append(f"{r['backend']} {r['kernel']}: {r['registers']} registers > {max_registers}")
        if r["per_element"] is None or r["per_element"] > max_per_element:
            over.append(f"{r['backend']} {r['kernel']}: {r['per_element']} instructions/element > {max_per_element}")
    return over


def test_kernel_budgets(rows):
    over = over_budget(rows)
    assert not over, "\n".join(over)


def test_triton_wpo_forward_budget():
    """The Triton forward's WPO variant (WITH_SQ, not in the sweep): compiled for sm_90 at
    V = 128256's launch configuration, within its budget (about 1.6 instructions per element
    more than the plain forward: q's multiply-add and its share of the reduction)."""
    rows = aot.triton_rows(90, with_sq=True)
    assert {r["kernel"] for r in rows} == {f"forward<{d},sq>" for d in ("bf16", "fp16", "fp32")}
    over = over_budget(rows)
    assert not over, "\n".join(over)


def test_hot_loop_finder_on_a_known_loop():
    """The harness itself: a hand-made SASS loop of 10 instructions loading 16 bytes."""
    body = [
        aot.Instr(0x100 + 16 * i, op, "")
        for i, op in enumerate(
            ["LDG.E.128", "FADD", "FMUL", "MUFU.EX2", "FADD", "FFMA", "IADD3", "ISETP.GE.AND", "NOP"]
        )
    ]
    body.append(aot.Instr(0x100 + 16 * 9, "BRA", "0x100"))
    code = aot.KernelCode("k", 16, 0, [aot.Instr(0x0, "MOV", "")] + body + [aot.Instr(0x200, "EXIT", "")])
    loop = code.hot_loop()
    assert (loop.start, loop.end, loop.load_bytes()) == (0x100, 0x190, 16)
    assert code.instructions_per_element(2) == pytest.approx(10 / 8)
