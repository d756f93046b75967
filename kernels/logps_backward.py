"""Triton backward kernel: ``dx = g[n] * (onehot(y) - softmax(x))`` row by row.

The softmax is ``exp((x - m) - log s)`` from the forward's row max ``m`` and
``log s`` kept apart (precise at any logit offset); a row whose ``log s`` is NaN
(undefined: NaN, +inf or only -inf logits) gets a NaN gradient.

One program per token row; one read of the logits and one write of the gradient,
block by block. ``out`` may be the logits themselves (in-place backward): each
program reads a block of its own row before it writes that same block, and no
other program touches the row, so aliasing is safe.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .config import launch_config
from .flushed_exp import flushed_exp


@triton.jit
def _logps_backward_kernel(
    logits_ptr,  # [N, T, V], last stride 1
    labels_ptr,  # [N * T] int64, contiguous
    max_ptr,  # [N * T] float32, contiguous
    log_sum_ptr,  # [N * T] float32, contiguous
    grad_scale_ptr,  # [N] float32
    out_ptr,  # [N, T, V], last stride 1, may alias logits_ptr
    T,
    V,
    stride_n,
    stride_t,
    out_stride_n,
    out_stride_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # row is int64, so every offset below is a 64-bit product.
    n = row // T
    t = row % T
    out_row = out_ptr + n * out_stride_n + t * out_stride_t
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        # Ignored token: a zero gradient, written without reading the logits.
        zeros = tl.zeros([BLOCK_V], dtype=out_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(out_row + offs, zeros, mask=offs < V)
        return

    x_row = logits_ptr + n * stride_n + t * stride_t
    m = tl.load(max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    g = tl.load(grad_scale_ptr + n).to(tl.float32)
    # Full blocks without a mask (no per-element bound test), then the masked tail.
    full = V // BLOCK_V * BLOCK_V
    for start in range(0, full, BLOCK_V):
        offs = start + cols
        x = tl.load(x_row + offs).to(tl.float32)
        tl.store(out_row + offs, _grad(x, offs, label, m, log_s, g).to(out_ptr.dtype.element_ty))
    if full < V:
        offs = full + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        tl.store(out_row + offs, _grad(x, offs, label, m, log_s, g).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad(x, offs, label, m, log_s, g):
    """``g * (onehot(label) - p)`` for one block of logits ``x`` at columns ``offs``."""
    p = flushed_exp((x - m) - log_s)
    # At the target, g * (1 - p) in float32: forming -g * p first and adding g
    # after a cast to bf16/fp16 would cancel catastrophically when p ~ 1.
    # An undefined row (log s NaN) is NaN everywhere: flushed_exp keeps NaN.
    return tl.where(offs == label, g * (1.0 - p), -g * p)


def logps_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Write the gradient of ``sum_t g[n] * logp[n, t]`` w.r.t. ``logits`` into ``out``.

    Args:
        logits: ``[N, T, V]`` float32 / bfloat16 / float16, ``stride(-1) == 1``.
        labels: ``[N, T]`` int64, contiguous.
        row_max, log_sum: ``[N, T]`` or ``[N * T]`` float32 from :func:`logps_forward`.
        grad_scale: ``[N]`` float32, ``g[n] = dLoss / dlogps[n]``.
        ignore_index: label value of tokens that do not count (their gradient is 0).
        out: ``[N, T, V]`` in the logits' dtype, ``stride(-1) == 1``; may be ``logits``.
        block_v: block-size override (power of two), for tests.
        num_warps: warps-per-program override (the GPU check's sweep).
    """
    n, t, v = logits.shape
    rows = n * t
    if rows == 0 or v == 0:
        return
    row_max = row_max.reshape(rows).to(torch.float32).contiguous()
    log_sum = log_sum.reshape(rows).to(torch.float32).contiguous()
    grad_scale = grad_scale.to(torch.float32).contiguous()
    block, warps = launch_config(v, logits.dtype, block_v, num_warps)
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _logps_backward_kernel[(rows,)](
            logits,
            labels,
            row_max,
            log_sum,
            grad_scale,
            out,
            t,
            v,
            logits.stride(0),
            logits.stride(1),
            out.stride(0),
            out.stride(1),
            ignore_index,
            BLOCK_V=block,
            num_warps=warps,
        )
