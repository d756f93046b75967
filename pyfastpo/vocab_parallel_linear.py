"""The fused linear path with a vocab-sharded lm_head (tensor parallel).

The weight ``[V, H]`` is a DTensor sharded by rows (``Shard(0)``, what ``ColwiseParallel``
makes of an ``nn.Linear`` lm_head); the hidden states ``[N, T, H]`` are the same on every
rank of the tensor-parallel group. Each rank projects the valid tokens onto its own rows,
a chunk at a time, and keeps per-token stats of its slice; one merge at the end
(:func:`pyfastpo.vocab_parallel.merge`: two all-reduces of per-valid-token tensors) gives
every rank the full vocabulary's stats. The backward recomputes each chunk's slice of the
logits, turns it into its gradient with the merged row max and log-sum, and accumulates
the slice's weight (and bias) gradient locally; the hidden states' gradient is the sum of
every slice's ``G_r W_r``: one all-reduce of ``[valid tokens, H]``, as any column-parallel
layer's input gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backends import TokenStats, backend_module, get_backend
from .linear_chunks import add_chunk_gradients, cast, project
from .linear_inputs import check_linear_inputs, chunk_tokens_for, projection_dtype
from .packed import packed_segments
from .sequence_stats import SequenceLogps, first_order_only, make_sequence_logps, stat_dtype
from .validation import check_flags, check_label_values, check_not_capturing, check_token_weights
from .vocab_parallel import (
    check_same_on_ranks,
    local_backward,
    local_forward,
    local_head,
    local_labels,
    merge,
    reduce_per_token,
)

FSDP_HINT = (
    "If the weight is an FSDP-sharded parameter (fully_shard also makes Shard(0) DTensors), run the loss "
    "inside the lm_head's forward: pyfastpo.distributed.lm_head_preference_loss(lm_head, hidden, labels, ...)"
)


class ShardedLinearLogps(torch.autograd.Function):
    """Per-token merged stats ``[N, T]`` (TokenStats' fields; log_sum_sq on request) of
    ``hidden @ weight_r.T (+ bias_r)`` over every rank's rows; the log-prob differentiable
    w.r.t. ``hidden``, the local ``weight_r`` and ``bias_r``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, offset, group, backend, chunk, proj, with_sq):
        check_not_capturing(hidden, "the fused linear path")
        impl = backend_module(backend)
        n_idx, t_idx = (labels != ignore_index).nonzero(as_tuple=True)
        cdtype = stat_dtype(hidden.dtype)
        fields = len(TokenStats._fields) - (not with_sq)
        stats = torch.zeros(fields, n_idx.numel(), dtype=cdtype, device=hidden.device)
        target = torch.zeros(n_idx.numel(), dtype=cdtype, device=hidden.device)
        width = weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):  # projected in `proj`, explicitly
            w, b = cast(weight, proj), cast(bias, proj)
            for start in range(0, n_idx.numel(), chunk):
                rows = slice(start, start + chunk)
                logits = project(hidden[n_idx[rows], t_idx[rows]].to(proj), w, b)
                lab = local_labels(labels[n_idx[rows], t_idx[rows]][:, None], ignore_index, offset, width)
                out, tgt = local_forward(impl, logits, lab, with_sq)
                for i, s in enumerate(out[:fields]):
                    stats[i, rows] = s.squeeze(1)
                target[rows] = tgt.squeeze(1)
                del logits, out
        valid = torch.ones(n_idx.numel(), dtype=torch.bool, device=hidden.device)
        merged = merge(TokenStats(*stats) if with_sq else TokenStats(*stats, None), target, valid, group)
        per_tok = torch.zeros(fields, *labels.shape, dtype=cdtype, device=hidden.device)
        per_tok[:, n_idx, t_idx] = torch.stack([s for s in merged if s is not None])
        ctx.save_for_backward(hidden, weight, bias, labels, per_tok[1], per_tok[2])
        ctx.args = (ignore_index, offset, group, backend, chunk, proj)
        outputs = tuple(per_tok.unbind(0))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_logp, *unused):
        hidden, weight, bias, labels, row_max, log_sum = ctx.saved_tensors
        ignore_index, offset, group, backend, chunk, proj = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        impl = backend_module(backend)
        n_idx, t_idx = (labels != ignore_index).nonzero(as_tuple=True)
        acc = row_max.dtype  # float32 accumulation (float64 for float64 inputs)
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        g_tok = grad_logp.to(acc)[n_idx, t_idx]
        m_tok, ls_tok = row_max[n_idx, t_idx], log_sum[n_idx, t_idx]
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            w, b = cast(weight, proj), cast(bias, proj)
            for start in range(0, n_idx.numel(), chunk):
                rows = slice(start, start + chunk)
                h = hidden[n_idx[rows], t_idx[rows]].to(proj)
                logits = project(h, w, b)
                lab = local_labels(labels[n_idx[rows], t_idx[rows]][:, None], ignore_index, offset, weight.shape[0])
                stat = (m_tok[rows][:, None], ls_tok[rows][:, None])
                local_backward(impl, logits, lab, *stat, g_tok[rows].contiguous(), logits)
                where = (n_idx[rows], t_idx[rows])
                add_chunk_gradients(logits.squeeze(1), h, w, where, grad_hidden, grad_weight, grad_bias)
                del logits
            if need_h:  # every slice's G_r W_r: the full gradient on every rank
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
        grads = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return first_order_only(grads + (None,) * 8, (hidden, weight, bias), "linear_sequence_logps")


@torch.compiler.disable  # collectives inside: it runs eagerly, a graph break under torch.compile
def sharded_linear_sequence_logps(
    hidden: torch.Tensor,
    weight,
    labels: torch.Tensor,
    *,
    bias,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
    chunk_tokens: int | None,
    memory_budget_bytes: int | None,
    token_weights: torch.Tensor | None,
    return_log_sum_sq: bool,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> SequenceLogps:
    """:func:`pyfastpo.linear_sequence_logps` with a vocab-sharded lm_head (module docstring):
    the same :class:`SequenceLogps` on every rank, ``logps`` differentiable w.r.t. ``hidden``
    (plain, the same on every rank) and each rank's rows of ``weight``/``bias``. Communication:
    two all-reduces of per-valid-token float32 stats forward, one of ``[N, T, H]`` backward."""
    labels = check_linear_inputs(hidden, weight, bias, labels, ignore_index)
    check_token_weights(token_weights, labels)
    check_flags(return_entropy=return_entropy, return_log_sum_sq=return_log_sum_sq)
    segments = packed_segments(labels.shape, labels.device, position_ids, cu_seqlens)
    w, b, offset, vocab, group = local_head(weight, bias)
    packing = dict(position_ids=position_ids, cu_seqlens=cu_seqlens)
    check_same_on_ranks(group, FSDP_HINT, hidden=hidden, labels=labels, token_weights=token_weights, **packing)
    check_label_values(labels, vocab, ignore_index)
    proj = projection_dtype(hidden.device.type, hidden.dtype)
    impl = get_backend(backend, hidden.device, proj)
    chunk = chunk_tokens_for(chunk_tokens, memory_budget_bytes, max(w.shape[0], 1), proj, hidden.device)
    args = (int(ignore_index), offset, group, impl.name, chunk, proj, return_log_sum_sq)
    per_tok = ShardedLinearLogps.apply(hidden, w, b, labels, *args)
    per_seq = reduce_per_token(per_tok, labels, ignore_index, vocab, token_weights, segments)
    return make_sequence_logps(per_seq, return_entropy, return_log_sum_sq, token_weights is not None)
