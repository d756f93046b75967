"""The exp rule shared by every kernel (``csrc/logps_math.h``: ``PFPO_EXP_LO``).

Below ``EXP_LO`` (about log of float32's smallest normal) exp is exactly 0: the
GPU's exp would return subnormals there, the C++ host exp returns 0, and the
backends must agree on every row. NaN stays NaN, as on the CUDA device: only an
undefined row reaches exp with a NaN, and its outputs are NaN either way (so the
backward needs no per-element NaN test).

On a GPU: ``ex2.approx.ftz.f32`` of ``x * log2(e)``, two instructions; its flush of
subnormal results IS the rule (2^y is subnormal exactly when y < -126), where
``tl.exp`` compiles to ex2 plus a range fix-up for subnormals and the rule then
needs a compare and a select on top (~6 instructions per element in all). Under
the interpreter (no inline assembly there): ``tl.exp`` with the flush written out.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

EXP_LO = tl.constexpr(-87.33654)
"""Arguments below this give exactly 0 (same constant as PFPO_EXP_LO in csrc/logps_math.h; a test checks)."""

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _flushed_exp_interpreted(x):
    return tl.where(x < EXP_LO, 0.0, tl.exp(x))


@triton.jit
def _flushed_exp_device(x):
    return tl.inline_asm_elementwise(
        "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * LOG2E], dtype=tl.float32, is_pure=True, pack=1
    )


flushed_exp = _flushed_exp_interpreted if os.environ.get("TRITON_INTERPRET") == "1" else _flushed_exp_device
"""``exp(x)`` in float32, exactly 0 for ``x < EXP_LO``; NaN for NaN (a ``triton.jit`` function)."""
