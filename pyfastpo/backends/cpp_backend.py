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


NUM_STATS = len(TokenStats._fields)
"""Rows of the float32 ``[NUM_STATS, N, T]`` buffer the C++ forward writes (TokenStats' order)."""


def forward_args(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, out: torch.Tensor) -> tuple:
    """The positional arguments ``_C.forward`` and ``_cuda.forward`` share: pointers,
    dtype code, sizes and strides of ``logits [N, T, V]``, ``labels`` and the
    contiguous float32 ``out [NUM_STATS, N, T]``."""
    n, t, v = logits.shape
    return (
        logits.data_ptr(), dtype_code(logits.dtype), n, t, v, logits.stride(0), logits.stride(1),
        labels.data_ptr(), int(ignore_index), out.data_ptr(),
    )  # fmt: skip


def backward_args(logits, labels, row_max, log_sum, grad_scale, ignore_index, out) -> tuple:
    """The positional arguments ``_C.backward`` and ``_cuda.backward`` share. ``row_max``,
    ``log_sum`` and ``grad_scale`` must already be float32 and contiguous (the
    contract of :mod:`pyfastpo.backends.base`): the kernels read them as flat arrays."""
    for what, x in (("row_max", row_max), ("log_sum", log_sum), ("grad_scale", grad_scale)):
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"{what} must be a contiguous float32 tensor, got {x.dtype} strides {x.stride()}")
    n, t, v = logits.shape
    return (
        logits.data_ptr(), dtype_code(logits.dtype), n, t, v, logits.stride(0), logits.stride(1),
        labels.data_ptr(), row_max.data_ptr(), log_sum.data_ptr(), grad_scale.data_ptr(), int(ignore_index),
        out.data_ptr(), out.stride(0), out.stride(1),
    )  # fmt: skip


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> TokenStats:
    """Per-token stats.

    Args:
        logits: ``[N, T, V]`` float32 / bfloat16 / float16 on CPU, ``stride(-1) == 1``.
        labels: ``[N, T]`` int64, contiguous, validated.
    Returns:
        :class:`TokenStats` of five ``[N, T]`` float32 tensors.
    """
    n, t, _ = logits.shape
    out = torch.empty(NUM_STATS, n, t, dtype=torch.float32, device=logits.device)
    if out.numel():
        _C.forward(*forward_args(logits, labels, ignore_index, out), torch.get_num_threads())
    return TokenStats(*out.unbind(0))


def backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor,
) -> None:
    """Write ``grad_scale[n] * (onehot - softmax)`` into ``out``.

    Args:
        logits: ``[N, T, V]`` as in :func:`forward`.
        labels: ``[N, T]`` int64, contiguous.
        row_max, log_sum: ``[N, T]`` float32, contiguous, from :func:`forward`.
        grad_scale: ``[N]`` float32, contiguous.
        out: ``[N, T, V]`` in the logits' dtype, ``stride(-1) == 1``; may be ``logits`` itself.
    """
    if logits.shape[0] * logits.shape[1]:
        args = backward_args(logits, labels, row_max, log_sum, grad_scale, ignore_index, out)
        _C.backward(*args, torch.get_num_threads())
