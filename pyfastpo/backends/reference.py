"""Pure-PyTorch backend: the oracle every other backend is tested against.

It works on any device and dtype (float64 included), touches only tokens whose
label is valid, and processes them in chunks of rows so that it never holds a
float32 copy of the whole logits: peak extra memory is a few chunks of
``CHUNK_BYTES``, not ``N * T * V``.
"""

from __future__ import annotations

import torch

from ..validation import check_not_capturing
from .base import TokenStats

name = "reference"

CHUNK_BYTES = 8 << 20
"""Target size of one float32 working chunk of rows (bytes)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unavailable_reason(device: torch.device) -> str | None:
    """The reference backend runs on every device."""
    return None


def _valid_chunks(labels: torch.Tensor, ignore_index: int, vocab: int):
    """Yield ``(n_idx, t_idx)`` index pairs of valid tokens, a bounded chunk at a time."""
    n_idx, t_idx = (labels != ignore_index).nonzero(as_tuple=True)
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    for start in range(0, n_idx.numel(), rows):
        yield n_idx[start : start + rows], t_idx[start : start + rows]


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, log_sum_sq: bool = False) -> TokenStats:
    """The contract's forward (:mod:`pyfastpo.backends.base`) in torch, chunk by chunk of valid rows."""
    check_not_capturing(logits, "the reference backend")
    n, t, v = logits.shape
    cdtype = compute_dtype(logits.dtype)
    stats = torch.zeros(len(TokenStats._fields) - (not log_sum_sq), n, t, dtype=cdtype, device=logits.device)
    for n_idx, t_idx in _valid_chunks(labels, ignore_index, v):
        x = logits[n_idx, t_idx].to(cdtype)  # [rows, V]
        y = labels[n_idx, t_idx]
        m = x.max(dim=-1).values  # NaN when the row holds a NaN
        shifted = x - m[:, None]  # exact to the inputs' rounding at any offset
        log_s = torch.logsumexp(shifted, dim=-1)
        # Undefined rows (a NaN or +inf logit, or only -inf): NaN, as in every backend.
        log_s = torch.where(torch.isfinite(m), log_s, torch.full_like(log_s, float("nan")))
        logp = shifted - log_s[:, None]
        p = torch.exp(logp)
        # Entropy as -sum p log p (not lse - sum p x: that cancels at large logits);
        # a column with p == 0 (x == -inf) adds nothing instead of nan; NaN stays NaN.
        plogp = torch.where(p == 0, torch.zeros((), dtype=cdtype, device=x.device), p * logp)
        stats[0, n_idx, t_idx] = logp.gather(1, y[:, None]).squeeze(1)
        stats[1, n_idx, t_idx] = m
        stats[2, n_idx, t_idx] = log_s
        stats[3, n_idx, t_idx] = -plogp.sum(-1)
        stats[4, n_idx, t_idx] = x.sum(-1)
        if log_sum_sq:  # log sum p^2 = log sum exp(2 (x - m)) - 2 log s, NaN for an undefined row
            stats[5, n_idx, t_idx] = torch.logsumexp(2 * shifted, dim=-1) - 2 * log_s
    return TokenStats(*stats.unbind(0))


def backward(logits, labels, row_max, log_sum, grad_scale, ignore_index: int, out) -> None:
    """The contract's backward (:mod:`pyfastpo.backends.base`) in torch; ``out`` may be ``logits``."""
    check_not_capturing(logits, "the reference backend")
    v = logits.shape[-1]
    cdtype = compute_dtype(logits.dtype)
    ignored = labels == ignore_index
    if ignored.any():
        out[ignored] = 0
    for n_idx, t_idx in _valid_chunks(labels, ignore_index, v):
        x = logits[n_idx, t_idx].to(cdtype)
        y = labels[n_idx, t_idx][:, None]
        g = grad_scale[n_idx].to(cdtype)[:, None]
        m = row_max[n_idx, t_idx].to(cdtype)[:, None]
        p = torch.exp((x - m) - log_sum[n_idx, t_idx].to(cdtype)[:, None])
        grad = -g * p
        # The target column as g * (1 - p_y), computed in the compute dtype.
        grad.scatter_(1, y, g * (1 - p.gather(1, y)))
        out[n_idx, t_idx] = grad.to(out.dtype)
