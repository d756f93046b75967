"""What both modes of the fused linear path do to one chunk of valid tokens: project it
to logits, and turn its logits' gradient into the gradients of the hidden states, the
weight and the bias."""

from __future__ import annotations

import torch


def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Chunk logits ``[C, 1, V]`` from ``h`` ``[C, H]`` and operands already in the projection
    dtype: each token is its own length-1 "sequence", so the backends' per-sequence
    gradient scale becomes a per-token one."""
    logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    return logits.unsqueeze(1)


def cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x`` in ``dtype`` (None stays None)."""
    return None if x is None else x.to(dtype)


def add_chunk_gradients(grad_logits, h, w, where, grad_hidden, grad_weight, grad_bias) -> None:
    """From one chunk's ``grad_logits`` ``[C, V]`` (dLoss/dlogits, in the projection dtype),
    its hidden states ``h`` ``[C, H]`` and the projected weight ``w`` ``[V, H]``:
    ``grad_hidden[where] = grad_logits @ w``, ``grad_weight += grad_logits^T h`` and
    ``grad_bias += sum(grad_logits)``, each skipped where its tensor is None. ``where``:
    the chunk's ``(n_idx, t_idx)`` positions in ``grad_hidden`` ``[N, T, H]``; the weight and
    bias accumulators are float32 (float64 for float64 inputs)."""
    if grad_hidden is not None:
        grad_hidden[where] = (grad_logits @ w).to(grad_hidden.dtype)
    if grad_weight is not None:
        acc = grad_weight.dtype
        if grad_logits.dtype == acc or not grad_logits.is_cuda:
            # In place, no [V, H] temporary per chunk; the float32 copy of a 16-bit chunk is
            # within the chunk's memory budget.
            grad_weight.addmm_(grad_logits.t().to(acc), h.to(acc))
        else:
            # On a GPU keep the 16-bit GEMM (float32 accumulation inside cuBLAS, many times a
            # float32 GEMM's speed) and add its [V, H] product in place.
            grad_weight.add_(grad_logits.t() @ h)
    if grad_bias is not None:
        grad_bias += grad_logits.to(grad_bias.dtype).sum(0)
