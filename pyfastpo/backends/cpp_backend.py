"""``cpp`` backend: the C++ kernels of ``csrc/`` on CPU tensors (OpenMP over token rows).

Thin wrapper over the pybind11 extension ``pyfastpo.backends._C`` (arguments:
:mod:`pyfastpo.backends.native`). Threads: ``torch.get_num_threads()``, like
torch's own ops. See :mod:`pyfastpo.backends.base` for the contract.
"""

from __future__ import annotations

import torch

from .base import TokenStats
from .native import NUM_STATS, backward_args, forward_args, load_extension

_C, _IMPORT_ERROR = load_extension("_C")

name = "cpp"


def unavailable_reason(device: torch.device) -> str | None:
    """None for CPU tensors when the extension is built, else a one-line reason."""
    if _C is None:
        return _IMPORT_ERROR
    if device.type != "cpu":
        return f"it runs on CPU tensors only, not {device.type}"
    return None


def isa() -> str:
    """The vector instruction set the C++ kernels dispatch to here (``avx512``, ``avx2``
    or ``default``); the extension must be built (:func:`unavailable_reason` is None)."""
    return _C.isa()


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
