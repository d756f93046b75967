"""The contract every ``sequence_logps`` backend implements.

A backend is a module-like object with a ``name`` and two functions. Validation,
the per-sequence reductions and the autograd Function live once, above the
backends, in :mod:`pyfastpo.sequence_logps`; a backend only does per-token math.

``forward(logits, labels, ignore_index) -> TokenStats``
    logits: ``[N, T, V]`` float32 / bfloat16 / float16 (float64 for
    ``reference`` only), ``stride(-1) == 1``, any other strides (a view such as
    ``logits[:, :-1]`` is never copied).
    labels: ``[N, T]`` int64, contiguous, already validated: every entry is
    either ``ignore_index`` or in ``[0, V)``.
    Returns four ``[N, T]`` contiguous tensors in the compute dtype (float32,
    float64 for float64 input): per-token ``logp = x_y - lse``, ``lse``,
    ``entropy`` (nats) and ``sum_logits = sum_v x_v``. At ignored tokens
    ``logp``, ``entropy`` and ``sum_logits`` are exactly 0 and ``lse`` is
    unspecified; an ignored token's row of logits is never read.

``backward(logits, labels, lse, grad_scale, ignore_index, out) -> None``
    Writes ``out[n, t, v] = grad_scale[n] * ([v == y] - exp(x_v - lse[n, t]))``
    for valid tokens and 0 for ignored ones, in ``out``'s dtype (the logits'
    dtype); the target column's ``1 - p`` is computed in float32.
    grad_scale: ``[N]`` float32 (float64 for float64 input), contiguous.
    out: ``[N, T, V]``, ``stride(-1) == 1``, either a fresh tensor or ``logits``
    itself (in-place backward): a backend must read a row before it writes it.

All offsets are 64-bit: ``N * T * V`` above 2**31 is the normal case.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token statistics of one forward pass; each ``[N, T]``, compute dtype."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    sum_logits: torch.Tensor


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Input dtypes the compiled backends (triton, cuda, cpp) accept."""
