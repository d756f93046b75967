"""Triton backend: the kernels of :mod:`pyfastpo.kernels` behind the backend contract.

Runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), which is how the
kernels are tested on machines without a GPU. Importing this module raises
ImportError when triton is missing; the registry reports that as unavailable.
"""

from __future__ import annotations

import os

import torch

from pyfastpo.kernels.logps_backward import logps_backward
from pyfastpo.kernels.logps_forward import logps_forward

from .base import TokenStats

name = "triton"


def unavailable_reason(device: torch.device) -> str | None:
    """None on CUDA devices, and on CPU under ``TRITON_INTERPRET=1``; else why not."""
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    return f"triton does not run on {device.type} tensors"


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> TokenStats:
    """Per-token :class:`TokenStats`, each ``[N, T]`` float32.

    See :mod:`pyfastpo.backends.base`; inputs are already validated there.
    At ignored tokens all five (``row_max`` and ``log_sum`` included) are 0.
    """
    n, t, _ = logits.shape
    stats = logps_forward(logits, labels, ignore_index)
    return TokenStats(*(s.view(n, t) for s in stats))


def backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor,
) -> None:
    """Write ``grad_scale[n] * (onehot - softmax)`` into ``out`` (may alias ``logits``)."""
    logps_backward(logits, labels, row_max, log_sum, grad_scale, ignore_index, out)
