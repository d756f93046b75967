"""Launch configuration (block size, warps) shared by the forward and backward kernels.

Both kernels stream one row of ``V`` logits per program and are bandwidth-bound.
The table, per element size:

    =========  ================  ==========================  ===================
    dtype      BLOCK_V cap       elements / thread at cap     num_warps
    =========  ================  ==========================  ===================
    16-bit     4096 (8 KiB)      16 (2 x 16-byte loads)       BLOCK_V / 512, 1..8
    float32    2048 (8 KiB)      8  (2 x 16-byte loads)       BLOCK_V / 256, 1..8
    =========  ================  ==========================  ===================

``BLOCK_V = min(next_pow2(V), cap)``. Why: a block of 8 KiB per iteration gives
every thread two full 16-byte vector loads in flight and keeps the loop short
(~32 iterations at V = 128k), while the per-thread footprint (the block's
elements plus their exponentials, a few scalars of online state) stays far below
the register budget, so several programs fit per SM to hide memory latency.
Warps grow with the block so that each thread always owns 32 bytes of it; small
vocabularies get fewer warps rather than idle lanes. These are first choices from
that reasoning, not yet tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton

_MAX_BLOCK_BYTES = 8192
_BYTES_PER_THREAD = 32


def launch_config(
    vocab: int, dtype: torch.dtype, block_v: int | None = None, num_warps: int | None = None
) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``vocab`` elements of ``dtype``.

    ``block_v`` overrides the block size (must be a power of two); warps follow it
    unless ``num_warps`` overrides them too (a power of two from 1 to 32; the GPU
    check's configuration sweep uses both).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    if block_v is None:
        block_v = min(triton.next_power_of_2(max(vocab, 1)), _MAX_BLOCK_BYTES // elem)
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if num_warps is not None:
        if num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
        return block_v, num_warps
    per_thread = _BYTES_PER_THREAD // elem
    return block_v, max(1, min(8, block_v // (32 * per_thread)))
