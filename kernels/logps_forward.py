"""Triton forward kernel: per-token logp, lse, entropy and logit sum in one pass.

One program per token row ``(n, t)`` streams the row's ``V`` logits once, in
blocks of ``BLOCK_V`` seen as tiles ``[BLOCK_V / VEC, VEC]`` (a tile row is one
thread's 16-byte vector), keeping an online (flash-softmax style) state in float32
per tile row:

    m = running max,
    s = sum exp(x - m),
    u = sum exp(x - m) * (x - m),
    z = sum x,
    q = sum exp(2 (x - m))   (only with WITH_SQ: WPO's ``log sum_v p_v^2 = log q - 2 log s``),

merged across the tile rows once, after the loop (so no step needs a cross-warp
reduction or a barrier).
From it ``logp = (x_y - m) - log s`` and ``entropy = lse - E_p[x] = log s - u / s``;
``m`` and ``log s`` are stored apart, never as ``lse = m + log s``, which would
round at the size of the logits (see :mod:`pyfastpo.backends.base`). A row with a
NaN or +inf logit, or only -inf logits, is undefined: ``log s``, ``entropy`` and
``logp`` are NaN.
``u`` is kept relative to ``m`` (instead of ``sum exp(x - m) * x``) so that the
entropy is not the difference of two numbers of size ``|x|``: at logits of scale
1e4 that would cost ~1e-3 absolute in float32, while ``log s - u / s`` is exact to
float32 rounding of O(log V) quantities.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .config import launch_config
from .flushed_exp import flushed_exp

D_MIN = tl.constexpr(-100.0)
"""Shifts x - m are clamped here (exp(D_MIN) is exactly 0: D_MIN < EXP_LO)."""


@triton.jit
def _online_step(x, zx, m, s, u, z, q, WITH_SQ: tl.constexpr):
    """One tile of logits ``x`` ``[ROWS, VEC]`` into the online state of its ``ROWS``
    tile rows (``m``, ``s``, ``u``, ``z``, ``q``, each ``[ROWS]``; ``q`` only WITH_SQ);
    ``zx`` is ``x`` with the masked lanes of a tail tile as 0. A tile row is one
    thread's 16-byte vector, so every reduction over ``axis=1`` stays inside a thread."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    # While every logit a tile row has seen is -inf, its m_new is -inf: shift by 0
    # instead so that exp(-inf - m_safe) is 0 rather than exp(nan).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    # Rescale the old state to the new max: alpha = exp(m - m_new), and as u is
    # relative to m, sum e_old * alpha * (x - m_new) = alpha * (u + (m - m_new) * s).
    # While m == -inf, s is 0 and alpha is 0: the shift is then 0 (never -inf * 0).
    alpha = flushed_exp(m - m_safe)
    shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
    # The clamp gives -inf logits (and NaN, counted apart) exp = 0 and e * d = 0, never
    # 0 * -inf; every shift below it has exp exactly 0 anyway (EXP_LO > D_MIN).
    d = tl.maximum(x - m_safe[:, None], D_MIN)
    e = flushed_exp(d)
    u = alpha * (u + shift * s) + tl.sum(e * d, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    z += tl.sum(zx, axis=1)
    if WITH_SQ:  # exp(2 (x - m)) = e^2, rescaled by alpha^2
        q = alpha * alpha * q + tl.sum(e * e, axis=1)
    return m_new, s, u, z, q


@triton.jit
def _logps_forward_kernel(
    logits_ptr,  # [N, T, V], any float dtype, last stride 1
    labels_ptr,  # [N * T] int64, contiguous
    logp_ptr,  # [N * T] float32 outputs, contiguous
    max_ptr,
    log_sum_ptr,
    entropy_ptr,
    sum_logits_ptr,
    sq_ptr,  # [N * T] float32 log sum p^2 (written only WITH_SQ)
    T,
    V,
    stride_n,
    stride_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,  # elements of one 16-byte load (at most BLOCK_V)
    WITH_SQ: tl.constexpr = False,  # also log sum_v p_v^2 (WPO), one more accumulator
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        # Ignored token: zeros, and its logits are never read.
        tl.store(logp_ptr + row, 0.0)
        tl.store(max_ptr + row, 0.0)
        tl.store(log_sum_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(sum_logits_ptr + row, 0.0)
        if WITH_SQ:
            tl.store(sq_ptr + row, 0.0)
        return

    # row is int64, so n * stride_n and t * stride_t are 64-bit products (no .to()
    # on the strides: Triton turns an integer argument equal to 1 into a constexpr).
    n = row // T
    t = row % T
    x_row = logits_ptr + n * stride_n + t * stride_t
    # A block is a tile [ROWS, VEC]: tile row r holds the 16-byte vector at r * VEC.
    # The online state is kept per tile row (each thread's own rows) and reduced
    # across the block once, after the loop: no cross-warp reduction, no barrier, per
    # step, and four floats of state per tile row instead of per element.
    ROWS: tl.constexpr = BLOCK_V // VEC
    tile = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32)
    u = tl.zeros([ROWS], dtype=tl.float32)
    z = tl.zeros([ROWS], dtype=tl.float32)
    q = tl.zeros([ROWS], dtype=tl.float32)
    # The masked tail block first, then full blocks without a mask (no per-element
    # bound test). (Tail first: with the tail after the loop, Triton 3.8's
    # OptimizeThreadLocality pass asserts, its loop results having two uses.)
    full = V // BLOCK_V * BLOCK_V
    if full < V:
        offs = full + tile
        mask = offs < V
        # Masked lanes read -inf: they never win the max and exp() gives them 0.
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m, s, u, z, q = _online_step(x, tl.where(mask, x, 0.0), m, s, u, z, q, WITH_SQ)
    for start in range(0, full, BLOCK_V):
        x = tl.load(x_row + start + tile).to(tl.float32)
        m, s, u, z, q = _online_step(x, x, m, s, u, z, q, WITH_SQ)

    # The tile rows' states merged at the row max (rows that saw only -inf: alpha 0).
    m_row = tl.max(m, axis=0)
    m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    alpha = flushed_exp(m - m_safe)
    shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
    s_row = tl.sum(alpha * s, axis=0)
    u_row = tl.sum(alpha * (u + shift * s), axis=0)
    z_row = tl.sum(z, axis=0)
    m = m_row
    # Undefined row: a NaN logit, a +inf logit (m = +inf) or only -inf logits
    # (m = -inf): NaN, as in every backend. A NaN always makes z NaN, but so do
    # finite 1e35 and -1e35 (inf - inf): only such a row is read again to count
    # its NaNs (a per-lane counter in the loop cost ~16 registers per thread).
    nans = 0.0
    if z_row != z_row:
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            nans += tl.sum(tl.where(x != x, 1.0, 0.0), axis=0)
    defined = (nans == 0.0) & (m > float("-inf")) & (m < float("inf"))
    log_s = tl.where(defined, tl.log(s_row), float("nan"))
    x_y = tl.load(x_row + label).to(tl.float32)
    tl.store(logp_ptr + row, (x_y - m) - log_s)
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    tl.store(entropy_ptr + row, log_s - u_row / s_row)
    tl.store(sum_logits_ptr + row, z_row)
    if WITH_SQ:
        q_row = tl.sum(alpha * alpha * q, axis=0)
        tl.store(sq_ptr + row, tl.log(q_row) - 2.0 * log_s)


def logps_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    block_v: int | None = None,
    num_warps: int | None = None,
    log_sum_sq: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-token statistics of ``logits`` at ``labels``.

    Args:
        logits: ``[N, T, V]`` float32 / bfloat16 / float16, ``stride(-1) == 1``.
        labels: ``[N, T]`` int64, contiguous, each ``ignore_index`` or in ``[0, V)``.
        ignore_index: label value of tokens that do not count.
        block_v: override of the block size (a power of two; tests use it to hit
            block boundaries at small V). Default: :func:`launch_config`.
        num_warps: override of the warps per program (the GPU check's sweep).
        log_sum_sq: also ``log sum_v p_v^2`` per token (WPO), from the same pass.

    Returns:
        ``(logp, row_max, log_sum, entropy, sum_logits)`` (and ``log_sum_sq``), each
        ``[N * T]`` float32 contiguous; at ignored tokens all are 0.
    """
    n, t, v = logits.shape
    rows = n * t
    out = torch.zeros(5 + log_sum_sq, rows, dtype=torch.float32, device=logits.device)
    if rows == 0 or v == 0:
        return tuple(out.unbind(0))
    logp, row_max, log_sum, entropy, sum_logits = out[:5].unbind(0)
    sq = out[5] if log_sum_sq else sum_logits  # never written without WITH_SQ
    block, warps = launch_config(v, logits.dtype, block_v, num_warps)
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _logps_forward_kernel[(rows,)](
            logits,
            labels,
            logp,
            row_max,
            log_sum,
            entropy,
            sum_logits,
            sq,
            t,
            v,
            logits.stride(0),
            logits.stride(1),
            ignore_index,
            BLOCK_V=block,
            VEC=min(block, 16 // logits.element_size()),
            WITH_SQ=log_sum_sq,
            num_warps=warps,
        )
    return tuple(out.unbind(0))
