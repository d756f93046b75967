"""What the Python side passes the compiled drivers (``pyfastpo.backends._C`` on the
CPU, ``pyfastpo.backends._cuda`` on the GPU): raw pointers (``tensor.data_ptr()``),
dtype codes, sizes and strides in elements. The extensions do not link against
torch. The C++ side of these codes is ``csrc/native_abi.h`` (a test checks that the
two agree)."""

from __future__ import annotations

import importlib

import torch

from .base import KERNEL_DTYPES, TokenStats

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Codes of the logits dtypes (``DtypeCode`` in csrc/native_abi.h)."""

NUM_STATS = len(TokenStats._fields) - 1
"""Rows of the float32 ``[NUM_STATS, N, T]`` buffer the forward writes (TokenStats' order,
without the optional ``log_sum_sq``; ``kNumStats`` in csrc/native_abi.h)."""


def load_extension(name: str, why_missing: str = "") -> tuple:
    """``(module, None)`` for the compiled extension ``pyfastpo.backends.<name>``, or
    ``(None, reason)`` when it is not built (the backend registry shows the reason)."""
    try:
        return importlib.import_module(f"pyfastpo.backends.{name}"), None
    except ImportError as err:
        return None, f"pyfastpo.backends.{name} could not be imported ({err}){why_missing}"


def dtype_code(dtype: torch.dtype) -> int:
    """The C++ dtype code of a float32 / bfloat16 / float16 logits dtype."""
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the C++ kernels take float32, bfloat16 or float16 logits, not {dtype}")
    return DTYPE_CODES[dtype]


def _logits_args(logits: torch.Tensor) -> tuple:
    """Pointer, dtype code, sizes ``N, T, V`` and row strides of ``logits [N, T, V]``."""
    n, t, v = logits.shape
    return logits.data_ptr(), dtype_code(logits.dtype), n, t, v, logits.stride(0), logits.stride(1)


def forward_args(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, out: torch.Tensor) -> tuple:
    """The positional arguments ``_C.forward`` and ``_cuda.forward`` share: the logits'
    (:func:`_logits_args`), ``labels``, and the contiguous float32 ``out [NUM_STATS, N, T]``."""
    return (*_logits_args(logits), labels.data_ptr(), int(ignore_index), out.data_ptr())


def backward_args(logits, labels, row_max, log_sum, grad_scale, ignore_index, out) -> tuple:
    """The positional arguments ``_C.backward`` and ``_cuda.backward`` share. ``row_max``,
    ``log_sum`` and ``grad_scale`` must already be float32 and contiguous (the
    contract of :mod:`pyfastpo.backends.base`): the kernels read them as flat arrays."""
    for what, x in (("row_max", row_max), ("log_sum", log_sum), ("grad_scale", grad_scale)):
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"{what} must be a contiguous float32 tensor, got {x.dtype} strides {x.stride()}")
    pointers = (labels.data_ptr(), row_max.data_ptr(), log_sum.data_ptr(), grad_scale.data_ptr())
    return (*_logits_args(logits), *pointers, int(ignore_index), out.data_ptr(), out.stride(0), out.stride(1))


def run_forward(call, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, log_sum_sq=False) -> TokenStats:
    """The contract's forward through an extension: allocates the float32
    ``[NUM_STATS, N, T]`` buffer (one row more for ``log_sum_sq``, which the call must
    then fill) and calls ``call(*forward_args(...))`` (the extension's forward with its
    own trailing arguments bound)."""
    n, t, _ = logits.shape
    out = torch.empty(NUM_STATS + log_sum_sq, n, t, dtype=torch.float32, device=logits.device)
    if out.numel():
        call(*forward_args(logits, labels, ignore_index, out))
    return TokenStats(*out.unbind(0))


def run_backward(call, logits, labels, row_max, log_sum, grad_scale, ignore_index: int, out) -> None:
    """The contract's backward through an extension: ``call(*backward_args(...))``."""
    if logits.shape[0] * logits.shape[1]:
        call(*backward_args(logits, labels, row_max, log_sum, grad_scale, ignore_index, out))
