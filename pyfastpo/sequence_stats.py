"""Per-sequence results of the heavy op and the pieces every path builds them with.

:class:`SequenceLogps` and how per-token statistics become it (:func:`reduce_tokens`,
:func:`make_sequence_logps`), the backward's per-token gradient scale and launch
(:func:`token_grad_scale`, :func:`run_backward`), the first-order-only guard of the custom
backwards: shared by the logits path (:mod:`pyfastpo.sequence_logps`), the linear path and
the vocab-parallel paths, below all of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backends import TokenStats

IGNORE_INDEX = -100
"""The default label of tokens that do not count (prompt, padding), as in torch's
cross_entropy, transformers and TRL."""


class SequenceLogps(NamedTuple):
    """Per-sequence results of :func:`sequence_logps`, each ``[N]``.

    logps: float32 (float64 for float64 logits), sum of valid tokens' log-probs;
        the only differentiable output.
    num_tokens: int64, number of valid (not ignored) tokens.
    entropy: summed per-token entropy in nats (None unless ``return_entropy``).
    mean_logits: mean logit over valid tokens and the vocabulary (0 for a row
        with no valid token); TRL's ``logits/chosen`` metric is its token-weighted mean.
    log_sum_sq: summed per-token ``log sum_v p_v^2`` over valid tokens, from the same
        pass (WPO's weight); None unless ``return_log_sum_sq``. Not differentiable.
    unweighted_logps: with ``token_weights``, the plain sum of the valid tokens'
        log-probs (differentiable too: what an NLL term or WPO's weight reads under
        LD-DPO); else None (``logps`` is that sum).
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    entropy: torch.Tensor | None
    mean_logits: torch.Tensor
    log_sum_sq: torch.Tensor | None = None
    unweighted_logps: torch.Tensor | None = None


def reduce_tokens(stats: TokenStats, num_tokens: torch.Tensor, vocab: int, token_weights=None):
    """Per-sequence ``(logps, entropy, mean_logits, log_sum_sq, unweighted_logps)``, each
    ``[N]``, from per-token stats ``[N, T]`` (zero at ignored tokens): sums over T in a fixed
    order (deterministic). ``token_weights`` ``[N, T]`` (optional) weight each token's
    log-prob in ``logps``; ``unweighted_logps`` is the plain sum (zeros without weights, where
    it would repeat ``logps``); ``log_sum_sq`` is zeros when the stats lack it."""
    denom = (num_tokens * vocab).clamp_min(1).to(stats.sum_logits.dtype)
    plain = stats.logp.sum(dim=1)
    if token_weights is None:
        logps, unweighted = plain, torch.zeros_like(plain)
    else:
        logps, unweighted = (stats.logp * token_weights.to(stats.logp.dtype)).sum(dim=1), plain
    sq = stats.log_sum_sq.sum(dim=1) if stats.log_sum_sq is not None else torch.zeros_like(denom)
    return logps, stats.entropy.sum(dim=1), stats.sum_logits.sum(dim=1) / denom, sq, unweighted


def make_sequence_logps(per_seq: tuple, entropy: bool, log_sum_sq: bool, weighted: bool) -> SequenceLogps:
    """:class:`SequenceLogps` from the per-sequence tensors ``(logps, num_tokens, entropy,
    mean_logits, log_sum_sq, unweighted_logps)`` the paths compute, each optional field None
    unless asked for (``entropy``, ``log_sum_sq``) or meaningful (``weighted``: token weights)."""
    logps, num_tokens, ent, mean_logits, sq, unweighted = per_seq
    return SequenceLogps(
        logps,
        num_tokens,
        ent if entropy else None,
        mean_logits,
        sq if log_sum_sq else None,
        unweighted if weighted else None,
    )


def token_grad_scale(grad_logps, grad_unweighted, token_weights, dtype: torch.dtype) -> torch.Tensor:
    """The contiguous gradient scale the backends take: ``[N]`` per sequence, or ``[N, T]``
    per token with ``token_weights`` (d logps / d logp_t = w_t, d unweighted_logps /
    d logp_t = 1). A gradient autograd did not compute is None or zeros."""
    grad_scale = grad_logps.to(dtype)
    if token_weights is not None:
        grad_scale = grad_scale[:, None] * token_weights.to(dtype)
        if grad_unweighted is not None:
            grad_scale = grad_scale + grad_unweighted.to(dtype)[:, None]
    return grad_scale.contiguous()


def run_backward(impl, logits, labels, row_max, log_sum, grad_scale, ignore_index: int, out) -> None:
    """``impl.backward`` with ``grad_scale`` per sequence ``[N]`` or per token ``[N, T]``.

    The backends scale a whole sequence by one factor; a per-token scale makes every
    token its own length-1 sequence: one launch over ``[N*T, 1, V]`` views when N and T
    merge (contiguous logits), else one launch per sequence over ``[T, 1, V]`` views."""
    if grad_scale.dim() == 1:
        impl.backward(logits, labels, row_max, log_sum, grad_scale, ignore_index, out)
        return
    n, t, v = logits.shape
    try:
        x, o = logits.view(n * t, 1, v), out.view(n * t, 1, v)
    except RuntimeError:  # N and T do not merge in the logits or in out
        for i in range(n):

            def col(a, i=i):
                return a[i].unsqueeze(1)

            scale = grad_scale[i].contiguous()
            impl.backward(col(logits), col(labels), col(row_max), col(log_sum), scale, ignore_index, col(out))
        return

    def rows(a):
        return a.reshape(n * t, 1)

    scale = grad_scale.reshape(-1).contiguous()
    impl.backward(x, rows(labels), rows(row_max), rows(log_sum), scale, ignore_index, o)


def first_order_only(grads: tuple, inputs: tuple, what: str) -> tuple:
    """Return the gradients a custom backward computed so that any second-order use fails loudly.

    Without ``create_graph`` the gradients are returned detached: never a tensor
    still attached to the forward graph (an in-place backward's gradient IS the
    logits' storage), which autograd would silently differentiate through.
    Under ``create_graph=True`` (grad mode on inside backward) each gradient is
    routed through one node that raises when differentiated and whose edges lead
    to the op's real ``inputs`` (logits, or hidden states and weights): so a
    second-order gradient taken by ``backward()``, ``autograd.grad(..., inputs)``,
    ``hessian`` or ``hvp`` reaches it and raises, instead of silently leaving
    the second-order term out.
    """
    grads = tuple(g.detach() if isinstance(g, torch.Tensor) else g for g in grads)
    anchors = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not torch.is_grad_enabled() or not anchors:
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    error = torch._C._functions.DelayedError(
        f"pyfastpo: {what} is differentiable once only; a second-order gradient "
        "(create_graph=True followed by a gradient of the gradient) is not supported".encode(),
        len(present) + len(anchors),
    )
    wrapped = error(*(grads[i] for i in present), *anchors)
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return tuple(out)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-token and per-sequence statistics: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _has_internal_overlap(x: torch.Tensor) -> bool:
    """True when two elements of ``x`` may share memory (e.g. an ``expand``ed tensor)."""
    extent = 1  # one past the largest offset reachable through the inner dims
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False
