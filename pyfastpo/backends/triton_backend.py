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


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, log_sum_sq: bool = False) -> TokenStats:
    """The contract's forward (:mod:`pyfastpo.backends.base`) by the Triton kernels."""
    n, t, _ = logits.shape
    stats = logps_forward(logits, labels, ignore_index, log_sum_sq=log_sum_sq)
    return TokenStats(*(s.view(n, t) for s in stats))


def backward(logits, labels, row_max, log_sum, grad_scale, ignore_index: int, out) -> None:
    """The contract's backward (:mod:`pyfastpo.backends.base`) by the Triton kernels; ``out`` may be ``logits``."""
    logps_backward(logits, labels, row_max, log_sum, grad_scale, ignore_index, out)
