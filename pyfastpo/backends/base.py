"""The contract every ``sequence_logps`` backend implements.

A backend is a module-like object with a ``name`` and two functions. Validation,
the per-sequence reductions and the autograd Function live once, above the
backends, in :mod:`pyfastpo.sequence_logps`; a backend only does per-token math.

``forward(logits, labels, ignore_index, log_sum_sq=False) -> TokenStats``
    logits: ``[N, T, V]`` float32 / bfloat16 / float16 (float64 for
    ``reference`` only), ``stride(-1) == 1``, any other strides (a view such as
    ``logits[:, :-1]`` is never copied).
    labels: ``[N, T]`` int64, contiguous, already validated: every entry is
    either ``ignore_index`` or in ``[0, V)``.
    Returns five ``[N, T]`` contiguous tensors in the compute dtype (float32,
    float64 for float64 input): per-token ``logp = (x_y - m) - log s``, the row
    max ``m``, ``log_sum = log s`` with ``s = sum_v exp(x_v - m)``, ``entropy``
    (nats) and ``sum_logits = sum_v x_v``. ``m`` and ``log s`` are kept apart
    (never ``lse = m + log s``): that sum rounds at the size of the logits and
    would cost the log-probs their digits at large offsets. At ignored tokens
    ``logp``, ``entropy`` and ``sum_logits`` are exactly 0 and ``m``/``log_sum``
    unspecified; an ignored token's row of logits is never read. A row with a
    NaN or +inf logit, or only -inf logits, is undefined: ``log_sum``,
    ``entropy`` and ``logp`` are NaN (and its gradient is NaN).
    With ``log_sum_sq=True`` a sixth
    statistic from the same pass: ``log sum_v p_v^2 = log q - 2 log s`` with
    ``q = sum_v exp(2 (x_v - m))`` (WPO's weight), 0 at ignored tokens; else None.

``backward(logits, labels, row_max, log_sum, grad_scale, ignore_index, out) -> None``
    Writes ``out[n, t, v] = grad_scale[n] * ([v == y] - exp((x_v - m) - log s))``
    for valid tokens (NaN for an undefined row) and 0 for ignored ones, in
    ``out``'s dtype (the logits' dtype); the target column's ``1 - p`` is
    computed in float32.
    row_max, log_sum: ``[N, T]`` from ``forward``, contiguous.
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
    row_max: torch.Tensor
    log_sum: torch.Tensor
    entropy: torch.Tensor
    sum_logits: torch.Tensor
    log_sum_sq: torch.Tensor | None = None


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Input dtypes the compiled backends (triton, cuda, cpp) accept."""
