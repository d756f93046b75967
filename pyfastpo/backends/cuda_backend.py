"""``cuda`` backend: the CUDA kernels of ``csrc/cuda_logps.cu`` on CUDA tensors.

Thin wrapper over the pybind11 extension ``pyfastpo.backends._cuda`` (arguments:
:mod:`pyfastpo.backends.native`, plus the current torch stream; the extension links
the CUDA runtime statically). It is built only when nvcc was present at install time.
See :mod:`pyfastpo.backends.base` for the contract.
"""

from __future__ import annotations

import functools

import torch

from .base import TokenStats
from .native import load_extension, run_backward, run_forward

_cuda, _IMPORT_ERROR = load_extension("_cuda", "; it is built only when nvcc is found")

name = "cuda"


def unavailable_reason(device: torch.device) -> str | None:
    """None for CUDA tensors when the extension is built and the GPU is new enough for it."""
    if _cuda is None:
        return _IMPORT_ERROR
    if device.type != "cuda":
        return f"it runs on CUDA tensors only, not {device.type}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return _capability_reason(device) or _runtime_reason()


@functools.lru_cache(maxsize=1)
def _runtime_reason() -> str | None:
    """Why the extension's own (static) CUDA runtime cannot start here, checked once: it
    needs a driver at least as new as the toolkit it was built with, which torch's
    runtime may not (e.g. "CUDA driver version is insufficient for CUDA runtime version")."""
    try:
        _cuda.device_count()
    except RuntimeError as err:
        return f"its CUDA runtime does not start ({err})"
    return None


MIN_CAPABILITY = (8, 0)
"""The oldest compute capability the extension runs on: setup.py's NVCC_FLAGS build
sm_80, sm_90 and sm_100 code (each runs on later minors of its major) plus compute_100
PTX (JIT-compiled on newer majors); nothing runs below 8.0."""


def _capability_reason(device: torch.device) -> str | None:
    """Why the GPU ``device`` cannot run the compiled kernels (None when it can)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        return f"cuda:{index} does not exist (torch sees {count} CUDA device{'s' if count != 1 else ''})"
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= MIN_CAPABILITY:
        return None
    need = ".".join(map(str, MIN_CAPABILITY))
    return (
        f"the CUDA kernels are built for compute capability {need} and newer (sm_80, sm_90, sm_100 + PTX); "
        f"cuda:{index} is {major}.{minor} ({torch.cuda.get_device_name(index)}); "
        "use backend='triton' or 'reference'"
    )


def _device_and_stream(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, log_sum_sq: bool = False) -> TokenStats:
    """The contract's forward (:mod:`pyfastpo.backends.base`) on CUDA tensors, on the current stream."""
    with torch.cuda.device(logits.device):
        call = lambda *args: _cuda.forward(*args, bool(log_sum_sq), *_device_and_stream(logits))  # noqa: E731
        return run_forward(call, logits, labels, ignore_index, log_sum_sq)


def backward(logits, labels, row_max, log_sum, grad_scale, ignore_index: int, out) -> None:
    """The contract's backward (:mod:`pyfastpo.backends.base`) on CUDA tensors; ``out`` may be ``logits``."""
    with torch.cuda.device(logits.device):
        call = lambda *args: _cuda.backward(*args, *_device_and_stream(logits))  # noqa: E731
        run_backward(call, logits, labels, row_max, log_sum, grad_scale, ignore_index, out)
