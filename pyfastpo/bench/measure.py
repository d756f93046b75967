"""Timing, peak memory, the byte and FLOP models, copy bandwidth and correctness.

Timing: each repetition prepares fresh inputs (untimed), then times the forward
and the backward separately; fwd+bwd is the median of their per-repetition sums.
On a GPU with CUDA events around each phase, on a CPU with ``time.perf_counter``.
Medians over ``repeats`` runs after ``warmup`` untimed ones.

Peak memory: one more fwd+bwd under :func:`pyfastpo.memory.peak_memory` (the
most memory held at once beyond what the inputs already held: CPU allocator
events from ``torch.profiler`` on a CPU, ``torch.cuda.max_memory_allocated`` on a
GPU). Outputs (the returned gradient) count; the inputs do not.

Byte model of the logits path (the op's floor, "3 x logits bytes"):
the forward reads the row of logits of every valid token, the backward reads it
again and writes the gradient of every row (zeros for ignored tokens), so

    fwd bytes = valid * V * e,    bwd bytes = (valid + N*T) * V * e

with ``e`` the logits' element size. That is exactly ``3 x logits bytes`` when
every token is valid. Achieved bandwidth is those bytes over the measured time,
for every contender alike (an effective bandwidth: a contender that moves more
bytes than the floor just scores lower), and is compared with a measured
device-to-device copy (``dst.copy_(src)``: 2 x bytes per copy).

FLOP model of the linear path (useful work only, no recomputation; prompt and
padding rows are not useful): fwd ``2 * valid * H * V``, bwd ``4 * valid * H * V``
(grad_hidden and grad_weight).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pyfastpo.memory import peak_memory

from .data import Size


@dataclass
class Timing:
    fwd_ms: float
    bwd_ms: float
    total_ms: float
    min_total_ms: float  # the fastest repetition: a hint of how noisy the median is


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(
    prepare: Callable[[], Any],
    forward: Callable[[Any], Any],
    backward: Callable[[Any, Any], Any],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> Timing:
    """Median forward, backward and forward+backward milliseconds."""
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        inputs = prepare()
        _sync(device)
        if device.type == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            out = forward(inputs)
            ev[1].record()
            backward(inputs, out)
            ev[2].record()
            torch.cuda.synchronize(device)
            f, b = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        else:
            t0 = time.perf_counter()
            out = forward(inputs)
            t1 = time.perf_counter()
            backward(inputs, out)
            t2 = time.perf_counter()
            f, b = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
        del inputs, out
        if i >= warmup:
            fwd.append(f)
            bwd.append(b)
    totals = [a + b for a, b in zip(fwd, bwd)]
    return Timing(statistics.median(fwd), statistics.median(bwd), statistics.median(totals), min(totals))


def peak_fwd_bwd(prepare, forward, backward, device: torch.device) -> int:
    """Peak bytes of one forward+backward beyond what its inputs already held."""
    inputs = prepare()

    def step():
        return backward(inputs, forward(inputs))

    _, peak = peak_memory(step, device)
    return int(peak)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device`` (read + write: 2 x nbytes per copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 2:
            times.append(seconds)
    return 2 * src.numel() * 4 / statistics.median(times)


def logits_bytes(size: Size, valid: int, element_size: int) -> tuple[int, int]:
    """(forward, backward) bytes of the logits op's floor (module docstring)."""
    row = size.v * element_size
    return valid * row, (valid + size.n * size.t) * row


def linear_flops(size: Size, valid: int) -> tuple[int, int]:
    """(forward, backward) useful FLOPs of the linear path (module docstring)."""
    one = 2 * valid * size.h * size.v
    return one, 2 * one


# (logps, gradient) relative tolerances: the allowed max |difference| to reference is
# tol * max(1, max |reference value|). float32 is float32 rounding summed over a row;
# half precision is about two units in the last place of the rounded gradient.
TOLERANCES = {
    ("logits", torch.float32): (1e-5, 1e-5),
    ("logits", torch.bfloat16): (4e-3, 1.6e-2),
    ("logits", torch.float16): (1e-3, 2e-3),
    ("logits", torch.float64): (1e-10, 1e-10),
    ("linear", torch.float32): (1e-4, 1e-4),
    ("linear", torch.bfloat16): (1e-2, 3e-2),
    ("linear", torch.float16): (3e-3, 1e-2),
    ("linear", torch.float64): (1e-9, 1e-9),
}


_CHECK_CHUNK = 1 << 26
"""Elements compared at once: a float64 copy of a whole 16x2048x128256 gradient is 31 GiB."""


def _chunked_max(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """max |a - b| (max |a| when ``b`` is None) in float64, a bounded chunk at a time; NaN
    if any element is NaN."""
    a = a.detach().reshape(-1)
    b = None if b is None else b.detach().reshape(-1)
    if not a.numel():
        return 0.0
    maxima = []
    for i in range(0, a.numel(), _CHECK_CHUNK):
        x = a[i : i + _CHECK_CHUNK].double()
        if b is not None:
            x = x - b[i : i + _CHECK_CHUNK].double()
        maxima.append(x.abs().max())
    return torch.stack(maxima).max().item()  # one host sync; NaN propagates


def _nan_max(values: list[float]) -> float:
    """max() that returns NaN when any value is NaN (the builtin depends on the order)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return _nan_max([_max_diff(x, y) for x, y in zip(a, b)])
    return _chunked_max(a, b)


def _max_abs(a) -> float:
    if isinstance(a, (tuple, list)):
        return _nan_max([_max_abs(x) for x in a])
    return _chunked_max(a)


def check(
    path: str,
    dtype: torch.dtype,
    got_logps,
    got_grad,
    ref_logps,
    ref_grad,
    float32_logps=False,
    got_loss=None,
    ref_loss=None,
) -> dict:
    """Max abs differences of logps, gradient(s) and (linear path) loss to reference, their
    allowed values, pass/fail. The loss is held to the logps tolerance.

    ``float32_logps``: the contender computes log-probs in float32 from the same inputs as
    the reference (pyfastpo's backends), so its logps are held to float32's tolerance
    whatever the input dtype (a dropped token cannot hide in a 16-bit allowance).
    """
    tol_l, tol_g = TOLERANCES[(path, dtype)]
    if float32_logps and dtype != torch.float64:
        tol_l = TOLERANCES[(path, torch.float32)][0]
    d_logps, d_grad = _max_diff(got_logps, ref_logps), _max_diff(got_grad, ref_grad)
    allow_l, allow_g = tol_l * max(1.0, _max_abs(ref_logps)), tol_g * max(1.0, _max_abs(ref_grad))
    ok = bool(d_logps <= allow_l and d_grad <= allow_g)  # NaN fails
    out = {"d_logps": d_logps, "d_grad": d_grad, "allow_logps": allow_l, "allow_grad": allow_g}
    if got_loss is not None and ref_loss is not None:
        d_loss, allow_loss = _max_diff(got_loss, ref_loss), tol_l * max(1.0, _max_abs(ref_loss))
        ok = ok and bool(d_loss <= allow_loss)
        out.update(d_loss=d_loss, allow_loss=allow_loss)
    return {**out, "passed": ok}
