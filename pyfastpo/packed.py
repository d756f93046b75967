"""Packed sequences (padding-free): several sequences in one row of ``[N, T]``.

A packed batch holds its sequences back to back, each inside one row; TRL's
``padding_free`` collator and flash-attention's varlen kernels describe the layout by
``position_ids`` that restart at 0 where a sequence starts, or by ``cu_seqlens``, the
cumulative sequence lengths over the flattened ``N * T`` tokens. This module turns either
into :class:`Segments` (validated, before any kernel runs) and reduces per-token
statistics per segment in a fixed order (``torch.segment_reduce``: no atomics, so
deterministic on every device).

Labels: as everywhere in pyfastpo they are already aligned with the logits (the caller
shifts). A segment's last position would predict the next segment's first token, so the
caller sets its label to ``ignore_index`` (as transformers and TRL do for packed data);
the segment boundaries belong to the logits' positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .validation import check_plain_tensor

PACKED_ARGUMENTS = ("position_ids", "cu_seqlens")


class Segments(NamedTuple):
    """Validated segments of a packed ``[N, T]`` batch, in order of appearance.

    ids: ``[N*T]`` int64, the segment of each flattened token.
    starts: ``[S]`` int64, each segment's first flattened token.
    lengths: ``[S]`` int64, each segment's token count (>= 1).
    count: S, the number of segments (packed sequences).
    """

    ids: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    count: int


def _check_integer_tensor(name: str, x, dim: int, device: torch.device) -> None:
    check_plain_tensor(name, x)
    if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the labels are on {device}; move it with .to(device)")


def _starts_from_position_ids(position_ids: torch.Tensor, shape: tuple, device: torch.device) -> torch.Tensor:
    """Flattened start indices: every position 0 starts a sequence."""
    _check_integer_tensor("position_ids", position_ids, 2, device)
    if tuple(position_ids.shape) != shape:
        raise ValueError(
            f"position_ids must have the labels' shape {shape} (aligned with the logits' positions), "
            f"got {tuple(position_ids.shape)}"
        )
    if position_ids.numel() and bool((position_ids < 0).any()):
        raise ValueError("position_ids must be non-negative (0 starts a sequence)")
    if shape[1] and bool((position_ids[:, 0] != 0).any()):
        row = int((position_ids[:, 0] != 0).nonzero()[0, 0])
        raise ValueError(
            f"position_ids[{row}, 0] = {int(position_ids[row, 0])}: every row must start a sequence "
            "(position 0); a sequence may not cross rows"
        )
    return (position_ids.reshape(-1) == 0).nonzero().squeeze(1)


def _starts_from_cu_seqlens(cu_seqlens: torch.Tensor, shape: tuple, device: torch.device) -> torch.Tensor:
    """Flattened start indices from cumulative lengths ``[S+1]`` over the ``N*T`` tokens."""
    _check_integer_tensor("cu_seqlens", cu_seqlens, 1, device)
    n, t = shape
    cu = cu_seqlens.to(torch.int64)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n * t:
        got = cu.tolist() if cu.numel() <= 8 else f"[{int(cu[0])}, ..., {int(cu[-1])}]"
        raise ValueError(
            f"cu_seqlens must start at 0 and end at N*T = {n * t} (every token in one sequence; "
            f"trailing padding belongs to the last one, labelled ignore_index), got {got}"
        )
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError("cu_seqlens must be strictly increasing (every sequence holds at least one token)")
    row_starts = torch.arange(0, n * t, t, device=device)
    if not bool(torch.isin(row_starts, cu).all()):
        raise ValueError(f"cu_seqlens has a sequence crossing rows: every row start (multiples of T = {t}) must be one")
    return cu[:-1]


def packed_segments(shape: tuple, device: torch.device, position_ids=None, cu_seqlens=None) -> Segments | None:
    """The :class:`Segments` of a packed batch of ``shape = (N, T)`` on ``device``, or None
    when neither ``position_ids`` nor ``cu_seqlens`` is given (one sequence per row).

    position_ids: ``[N, T]`` integer, aligned with the logits; 0 starts a sequence, so
        ``position_ids[:, 0]`` must be 0 (no sequence crosses rows). Padding after a
        sequence belongs to it when its positions are not 0 (transformers gives padding
        position 1): label it ``ignore_index``.
    cu_seqlens: ``[S+1]`` integer (flash-attention's varlen layout), cumulative lengths
        over the flattened ``N*T`` tokens: starts at 0, strictly increasing, ends at
        ``N*T``, every row start among them.

    Raises ValueError (both given, wrong shape, dtype or device, a boundary that is not
    one) before any kernel runs. Reads the boundaries on the host: one synchronization.
    """
    if position_ids is None and cu_seqlens is None:
        return None
    if position_ids is not None and cu_seqlens is not None:
        raise ValueError("give position_ids or cu_seqlens (the packed layout), not both")
    shape = tuple(int(s) for s in shape)
    if position_ids is not None:
        starts = _starts_from_position_ids(position_ids, shape, device)
    else:
        starts = _starts_from_cu_seqlens(cu_seqlens, shape, device)
    total = shape[0] * shape[1]
    ends = torch.cat((starts[1:], starts.new_full((min(1, starts.numel()),), total)))
    lengths = ends - starts
    ids = torch.repeat_interleave(torch.arange(starts.numel(), device=device), lengths, output_size=total)
    return Segments(ids, starts, lengths, starts.numel())


def segment_sum(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``[S]`` sums of ``values`` ``[N*T]`` (floating) over each segment, in a fixed order;
    differentiable (the gradient of a segment reaches each of its tokens)."""
    return torch.segment_reduce(values, "sum", lengths=segments.lengths, unsafe=True)


def segment_counts(mask: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``[S]`` int64: how many tokens of each segment ``mask`` ``[N*T]`` (bool) holds (exact)."""
    csum = torch.cat((mask.new_zeros(1, dtype=torch.int64), mask.to(torch.int64).cumsum(0)))
    return csum[segments.starts + segments.lengths] - csum[segments.starts]


def reduce_segments(logp, entropy, sum_logits, log_sum_sq, valid, segments: Segments, vocab: int, token_weights):
    """Per-segment ``(logps, num_tokens, entropy, mean_logits, log_sum_sq, unweighted_logps)``,
    each ``[S]``, from per-token statistics ``[N*T]`` (zero at ignored tokens; ``log_sum_sq``
    may be None) and ``valid`` ``[N*T]`` bool: the packed counterpart of
    :func:`pyfastpo.sequence_logps.reduce_tokens`. ``token_weights`` ``[N*T]`` (optional)
    weight each token's log-prob in ``logps``; ``unweighted_logps`` is then the plain sum
    (zeros without weights)."""
    num_tokens = segment_counts(valid, segments)
    plain = segment_sum(logp, segments)
    if token_weights is None:
        logps, unweighted = plain, torch.zeros_like(plain.detach())
    else:
        logps, unweighted = segment_sum(logp * token_weights.to(logp.dtype), segments), plain
    denom = (num_tokens * vocab).clamp_min(1).to(sum_logits.dtype)
    mean_logits = segment_sum(sum_logits, segments) / denom
    sq = segment_sum(log_sum_sq, segments) if log_sum_sq is not None else torch.zeros_like(mean_logits)
    return logps, num_tokens, segment_sum(entropy, segments), mean_logits, sq, unweighted


def packed_ld_token_weights(labels: torch.Tensor, segments: Segments, ld_alpha: float, ignore_index: int):
    """LD-DPO's token weights ``[N, T]`` float32 for a packed batch: as
    :func:`pyfastpo.ld_token_weights` with each segment a sequence (segments ``[:S/2]`` the
    chosen completions, ``[S/2:]`` their rejected partners; S even, checked by the caller).
    ``ld_alpha`` is checked by the caller."""
    valid = (labels != ignore_index).reshape(-1)
    csum = torch.cat((valid.new_zeros(1, dtype=torch.int64), valid.to(torch.int64).cumsum(0)))
    position = csum[1:] - csum[segments.starts][segments.ids]  # 1-based among the segment's valid tokens
    chosen, rejected = segment_counts(valid, segments).chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)[segments.ids]
    weights = torch.where(position <= shared, 1.0, float(ld_alpha))
    return (weights * valid).to(torch.float32).reshape(labels.shape)
