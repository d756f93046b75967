"""Triton forward kernel: per-token logp, lse, entropy and logit sum in one pass.

One program per token row ``(n, t)`` streams the row's ``V`` logits once, in
blocks of ``BLOCK_V``, keeping an online (flash-softmax style) state in float32:

    m = running max (a scalar),
    s = sum exp(x - m),
    u = sum exp(x - m) * (x - m),
    z = sum x            (s, u, z kept per lane of the block, summed at the end).

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


@triton.jit
def _online_step(x, zx, m, s, u, z):
    """One block of logits ``x`` into the online state: scalar running max ``m``; per-lane
    ``s = sum exp(x - m)``, ``u = sum exp(x - m) (x - m)`` and ``z += zx`` (``x`` with the
    masked lanes of a tail block as 0)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While every logit seen is -inf, m_new is -inf: shift by 0 instead so that
    # exp(-inf - m_safe) is 0 rather than exp(nan).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    # Rescale the old state to the new max: alpha = exp(m - m_new), and as u is
    # relative to m, sum e_old * alpha * (x - m_new) = alpha * (u + (m - m_new) * s).
    # While m == -inf every lane of s is 0 and alpha is 0: the shift is then
    # taken as 0 (never -inf * 0).
    alpha = flushed_exp(m - m_safe)
    shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
    d = x - m_safe
    e = flushed_exp(d)
    # e == 0 where x == -inf (masked or genuinely -inf): add 0, not 0 * -inf.
    u = alpha * (u + shift * s) + e * tl.where(e > 0.0, d, 0.0)
    s = alpha * s + e
    z += zx
    return m_new, s, u, z


@triton.jit
def _logps_forward_kernel(
    logits_ptr,  # [N, T, V], any float dtype, last stride 1
    labels_ptr,  # [N * T] int64, contiguous
    logp_ptr,  # [N * T] float32 outputs, contiguous
    max_ptr,
    log_sum_ptr,
    entropy_ptr,
    sum_logits_ptr,
    T,
    V,
    stride_n,
    stride_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
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
        return

    # row is int64, so n * stride_n and t * stride_t are 64-bit products (no .to()
    # on the strides: Triton turns an integer argument equal to 1 into a constexpr).
    n = row // T
    t = row % T
    x_row = logits_ptr + n * stride_n + t * stride_t
    cols = tl.arange(0, BLOCK_V)

    # The running max m is a scalar (one block reduction per step); s, u and z
    # are kept per lane and reduced once after the loop, so each step costs a
    # single cross-warp reduction instead of four.
    m = float("-inf")
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    u = tl.zeros([BLOCK_V], dtype=tl.float32)
    z = tl.zeros([BLOCK_V], dtype=tl.float32)
    # Full blocks without a mask (no per-element bound test), then the masked tail.
    full = V // BLOCK_V * BLOCK_V
    for start in range(0, full, BLOCK_V):
        x = tl.load(x_row + start + cols).to(tl.float32)
        m, s, u, z = _online_step(x, x, m, s, u, z)
    if full < V:
        offs = full + cols
        mask = offs < V
        # Masked lanes read -inf: they never win the max and exp() gives them 0.
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m, s, u, z = _online_step(x, tl.where(mask, x, 0.0), m, s, u, z)

    s_row = tl.sum(s, axis=0)
    u_row = tl.sum(u, axis=0)
    z_row = tl.sum(z, axis=0)
    # Undefined row: a NaN logit, a +inf logit (m = +inf) or only -inf logits
    # (m = -inf): NaN, as in every backend. A NaN always makes z NaN, but so do
    # finite 1e35 and -1e35 (inf - inf): only such a row is read again to count
    # its NaNs (a per-lane counter in the loop cost ~16 registers per thread).
    nans = 0.0
    if z_row != z_row:
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


def logps_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token statistics of ``logits`` at ``labels``.

    Args:
        logits: ``[N, T, V]`` float32 / bfloat16 / float16, ``stride(-1) == 1``.
        labels: ``[N, T]`` int64, contiguous, each ``ignore_index`` or in ``[0, V)``.
        ignore_index: label value of tokens that do not count.
        block_v: override of the block size (a power of two; tests use it to hit
            block boundaries at small V). Default: :func:`launch_config`.

    Returns:
        ``(logp, row_max, log_sum, entropy, sum_logits)``, each ``[N * T]`` float32
        contiguous; at ignored tokens all five are 0.
    """
    n, t, v = logits.shape
    rows = n * t
    out = torch.zeros(5, rows, dtype=torch.float32, device=logits.device)
    if rows == 0 or v == 0:
        return tuple(out.unbind(0))
    logp, row_max, log_sum, entropy, sum_logits = out.unbind(0)
    block, warps = launch_config(v, logits.dtype, block_v)
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _logps_forward_kernel[(rows,)](
            logits,
            labels,
            logp,
            row_max,
            log_sum,
            entropy,
            sum_logits,
            t,
            v,
            logits.stride(0),
            logits.stride(1),
            ignore_index,
            BLOCK_V=block,
            num_warps=warps,
        )
    return logp, row_max, log_sum, entropy, sum_logits

