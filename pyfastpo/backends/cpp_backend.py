"""``cpp`` backend: the C++ kernels of ``csrc/`` on CPU tensors (OpenMP over token rows).

Thin wrapper over the pybind11 extension ``pyfastpo._C``, which takes raw
pointers (``tensor.data_ptr()``), sizes and strides: the extension does not
link against torch. Threads: ``torch.get_num_threads()``, like torch's own ops.
See :mod:`pyfastpo.backends.base` for the contract.
"""

from __future__ import annotations

import torch

from .base import KERNEL_DTYPES, TokenStats

try:
    from pyfastpo import _C
except ImportError as err:  # not built: the registry reports this reason
    _C = None
    _IMPORT_ERROR = f"pyfastpo._C could not be imported ({err})"
else:
    _IMPORT_ERROR = None

name = "cpp"

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Codes of the logits dtypes the C++ drivers take (csrc/cpu_logps.h, cuda_logps.cu)."""


def unavailable_reason(device: torch.device) -> str | None:
    """None for CPU tensors when the extension is built, else a one-line reason."""
    if _C is None:
        return _IMPORT_ERROR
    if device.type != "cpu":
        return f"it runs on CPU tensors only, not {device.type}"
    return None


def dtype_code(dtype: torch.dtype) -> int:
    """The C++ dtype code of a float32 / bfloat16 / float16 logits dtype."""
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the C++ kernels take float32, bfloat16 or float16 logits, not {dtype}")
    return DTYPE_CODES[dtype]


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> TokenStats:
    """Per-token stats.

    Args:
        logits: ``[N, T, V]`` float32 / bfloat16 / float16 on CPU, ``stride(-1) == 1``.
        labels: ``[N, T]`` int64, contiguous, validated.
    Returns:
        :class:`TokenStats` of four ``[N, T]`` float32 tensors (logp, lse, entropy, sum_logits).
    """
    n, t, v = logits.shape
    out = torch.empty(4, n, t, dtype=torch.float32, device=logits.device)
    if out.numel():
        _C.forward(
            logits.data_ptr(), dtype_code(logits.dtype), n, t, v, logits.stride(0), logits.stride(1),
            labels.data_ptr(), int(ignore_index),
            out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(), out[3].data_ptr(),
            torch.get_num_threads(),
        )
    return TokenStats(*out.unbind(0))


def backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor,
) -> None:
    """Write ``grad_scale[n] * (onehot - softmax)`` into ``out``.

    Args:
        logits: ``[N, T, V]`` as in :func:`forward`.
        labels: ``[N, T]`` int64, contiguous.
        lse: ``[N, T]`` float32 from :func:`forward`.
        grad_scale: ``[N]`` float32, contiguous.
        out: ``[N, T, V]`` in the logits' dtype, ``stride(-1) == 1``; may be ``logits`` itself.
    """
    n, t, v = logits.shape
    if n * t == 0:
        return
    lse = lse.to(torch.float32).contiguous()
    grad_scale = grad_scale.to(torch.float32).contiguous()
    _C.backward(
        logits.data_ptr(), dtype_code(logits.dtype), n, t, v, logits.stride(0), logits.stride(1),
        labels.data_ptr(), lse.data_ptr(), grad_scale.data_ptr(), int(ignore_index),
        out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads(),
    )
