"""Backend registry: which implementations of the heavy op this install has.

Each backend module defines ``name``, ``forward``, ``backward`` (the contract in
:mod:`pyfastpo.backends.base`) and ``unavailable_reason(device) -> str | None``
(None when it can run on tensors of that device). ``reference`` runs anywhere.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from .base import KERNEL_DTYPES, TokenStats

__all__ = [
    "BACKENDS",
    "TokenStats",
    "available_backends",
    "backend_module",
    "backend_reasons",
    "check_backend_available",
    "get_backend",
]

BACKENDS = ("reference", "triton", "cuda", "cpp")
"""Every backend name ``sequence_logps`` accepts, besides ``"auto"``."""

_MODULES = {
    "reference": "pyfastpo.backends.reference",
    "triton": "pyfastpo.backends.triton_backend",
    "cuda": "pyfastpo.backends.cuda_backend",
    "cpp": "pyfastpo.backends.cpp_backend",
}

_HOW_TO_GET = {
    "triton": "install it with `pip install pyfastpo[triton]`; on a CPU it runs only "
    "under the interpreter (TRITON_INTERPRET=1 set before triton is imported)",
    "cuda": "reinstall pyfastpo with nvcc on PATH (`pip install --no-build-isolation -e .`) and run on a CUDA GPU",
    "cpp": "reinstall pyfastpo with a C++ compiler present (`pip install -e .`); it runs on CPU tensors",
}

# On each device, the order ``backend="auto"`` tries.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


_LOADED: dict[str, tuple[ModuleType | None, str | None]] = {}
"""``_module``'s results: after the first call a dict look-up, which torch.compile
traces (it cannot trace ``importlib``)."""


def _module(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name]), None
        except ImportError as err:  # a compiled extension or triton is missing
            _LOADED[name] = None, f"it could not be imported ({err})"
    return _LOADED[name]


def backend_module(name: str) -> ModuleType:
    """The module of backend ``name`` (not ``"auto"``), already known to be importable:
    how the custom ops find the backend their ``backend`` argument names."""
    return _module(name)[0]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    module, reason = _module(name)
    if module is None:
        return reason
    return module.unavailable_reason(torch.device(device))


def backend_reasons(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Every backend with why it cannot run on ``device`` (None: it can): the diagnostics
    behind :func:`available_backends` and ``backend="auto"``'s choice. Default device:
    CUDA when torch sees one, else CPU."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: every device this
    machine has, i.e. CPU and, when present, CUDA)."""
    if device is None:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(device)]
    return [n for n in BACKENDS if any(unavailable_reason(n, d) is None for d in devices)]


def check_backend_available(name: str, device: torch.device | str | None = None) -> None:
    """Raise ValueError, saying how to get it, unless backend ``name`` (or ``"auto"``) is
    known and can run on ``device`` (default: on some device of this machine)."""
    if name == "auto":
        return
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"backend={name!r} is unknown; choose one of {('auto',) + BACKENDS}")
    if device is None:
        if name in available_backends():
            return
        device = torch.device("cuda" if name == "cuda" or torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(
            f"backend={name!r} is not available for {device.type} tensors: {reason}. "
            f"To get it: {_HOW_TO_GET.get(name, '')}. Available here: {available_backends(device)}"
        )


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module for ``name`` (or ``"auto"``) on tensors of ``device``/``dtype``.

    Raises ValueError for an unknown name, or for a known backend that cannot run
    here, saying how to get it.
    """
    if name == "auto":
        if dtype not in KERNEL_DTYPES:
            return _module("reference")[0]
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return _module(candidate)[0]
        return _module("reference")[0]
    check_backend_available(name, device)
    if name != "reference" and dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"backend={name!r} takes float32, bfloat16 or float16 logits, not {dtype}; "
            "use backend='reference' for float64"
        )
    return _module(name)[0]


# Load the backends now, not on first use inside a torch.compile'd function (where the
# import would be a graph break). Triton only where it can run without its interpreter
# (a CUDA machine; torch.compile imports it there anyway): importing it costs seconds.
for _name in ("reference", "cpp", "cuda") + (("triton",) if torch.cuda.is_available() else ()):
    _module(_name)
