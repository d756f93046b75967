"""The fused linear path's single-pass mode: the gradients computed in the forward.

The two-pass path (:func:`pyfastpo.linear_sequence_logps`) projects every valid token
twice: the forward projects it for the statistics, the backward projects it again
to turn the logits into their gradient, then runs ``grad_hidden = G @ W`` and
``grad_weight += G^T h``. That is four matmuls per token, and the peak memory never
depends on T.

When the loss is separable per pair and each pair's valid tokens fit one chunk,
:func:`pyfastpo.linear_preference_loss` takes one pass instead. It groups whole
pairs up to the chunk size and projects each group once. From that projection it
computes the statistics and the group's loss gradient w.r.t. its log-probs. The
reference's statistics are computed first, without gradient. It then writes the
logits' gradient in place and computes ``grad_hidden`` and the float32
``grad_weight`` accumulation. That is three matmuls per token. A pair is separable
when its loss reads only its own statistics: every type except ``aot`` and
``aot_unpaired``, which sort across the batch, and trl's ``sft``, a token mean over
the whole batch.

The loss's backward only scales the stored gradients by the incoming gradient, in
float32. Those gradients are held from the forward to the backward: ``grad_hidden`` (the
size of ``hidden``) and ``grad_weight`` (in the weight's dtype). The two-pass path
allocates them only in its backward. The autograd graph holds them directly, not
through saved-tensor hooks, so activation offloading does not move them. Under
activation checkpointing the pass runs again in the recompute. In this mode only
``loss`` is differentiable. The per-pair ``losses`` and the policy's ``logps`` are
returned detached (the gradients already computed are those of ``loss``).

:func:`pyfastpo.linear_preference_loss` leaves three more cases to two passes. Under
torch.compile the pass would run the loss inside its own loop. In float16, a
GradScaler's scale must reach the gradients before float16 rounds them. And when a loss
input other than hidden, weight and bias needs a gradient (a reference log-prob, a
per-pair tensor), the single pass would not compute it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backends import TokenStats
from .linear_chunks import add_chunk_gradients, cast, project
from .losses.options import loss_types
from .sequence_logps import SequenceLogps, first_order_only, make_sequence_logps, reduce_tokens, token_grad_scale
from .validation import check_label_values

NON_SEPARABLE = frozenset({"aot", "aot_unpaired", "sft"})
"""Loss types whose per-pair loss reads other pairs: they take two passes."""


def plan_groups(
    labels: torch.Tensor, ignore_index: int, chunk: int, loss_type, needs_grad: bool
) -> tuple[list[torch.Tensor] | None, str]:
    """``(groups, why)``. ``groups`` is a list of int64 pair-index tensors (consecutive
    whole pairs, at most ``chunk`` valid tokens each), or None for the two-pass path;
    ``why`` says which mode runs and why. ``labels`` ``[N, T]``, pairs ``i`` and ``i + N/2``."""
    if not needs_grad:
        return None, "two-pass: no gradient is needed (the forward alone, one projection per token)"
    coupled = sorted(NON_SEPARABLE & set(loss_types(loss_type)))
    if coupled:
        return None, f"two-pass: loss type {coupled} reads the whole batch, not one pair at a time"
    counts = (labels != ignore_index).sum(dim=1)
    half = counts.shape[0] // 2
    per_pair = (counts[:half] + counts[half:]).tolist()  # one host sync (the path counts tokens anyway)
    biggest = max(per_pair)
    if biggest > chunk:
        return None, f"two-pass: a pair has {biggest} valid tokens, more than a chunk's {chunk}"
    groups, start, tokens = [], 0, 0
    for i, n in enumerate(per_pair):
        if tokens + n > chunk:
            groups.append(torch.arange(start, i))
            start, tokens = i, 0
        tokens += n
    groups.append(torch.arange(start, half))
    return groups, f"single-pass: {len(groups)} group(s) of whole pairs, at most {chunk} valid tokens each"


def single_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    groups: list[torch.Tensor],
    group_losses: Callable[[SequenceLogps, torch.Tensor], torch.Tensor],
    *,
    impl,
    proj: torch.dtype,
    ignore_index: int,
    with_log_sum_sq: bool,
) -> tuple[SequenceLogps, tuple]:
    """The policy's statistics and the gradients of the mean pair loss, in one projection
    per valid token.

    Args:
        hidden ``[N, T, H]``, weight ``[V, H]``, bias ``[V]`` or None, labels ``[N, T]``,
            token_weights ``[N, T]`` or None: as :func:`pyfastpo.linear_sequence_logps`.
        groups: :func:`plan_groups`' pair indices.
        group_losses: ``(stats, pairs) -> [len(pairs)]`` per-pair losses of those pairs
            from their :class:`SequenceLogps` (sequences ``pairs`` then ``pairs + N/2``),
            differentiable w.r.t. its ``logps`` and ``unweighted_logps``.
        impl: the backend module; proj: the projection dtype.

    Returns:
        ``(policy, (grad_hidden, grad_weight, grad_bias))``: the full batch's
        :class:`SequenceLogps` (detached, as the two-pass forward computes it) and the
        gradients of ``mean(losses)`` (None for an input that does not require grad).
    """
    check_label_values(labels, weight.shape[0], ignore_index)  # before any kernel reads them
    n, t, _ = hidden.shape
    half = n // 2
    device = hidden.device
    cdtype = torch.promote_types(hidden.dtype, torch.float32)  # float64 stays float64
    fields = len(TokenStats._fields) - (not with_log_sum_sq)  # log_sum_sq, the last, on request
    per_tok = torch.zeros(fields, n, t, dtype=cdtype, device=device)
    valid = labels != ignore_index
    need_h, need_w = hidden.requires_grad, weight.requires_grad
    need_b = bias is not None and bias.requires_grad
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, dtype=cdtype, device=device) if need_w else None
    grad_bias = torch.zeros(weight.shape[0], dtype=cdtype, device=device) if need_b else None
    sq = dict(log_sum_sq=True) if with_log_sum_sq else {}
    slot = torch.full((n,), -1, dtype=torch.long, device=device)  # sequence -> row within its group
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        w, b = cast(weight.detach(), proj), cast(None if bias is None else bias.detach(), proj)
        for pairs in groups:
            pairs = pairs.to(device)
            seqs = torch.cat((pairs, pairs + half))
            slot[seqs] = torch.arange(seqs.numel(), device=device)
            n_idx, t_idx = (valid & (slot >= 0)[:, None]).nonzero(as_tuple=True)
            h = hidden.detach()[n_idx, t_idx].to(proj)
            logits = project(h, w, b)  # [C, 1, V]
            y = labels[n_idx, t_idx][:, None]
            stats = impl.forward(logits, y, ignore_index, **sq)
            for i in range(fields):
                per_tok[i, n_idx, t_idx] = stats[i].squeeze(1).to(cdtype)
            weights = None if token_weights is None else token_weights[seqs]
            g_tok = _sequence_gradients(
                per_tok[:, seqs], valid[seqs], weights, weight.shape[0], group_losses, pairs, half
            )
            g_tok = g_tok[slot[n_idx]] if g_tok.dim() == 1 else g_tok[slot[n_idx], t_idx]
            impl.backward(logits, y, stats[1], stats[2], g_tok.contiguous(), ignore_index, logits)
            grad_logits = logits.squeeze(1)  # [C, V]: dLoss/dlogits, in the logits' dtype
            add_chunk_gradients(grad_logits, h, w, (n_idx, t_idx), grad_hidden, grad_weight, grad_bias)
            slot[seqs] = -1
            del logits, grad_logits, stats
    num_tokens = valid.sum(dim=1)
    logps, entropy, mean_logits, log_sum_sq, unweighted = reduce_tokens(
        _token_stats(per_tok), num_tokens, weight.shape[0], token_weights
    )
    per_seq = (logps, num_tokens, entropy, mean_logits, log_sum_sq, unweighted)
    policy = make_sequence_logps(per_seq, True, with_log_sum_sq, token_weights is not None)
    grads = (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
    return policy, grads


def _token_stats(per_tok: torch.Tensor) -> TokenStats:
    """Per-token stats ``[fields, N, T]`` as :class:`TokenStats` (``log_sum_sq`` None when
    the buffer has no row for it)."""
    return TokenStats(*per_tok) if per_tok.shape[0] == len(TokenStats._fields) else TokenStats(*per_tok, None)


def _sequence_gradients(per_tok, valid, weights, vocab: int, group_losses, pairs, num_pairs: int) -> torch.Tensor:
    """dLoss/dlogp per sequence ``[S]`` (per token ``[S, T]`` with token ``weights``) of
    one group's sequences, from their per-token stats ``[fields, S, T]``: the sum of the
    group's per-pair losses, over the batch's pair count ``N/2`` (the loss is their mean),
    differentiated w.r.t. the group's log-probs."""
    num_tokens = valid.sum(dim=1)
    token_stats = _token_stats(per_tok)
    logps, entropy, mean_logits, log_sum_sq, unweighted = reduce_tokens(token_stats, num_tokens, vocab, weights)
    with torch.enable_grad():
        logps = logps.detach().requires_grad_()
        unweighted = unweighted.detach().requires_grad_()
        per_seq = (logps, num_tokens, entropy, mean_logits, log_sum_sq, unweighted)
        stats = make_sequence_logps(per_seq, True, token_stats.log_sum_sq is not None, weights is not None)
        total = group_losses(stats, pairs).sum() / num_pairs
        inputs = [logps] if stats.unweighted_logps is None else [logps, unweighted]
        got = torch.autograd.grad(total, inputs, allow_unused=True)
    grad_w = got[0] if got[0] is not None else torch.zeros_like(logps)
    grad_u = got[1] if len(got) > 1 else None
    return token_grad_scale(grad_w, grad_u, weights, per_tok.dtype)


class _PrecomputedGradients(torch.autograd.Function):
    """``loss`` (a value) whose gradients w.r.t. ``hidden``, ``weight`` and ``bias`` were
    computed in the forward: the backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        ctx.grads = grads
        ctx.save_for_backward(hidden, weight, bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "pyfastpo: the single-pass linear loss's gradients were used by a first backward; "
                "to backpropagate through it twice, pass single_pass=False"
            )
        grads, ctx.grads = ctx.grads, None  # freed: the weight gradient may be gigabytes
        needs = ctx.needs_input_grad[1:4]
        out = tuple(None if g is None or not need else _scale_(g, grad_loss) for g, need in zip(grads, needs))
        return first_order_only((None, *out, None), ctx.saved_tensors, "the single-pass linear loss")


def _scale_(g: torch.Tensor, scale: torch.Tensor, block_elements: int = 1 << 24) -> torch.Tensor:
    """``g *= scale`` in place, computed in float32: a 16-bit ``g`` rounds once more, and the
    scale itself is never rounded to 16 bits. Slices along dim 0 of at most about
    ``block_elements`` keep the float32 temporary small (64 MiB)."""
    if g.dtype in (torch.float32, torch.float64):
        return g.mul_(scale.to(g.dtype))
    s = scale.float()
    rows = max(1, block_elements // max(1, g[0].numel()))
    for start in range(0, g.shape[0], rows):
        block = g[start : start + rows]
        block.copy_(block.float() * s)
    return g


def attach_gradients(loss: torch.Tensor, hidden, weight, bias, grads: tuple) -> torch.Tensor:
    """``loss`` as a differentiable output of ``hidden``, ``weight`` and ``bias`` whose
    gradients are ``grads`` (times the incoming gradient)."""
    return _PrecomputedGradients.apply(loss, hidden, weight, bias, grads)
