"""The fused linear path's inputs: their checks, the projection dtype and the chunk size.

Shared by the linear path (:mod:`pyfastpo.linear`) and its vocab-parallel form
(:mod:`pyfastpo.vocab_parallel_linear`), below both.
"""

from __future__ import annotations

import math

import torch

from .validation import (
    FLOAT_DTYPES,
    check_labels,
    check_plain_tensor,
    check_same_device,
    is_dtensor,
)
from .vocab_parallel import local_head

DEFAULT_MEMORY_BUDGET = {"cuda": 1 << 30, "cpu": 256 << 20}
"""Bytes of chunk logits held at once when neither chunk_tokens nor a budget is given, by
device type. On a GPU each chunk adds a [V, H] product into the float32 weight-gradient
accumulator (a read-modify-write of 4 x V x H bytes), so small chunks are slow: on an
H100 at Llama-3-8B's head 1 GiB took 50.7 ms fwd+bwd against 83.9 ms at 256 MiB, for
265 MiB more peak (benchmarks/results/gpu-h100-2026-11-26). Other devices: the CPU's."""


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (an integer, or a float with an integral value), else ValueError."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value != int(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def chunk_tokens_for(chunk_tokens, memory_budget_bytes, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Valid tokens projected per chunk: ``chunk_tokens``, or as many as ``memory_budget_bytes``
    (default: :data:`DEFAULT_MEMORY_BUDGET` for ``device``'s type) holds."""
    if chunk_tokens is not None:
        return positive_int("chunk_tokens", chunk_tokens)
    if memory_budget_bytes is None:
        budget = DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    else:
        budget = positive_int("memory_budget_bytes", memory_budget_bytes)
    # A chunk costs its logits plus, in the backends, at most float32 temporaries of the same size.
    per_token = vocab * (torch.empty((), dtype=dtype).element_size() + 4)
    return max(1, budget // per_token)


def projection_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the lm_head matmul runs in: autocast's dtype when autocast is on for
    ``device_type`` (what ``hidden @ weight.T`` would give under it; float64 is left
    alone), else ``dtype``. Forward and backward both project in it explicitly, so the
    backward's recomputed logits are bit-identical to the forward's even though
    autograd runs the backward outside autocast."""
    if dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def check_linear_inputs(hidden, weight, bias, labels, ignore_index, what="hidden", w_name="weight", b_name="bias"):
    """Validate one projection's inputs (``what``, ``w_name``, ``b_name`` name them in
    messages); return the labels as contiguous int64. A vocab-sharded weight (DTensor,
    :func:`pyfastpo.vocab_parallel.local_head`) is checked through its local rows."""
    vocab = weight.shape[0]
    if is_dtensor(weight):
        weight, bias = local_head(weight, bias, w_name, b_name)[:2]
    for name, x in ((what, hidden), (w_name, weight), ("labels", labels)) + (
        ((b_name, bias),) if bias is not None else ()
    ):
        check_plain_tensor(name, x)
    if hidden.dim() != 3:
        raise ValueError(f"{what} must have shape [N, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{w_name} must have shape [V, H] with H = {what}.shape[-1] = {hidden.shape[2]} "
            f"(the lm_head's weight), got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{b_name} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, x in ((what, hidden), (w_name, weight), (b_name, bias)):
        if x is not None and x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    for name, x in ((w_name, weight), (b_name, bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise ValueError(
                f"{what} ({hidden.dtype}) and {name} ({x.dtype}) must share a dtype; cast with .to({hidden.dtype})"
            )
    check_same_device(**{what: hidden, w_name: weight, b_name: bias, "labels": labels})
    return check_labels(labels, tuple(hidden.shape[:2]), vocab, ignore_index, what)
