"""``cpp`` backend: the C++ kernels of ``csrc/`` on CPU tensors (OpenMP over token rows).

Thin wrapper over the pybind11 extension ``pyfastpo.backends._C`` (arguments:
:mod:`pyfastpo.backends.native`). Threads: ``torch.get_num_threads()``, like
torch's own ops. See :mod:`pyfastpo.backends.base` for the contract.
"""

from __future__ import annotations

import torch

from .base import TokenStats
from .native import load_extension, run_backward, run_forward

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


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, log_sum_sq: bool = False) -> TokenStats:
    """The contract's forward (:mod:`pyfastpo.backends.base`) on CPU tensors."""
    call = lambda *args: _C.forward(*args, torch.get_num_threads(), log_sum_sq)  # noqa: E731
    return run_forward(call, logits, labels, ignore_index, log_sum_sq)


def backward(logits, labels, row_max, log_sum, grad_scale, ignore_index: int, out) -> None:
    """The contract's backward (:mod:`pyfastpo.backends.base`) on CPU tensors; ``out`` may be ``logits``."""
    call = lambda *args: _C.backward(*args, torch.get_num_threads())  # noqa: E731
    run_backward(call, logits, labels, row_max, log_sum, grad_scale, ignore_index, out)
