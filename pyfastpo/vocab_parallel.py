"""Vocab-parallel (tensor-parallel) log-probs: logits sharded on the vocabulary across ranks.

Each rank streams its own vocabulary slice ``[offset, offset + V_r)`` with the same
backend kernels, then the per-token online states merge exactly, with two all-reduces
of per-token tensors (never an all-gather of logits):

1. MAX of the slice maxima ``m_r`` gives the row max ``M``.
2. SUM of, per rank, ``a_r = exp(m_r - M + log s_r)`` (the slice's share of the row's
   mass, relative to ``M``), ``a_r (H_r + log 1/a_r)`` (``H_r`` the slice's own entropy),
   ``a_r^2 exp(log sum p_r^2)``, the slice's logit sum and the target logit (held by
   the one rank whose slice has the label; 0 elsewhere). Then, with ``S = sum_r a_r``:
   ``log s = log S``, ``logp = (x_y - M) - log s``,
   ``entropy = sum_r a_r (H_r - log a_r) / S + log S`` and
   ``log sum p^2 = log sum_r a_r^2 q_r - 2 log S``.

The backward is local to each slice: ``g ([v == y] - exp((x_v - M) - log s))`` with the
global ``M`` and ``log s``. The kernels take labels inside their slice, so a token whose
label another rank holds runs with label 0 (a placeholder), and that column is then
rewritten as ``-g p_0`` from its logit read before the kernel (the kernel's ``g (1 - p_0)``
is never used: no cancellation). A slice of width 0 (uneven shards) contributes nothing.
A row with a NaN or +inf logit, or only -inf logits, is undefined as on one rank (NaN
log-prob, entropy and gradient), decided from the merged sums, whatever a backend's or a
collective's max does with NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .backends import TokenStats, backend_module, get_backend
from .packed import packed_segments, reduce_segments
from .sequence_stats import (
    SequenceLogps,
    _has_internal_overlap,
    first_order_only,
    make_sequence_logps,
    reduce_tokens,
    run_backward,
    stat_dtype,
)
from .validation import check_flags, check_label_values, check_logits_labels, check_token_weights, is_dtensor

PLACEHOLDER_LABEL = 0
"""The in-slice label a kernel runs with for a valid token whose label another rank holds."""

LOCAL_IGNORE = -1
"""The ignore index of the in-slice labels (every in-slice label is in ``[0, V_r)``)."""


class VocabShard(NamedTuple):
    """Where one rank's slice of a vocab-sharded tensor sits.

    local: the rank's plain tensor (``DTensor.to_local()``, differentiable), its last dim
        (or first, for an lm_head weight) the slice.
    group: the process group of the mesh dimension that shards the vocabulary.
    offset: the slice's first vocabulary index; vocab: the full vocabulary size V.
    """

    local: torch.Tensor
    group: dist.ProcessGroup
    offset: int
    vocab: int


def vocab_shard(x, vocab_dim: int, name: str) -> VocabShard:
    """The rank's slice of DTensor ``x`` sharded on ``vocab_dim`` (-1 for logits
    ``[N, T, V]``, 0 for an lm_head weight ``[V, H]`` or bias ``[V]``).

    Supported layouts: one mesh dimension ``Shard(vocab_dim)`` (uneven shards too) and
    every other one ``Replicate()`` (a 1-D tensor-parallel mesh, or the TP dimension of a
    larger mesh whose other dimensions replicate). Raises ValueError naming what is
    supported for anything else (a ``Partial`` placement, other dims sharded)."""
    from torch.distributed.tensor import Replicate, Shard

    dim = vocab_dim % x.dim()
    shard_dims = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim == dim]
    others = [p for i, p in enumerate(x.placements) if i not in shard_dims and not isinstance(p, Replicate)]
    if len(shard_dims) != 1 or others:
        raise ValueError(
            f"{name} is a DTensor with placements {tuple(x.placements)}; pyfastpo takes a DTensor sharded on "
            f"the vocabulary (dim {dim}: Shard({dim}) on one mesh dimension, Replicate() on the others, what "
            "ColwiseParallel(use_local_output=False) on the lm_head gives), or a plain tensor "
            "(x.full_tensor() or x.to_local())"
        )
    mesh_dim = shard_dims[0]
    mesh = x.device_mesh
    size, offset = Shard.local_shard_size_and_offset(x.shape[dim], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
    local = x.to_local()
    if local.shape[dim] != size:
        raise ValueError(
            f"{name}'s local shard has {local.shape[dim]} vocabulary entries where torch.chunk's split of "
            f"{x.shape[dim]} over {mesh.size(mesh_dim)} ranks gives {size}; pyfastpo needs DTensor's own sharding"
        )
    return VocabShard(local, mesh.get_group(mesh_dim), int(offset), int(x.shape[dim]))


def check_same_on_ranks(group, hint: str, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError on every rank of ``group`` unless each tensor is the same on all of
    them (compared by float64 sums of values and squares: one all-reduce of a few numbers).
    A vocab-parallel call needs the same tokens everywhere; a data-parallel rank's own
    batch with a weight sharded by FSDP (also ``Shard(0)`` DTensors) would otherwise give
    silently wrong numbers. ``hint`` ends the message."""
    names = [k for k, x in tensors.items() if x is not None]
    sums = []
    for name in names:
        x = tensors[name].detach().reshape(-1)
        x = x if x.is_floating_point() else x.double()  # integers: exact in float64 at these sizes
        # Order-sensitive too (a position weight), without a float64 copy of a large tensor.
        ramp = (torch.arange(x.numel(), device=x.device) % 7 + 1).to(x.dtype)
        sums += [x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64) ** 2]
        sums.append((x * ramp).sum(dtype=torch.float64))
    sums = torch.stack(sums)
    both = torch.cat((sums, -sums))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = sums.numel()
    high, low = both[:n], -both[n:]
    # Decided from the reduced values only, so every rank takes the same branch.
    same = torch.isclose(high, low, rtol=1e-12, atol=0) | (torch.isnan(high) & torch.isnan(low))
    if not bool(same.all()):
        which = sorted({names[i // 3] for i in (~same).nonzero().flatten().tolist()})
        raise ValueError(
            f"{', '.join(which)} differ across the ranks that shard the vocabulary; a vocab-parallel call needs "
            f"the same tokens on every rank of the tensor-parallel group.{' ' + hint if hint else ''}"
        )


def local_head(weight, bias, w_name: str = "weight", b_name: str = "bias"):
    """``(weight_r, bias_r, offset, vocab, group)`` of a vocab-sharded lm_head: DTensors
    ``[V, H]`` and ``[V]`` sharded by rows on one mesh dimension (the bias, when given, a
    DTensor sharded the same way)."""
    shard = vocab_shard(weight, 0, w_name)
    local_bias = None
    if bias is not None:
        if not is_dtensor(bias):
            raise ValueError(f"{w_name} is a vocab-sharded DTensor, so {b_name} must be one too (Shard(0))")
        b_shard = vocab_shard(bias, 0, b_name)
        if b_shard.offset != shard.offset or b_shard.local.shape[0] != shard.local.shape[0]:
            raise ValueError(f"{b_name} must be sharded over the vocabulary exactly as {w_name}")
        local_bias = b_shard.local
    return shard.local, local_bias, shard.offset, shard.vocab, shard.group


class LocalLabels(NamedTuple):
    """A rank's view of the labels ``[N, T]`` (or ``[C, 1]``) for its slice.

    valid: bool, the token counts (label != ignore_index).
    owned: bool, the label is in this rank's slice.
    labels: int64, contiguous: ``label - offset`` where owned, :data:`PLACEHOLDER_LABEL`
        at the other valid tokens, :data:`LOCAL_IGNORE` at ignored ones.
    """

    valid: torch.Tensor
    owned: torch.Tensor
    labels: torch.Tensor


def local_labels(labels: torch.Tensor, ignore_index: int, offset: int, width: int) -> LocalLabels:
    """:class:`LocalLabels` of ``labels`` for the slice ``[offset, offset + width)``."""
    valid = labels != ignore_index
    owned = valid & (labels >= offset) & (labels < offset + width)
    placeholder = torch.where(valid, PLACEHOLDER_LABEL, LOCAL_IGNORE)
    return LocalLabels(valid, owned, torch.where(owned, labels - offset, placeholder).contiguous())


def local_forward(impl, logits: torch.Tensor, lab: LocalLabels, with_log_sum_sq: bool):
    """The slice's per-token stats ``(TokenStats, target logit)`` from ``impl.forward`` on
    ``logits`` ``[N, T, V_r]``; the target logit (compute dtype) is 0 where not owned. A slice
    of width 0 gives ``m = -inf`` (it holds no mass) and zeros."""
    cdtype = stat_dtype(logits.dtype)
    if logits.shape[-1] == 0:
        zeros = torch.zeros(lab.valid.shape, dtype=cdtype, device=logits.device)
        sq = zeros if with_log_sum_sq else None  # every rank runs the same collectives
        empty = TokenStats(zeros, torch.full_like(zeros, -float("inf")), zeros, zeros, zeros, sq)
        return empty, zeros
    if with_log_sum_sq:
        stats = impl.forward(logits, lab.labels, LOCAL_IGNORE, log_sum_sq=True)
    else:
        stats = impl.forward(logits, lab.labels, LOCAL_IGNORE)
    # The target logit itself (not logp + m + log s, which would round at the logits' size).
    target = logits.gather(-1, torch.where(lab.owned, lab.labels, 0)[..., None]).squeeze(-1).to(cdtype)
    return stats, torch.where(lab.owned, target, 0)


def merge(stats: TokenStats, target: torch.Tensor, valid: torch.Tensor, group) -> TokenStats:
    """Every rank's slice stats merged into the full vocabulary's (module docstring), the same
    on every rank of ``group``; each field ``[N, T]``, 0 at ignored tokens (``row_max`` and
    ``log_sum`` too). ``log_sum_sq`` is None when ``stats`` lacks it."""
    neg_inf = torch.tensor(-float("inf"), dtype=stats.row_max.dtype, device=valid.device)
    m = torch.where(valid, stats.row_max, neg_inf)
    big_m = m.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    # A slice holding no mass (width 0, or only -inf logits: its own log_sum is NaN) adds 0;
    # a NaN row max spreads through log_a. Undefined rows are decided after the sums below.
    holds = valid & (m != neg_inf)
    m_safe = torch.where(holds, m, 0)
    log_a = torch.where(holds, m_safe - torch.where(holds, big_m, 0) + stats.log_sum, neg_inf)
    a = torch.exp(log_a)
    with_sq = stats.log_sum_sq is not None
    parts = [
        a,
        torch.where(holds, a * (stats.entropy - log_a), 0),
        torch.where(valid, stats.sum_logits, 0),
        target,
    ] + ([torch.where(holds, torch.exp(2 * log_a + stats.log_sum_sq), 0)] if with_sq else [])
    sums = torch.stack(parts)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    total, ent_sum, sum_logits, x_y = sums[:4]
    # An undefined row, as on one rank: a NaN logit anywhere (the logit sum is NaN whatever a
    # backend's max did with it, and collectives' MAX may drop a NaN), a +inf logit, or no
    # mass at all (only -inf logits). Its log-sum is NaN, so its gradient is NaN too.
    undefined = torch.isnan(sum_logits) | torch.isnan(big_m) | (big_m == float("inf")) | (total == 0)
    log_s = torch.where(undefined, float("nan"), torch.log(total))
    zero = torch.zeros((), dtype=log_s.dtype, device=log_s.device)
    row_max = torch.where(valid, big_m, zero)
    log_sum = torch.where(valid, log_s, zero)
    logp = torch.where(valid, (x_y - big_m) - log_s, zero)
    entropy = torch.where(valid, ent_sum / total + log_s, zero)
    sq = torch.where(valid, torch.log(sums[4]) - 2 * log_s, zero) if with_sq else None
    return TokenStats(logp, row_max, log_sum, entropy, sum_logits, sq)


def local_backward(impl, logits, lab: LocalLabels, row_max, log_sum, grad_scale, out) -> None:
    """The slice's gradient into ``out`` (``logits`` itself for an in-place backward):
    ``g ([v == y] - exp((x_v - M) - log s))`` from the merged ``row_max``/``log_sum``
    ``[N, T]``; ``grad_scale`` ``[N]`` per sequence or ``[N, T]`` per token (as
    :func:`pyfastpo.sequence_logps.run_backward`)."""
    if logits.shape[-1] == 0:
        return
    others = lab.valid & ~lab.owned
    # Read the placeholder column before the kernel overwrites it (out may be logits).
    x0 = logits[..., PLACEHOLDER_LABEL].to(row_max.dtype, copy=True)
    run_backward(impl, logits, lab.labels, row_max, log_sum, grad_scale, LOCAL_IGNORE, out)
    g = grad_scale if grad_scale.dim() == 2 else grad_scale[:, None]
    fixed = -g * torch.exp((x0 - row_max) - log_sum)
    column = out[..., PLACEHOLDER_LABEL]
    column.copy_(torch.where(others, fixed.to(out.dtype), column))


class ShardedLogps(torch.autograd.Function):
    """Per-token merged stats of vocab-sharded logits: ``forward(local, labels, ...) ->
    (TokenStats fields...)``, the log-prob differentiable; the backward writes each
    rank's slice of the gradient (in place when allowed)."""

    @staticmethod
    def forward(ctx, local, labels, ignore_index, offset, group, backend, inplace, with_log_sum_sq):
        impl = backend_module(backend)
        lab = local_labels(labels, ignore_index, offset, local.shape[-1])
        stats, target = local_forward(impl, local, lab, with_log_sum_sq)
        merged = merge(stats, target, lab.valid, group)
        ctx.save_for_backward(local, labels, merged.row_max, merged.log_sum)
        ctx.ignore_index, ctx.offset, ctx.backend, ctx.inplace = ignore_index, offset, backend, inplace
        outputs = tuple(s for s in merged if s is not None)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_logp, *unused):
        local, labels, row_max, log_sum = ctx.saved_tensors
        lab = local_labels(labels, ctx.ignore_index, ctx.offset, local.shape[-1])
        with torch.no_grad():
            out = local if ctx.inplace else torch.empty(local.shape, dtype=local.dtype, device=local.device)
            local_backward(backend_module(ctx.backend), local, lab, row_max, log_sum, grad_logp.contiguous(), out)
        return first_order_only((out,) + (None,) * 7, (local,), "sequence_logps")


def replicated_local(x, name: str):
    """A plain tensor as it is; a DTensor every rank holds whole (all ``Replicate()``) as its
    local tensor; anything else ValueError (labels and token weights are per token, the same
    on every rank of a tensor-parallel group)."""
    if x is None or not is_dtensor(x):
        return x
    from torch.distributed.tensor import Replicate

    if not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(f"{name} is a DTensor with placements {tuple(x.placements)}; pass it replicated or plain")
    return x.to_local()


def check_sharded_logits(logits, labels, ignore_index: int, name: str = "logits"):
    """Validate vocab-sharded ``logits`` (a DTensor ``[N, T, V]``, see :func:`vocab_shard`)
    and ``labels`` ``[N, T]``: ``(VocabShard, labels as contiguous int64)``."""
    shard = vocab_shard(logits, -1, name)
    labels = check_logits_labels(shard.local, replicated_local(labels, "labels"), ignore_index, name, shard.vocab)
    return shard, labels


@torch.compiler.disable  # collectives inside: it runs eagerly, a graph break under torch.compile
def sharded_sequence_logps(
    logits,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
    inplace_backward: bool,
    token_weights: torch.Tensor | None,
    return_log_sum_sq: bool,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> SequenceLogps:
    """:func:`pyfastpo.sequence_logps` of vocab-sharded logits (a DTensor ``[N, T, V]``,
    ``Shard(-1)``): the same :class:`SequenceLogps`, identical on every rank of the
    tensor-parallel group, ``logps`` differentiable (each rank's gradient is its slice).
    Communication: two all-reduces of per-token float32 tensors, ``[N, T]`` then
    ``[4 or 5, N, T]``."""
    shard, labels = check_sharded_logits(logits, labels, ignore_index)
    token_weights = replicated_local(token_weights, "token_weights")
    check_flags(return_entropy=return_entropy, inplace_backward=inplace_backward, return_log_sum_sq=return_log_sum_sq)
    check_token_weights(token_weights, labels)
    segments = packed_segments(labels.shape, labels.device, position_ids, cu_seqlens)
    # Every per-rank check above comes before the first collective: no rank raises alone.
    packing = dict(position_ids=position_ids, cu_seqlens=cu_seqlens)
    check_same_on_ranks(shard.group, "", labels=labels, token_weights=token_weights, **packing)
    local = shard.local
    impl = get_backend(backend, local.device, local.dtype)
    check_label_values(labels, shard.vocab, ignore_index)
    # In place only into logits autograd produced (never a caller's leaf), as on one rank.
    owner = logits._base if logits._base is not None else logits  # a view of a caller's leaf is never written
    inplace = bool(inplace_backward) and owner.grad_fn is not None and not _has_internal_overlap(local)
    args = (int(ignore_index), shard.offset, shard.group, impl.name, inplace, return_log_sum_sq)
    per_tok = ShardedLogps.apply(local, labels, *args)
    per_seq = reduce_per_token(per_tok, labels, ignore_index, shard.vocab, token_weights, segments)
    return make_sequence_logps(per_seq, return_entropy, return_log_sum_sq, token_weights is not None)


def reduce_per_token(per_tok: tuple, labels, ignore_index: int, vocab: int, token_weights, segments) -> tuple:
    """The per-sequence tuple of :func:`pyfastpo.sequence_logps.make_sequence_logps` from merged
    per-token stats ``[N, T]`` (TokenStats' fields, ``log_sum_sq`` last when present): per row
    (``[N]``), or per packed sequence (``[S]``) when ``segments`` is given."""
    stats = TokenStats(*per_tok) if len(per_tok) == len(TokenStats._fields) else TokenStats(*per_tok, None)
    if segments is not None:
        flat = [None if x is None else x.reshape(-1) for x in (stats.logp, stats.entropy, stats.sum_logits)]
        sq = None if stats.log_sum_sq is None else stats.log_sum_sq.reshape(-1)
        weights = None if token_weights is None else token_weights.reshape(-1)
        valid = (labels != ignore_index).reshape(-1)
        return reduce_segments(*flat, sq, valid, segments, vocab, weights)
    num_tokens = (labels != ignore_index).sum(dim=1)
    logps, entropy, mean_logits, sq, unweighted = reduce_tokens(stats, num_tokens, vocab, token_weights)
    return logps, num_tokens, entropy, mean_logits, sq, unweighted
