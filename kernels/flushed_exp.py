"""The exp rule shared by every kernel (``csrc/logps_math.h``: ``PFPO_EXP_LO``).

Below ``EXP_LO`` (about log of float32's smallest normal) exp is exactly 0, and so
for NaN: the GPU's exp would return subnormals there, the C++ host exp returns 0,
and the backends must agree on every row (a NaN logit is tracked apart, by count).
"""

from __future__ import annotations

import triton
import triton.language as tl

EXP_LO = tl.constexpr(-87.33654)
"""Arguments below this give exactly 0 (same constant as PFPO_EXP_LO in csrc/logps_math.h; a test checks)."""


@triton.jit
def flushed_exp(x):
    """``exp(x)`` in float32, exactly 0 for ``x < EXP_LO`` and for NaN."""
    return tl.where(x >= EXP_LO, tl.exp(x), 0.0)
