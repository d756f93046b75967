"""Peak extra memory of a call, measured from real allocations on CPU and GPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TypeVar

import torch

R = TypeVar("R")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side prints start/stop lines there."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], R], device: torch.device | str = "cpu") -> tuple[R, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``: the most memory it held at once
    beyond what was allocated when it started.

    On CUDA this is ``torch.cuda.max_memory_allocated`` relative to the start. On
    CPU it replays the allocation and free events of PyTorch's CPU allocator
    recorded by ``torch.profiler`` (``profile_memory=True``) in time order; only
    tensor memory is counted, not Python objects.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return result, peak
