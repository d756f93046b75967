"""``sequence_logps``: logits ``[N, T, V]`` to one log-probability per sequence.

The one heavy operation of a preference step, as a ``torch.autograd.Function``
over interchangeable backends (see :mod:`pyfastpo.backends`). Backends compute
per-token statistics; this module validates, reduces per sequence in a fixed
order (deterministic: no atomics) and wires the backward.
"""

from __future__ import annotations

import torch

from .backends import backend_module, get_backend
from .packed import packed_segments, reduce_segments
from .sequence_stats import (  # noqa: F401  (IGNORE_INDEX, SequenceLogps, ...: re-exported, their public home)
    IGNORE_INDEX,
    SequenceLogps,
    _has_internal_overlap,
    first_order_only,
    make_sequence_logps,
    reduce_tokens,
    run_backward,
    stat_dtype,
    token_grad_scale,
)
from .validation import check_flags, check_label_values, check_logits_labels, check_token_weights, is_dtensor
from .vocab_parallel import sharded_sequence_logps

# The heavy op as torch custom ops: opaque to torch.compile (dynamo and AOTAutograd see one
# op with a fake implementation, never the backends' pointers, nonzero or Python loops).
# The forward op carries its autograd formula (register_autograd below): the one place the
# backward is wired, in eager and compiled code alike. ``backend`` is the backend's name.


@torch.library.custom_op("pyfastpo::sequence_logps", mutates_args=())
def _sequence_logps_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
    with_log_sum_sq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logps, num_tokens, entropy, mean_logits, log_sum_sq, saved, unweighted_logps)``: the
    per-sequence results (:func:`reduce_tokens`) and the ``[2, N, T]`` row max and log-sum the
    backward reads. Raises ValueError for a label
    outside ``[0, V)`` before any kernel runs (:func:`check_label_values`)."""
    check_label_values(labels, logits.shape[-1], ignore_index)
    impl = backend_module(backend)
    stats = (
        impl.forward(logits, labels, ignore_index, log_sum_sq=True)
        if with_log_sum_sq
        else impl.forward(logits, labels, ignore_index)
    )
    num_tokens = (labels != ignore_index).sum(dim=1)
    logps, entropy, mean_logits, sq, unweighted = reduce_tokens(stats, num_tokens, logits.shape[-1], token_weights)
    return logps, num_tokens, entropy, mean_logits, sq, torch.stack((stats.row_max, stats.log_sum)), unweighted


@_sequence_logps_op.register_fake
def _(logits, labels, token_weights, ignore_index, backend, inplace_backward, with_log_sum_sq):
    n, t, _ = logits.shape
    dtype = stat_dtype(logits.dtype)
    per_seq = [logits.new_empty(n, dtype=dtype) for _ in range(5)]
    num_tokens = labels.new_empty(n, dtype=torch.int64)
    saved = logits.new_empty(2, n, t, dtype=dtype)
    return per_seq[0], num_tokens, per_seq[1], per_seq[2], per_seq[3], saved, per_seq[4]


@torch.library.custom_op("pyfastpo::sequence_logps_backward", mutates_args=())
def _backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    saved: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """The gradient w.r.t. ``logits`` in a fresh (contiguous) tensor; ``grad_scale`` ``[N]`` or ``[N, T]``."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    run_backward(backend_module(backend), logits, labels, saved[0], saved[1], grad_scale, ignore_index, out)
    return out


@_backward_op.register_fake
def _(logits, labels, saved, grad_scale, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("pyfastpo::sequence_logps_backward_", mutates_args=("logits",))
def _backward_inplace_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    saved: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    backend: str,
) -> None:
    """The gradient w.r.t. ``logits`` written into ``logits`` (the op bumps their version counter)."""
    run_backward(backend_module(backend), logits, labels, saved[0], saved[1], grad_scale, ignore_index, logits)


@_backward_inplace_op.register_fake
def _(logits, labels, saved, grad_scale, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, token_weights, ignore_index, backend, inplace_backward, with_log_sum_sq = inputs
    ctx.save_for_backward(logits, labels, output[5], token_weights)
    ctx.ignore_index, ctx.backend, ctx.inplace = ignore_index, backend, inplace_backward
    ctx.mark_non_differentiable(*output[1:6])  # logps and unweighted_logps carry gradients


def _logits_gradient(ctx, logits, labels, saved, grad_scale) -> torch.Tensor:
    """The logits' gradient through the backward ops: written into ``logits`` when the forward
    allowed it (``ctx.inplace``; the op bumps their version, so any other saved use of them
    fails loudly), else a fresh tensor. ``grad_scale`` ``[N]`` or ``[N, T]``."""
    args = (labels, saved, grad_scale, ctx.ignore_index, ctx.backend)
    if ctx.inplace:
        _backward_inplace_op(logits, *args)
        return logits
    return _backward_op(logits, *args)


def _backward(ctx, grad_logps, *grads):
    logits, labels, saved, token_weights = ctx.saved_tensors
    with torch.no_grad():
        grad_scale = token_grad_scale(grad_logps, grads[-1], token_weights, saved.dtype)
        out = _logits_gradient(ctx, logits, labels, saved, grad_scale)
    return first_order_only((out, None, None, None, None, None, None), (logits,), "sequence_logps")


_sequence_logps_op.register_autograd(_backward, setup_context=_setup_context)


# The packed layout (pyfastpo.packed): the same pass, per-token results; the segments are
# summed outside the op (torch.segment_reduce), and the backward takes a per-token scale.


@torch.library.custom_op("pyfastpo::token_logps", mutates_args=())
def _token_logps_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
    with_log_sum_sq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, others, saved)``: per-token log-probs ``[N, T]`` (differentiable), ``[3, N, T]``
    entropy, sum of logits and ``log sum_v p_v^2`` (zeros unless ``with_log_sum_sq``), and the
    ``[2, N, T]`` row max and log-sum the backward reads. Label values are checked first."""
    check_label_values(labels, logits.shape[-1], ignore_index)
    impl = backend_module(backend)
    stats = impl.forward(logits, labels, ignore_index, **({"log_sum_sq": True} if with_log_sum_sq else {}))
    sq = stats.log_sum_sq if with_log_sum_sq else torch.zeros_like(stats.logp)
    saved = torch.stack((stats.row_max, stats.log_sum))
    return stats.logp.clone(), torch.stack((stats.entropy, stats.sum_logits, sq)), saved


@_token_logps_op.register_fake
def _(logits, labels, ignore_index, backend, inplace_backward, with_log_sum_sq):
    n, t, _ = logits.shape
    dtype = stat_dtype(logits.dtype)
    return tuple(logits.new_empty(shape, dtype=dtype) for shape in ((n, t), (3, n, t), (2, n, t)))


def _token_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, backend, inplace_backward, _ = inputs
    ctx.save_for_backward(logits, labels, output[2])
    ctx.ignore_index, ctx.backend, ctx.inplace = ignore_index, backend, inplace_backward
    ctx.mark_non_differentiable(output[1], output[2])


def _token_backward(ctx, grad_logp, *_):
    logits, labels, saved = ctx.saved_tensors
    with torch.no_grad():
        grad_scale = grad_logp.to(saved.dtype).contiguous()  # [N, T]: run_backward's per-token path
        out = _logits_gradient(ctx, logits, labels, saved, grad_scale)
    return first_order_only((out, None, None, None, None, None), (logits,), "sequence_logps")


_token_logps_op.register_autograd(_token_backward, setup_context=_token_setup_context)


def _packed_sequence_logps(logits, labels, segments, token_weights, ignore_index: int, backend: str, inplace, sq):
    """The per-sequence tuple of :func:`make_sequence_logps`, each ``[S]``, of a packed batch
    (``segments``: :func:`pyfastpo.packed.packed_segments`); arguments already validated."""
    logp, others, _ = _token_logps_op(logits, labels, ignore_index, backend, inplace, sq)
    weights = None if token_weights is None else token_weights.reshape(-1)
    valid = (labels != ignore_index).reshape(-1)
    flat = (x.reshape(-1) for x in others)
    return reduce_segments(logp.reshape(-1), *flat, valid, segments, logits.shape[-1], weights)


def can_overwrite(logits: torch.Tensor) -> bool:
    """Whether the backward may write the gradient into ``logits``' storage: the storage
    must belong to a tensor produced by autograd (never a leaf the caller owns, even
    through a view of it) and no two elements may share memory."""
    if torch.compiler.is_compiling():
        # Never under torch.compile: dynamo cannot read grad_fn, and it does not guard on
        # is_leaf, so a graph compiled for a non-leaf input would be reused for a leaf the
        # caller owns and overwrite it. The compiled backward writes a fresh tensor
        # (one logits-sized buffer more than eager; README, "torch.compile").
        return False
    owner = logits._base if logits._base is not None else logits
    return owner.grad_fn is not None and not _has_internal_overlap(logits)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    backend: str = "auto",
    inplace_backward: bool = True,
    token_weights: torch.Tensor | None = None,
    return_log_sum_sq: bool = False,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> SequenceLogps:
    """Sum of per-token log-probabilities of ``labels`` under ``logits``, per sequence.

    Args:
        logits: ``[N, T, V]`` float32, bfloat16, float16 or float64 (reference
            backend only); the last dim must have stride 1, other strides are
            free (``logits[:, :-1]`` is never copied). Math is done in float32.
        labels: ``[N, T]`` integer, already aligned with ``logits`` (the caller
            shifts); ``ignore_index`` marks tokens that do not count.
        return_entropy: also return the summed per-token entropy (nats).
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpp"``.
        inplace_backward: write the gradient into the logits' own storage (no
            second logits-sized tensor). Applies only to logits produced by
            autograd (non-leaf) whose elements do not overlap; a leaf tensor
            the caller owns is never overwritten, not even through a view.
            The logits' version counter is bumped, so any other user of them
            fails loudly instead of reading the gradient. Note: for a slice such
            as ``logits[:, :-1]`` autograd's slice backward still allocates a
            tensor the size of the full logits to hold the gradient.
        token_weights: optional ``[N, T]`` floating weights of each token's log-prob
            in ``logps`` (LD-DPO's length desensitization, for example: see
            :func:`pyfastpo.ld_token_weights`); the gradient follows. Entropy and
            mean logits stay unweighted; ``unweighted_logps`` holds the plain sum.
        return_log_sum_sq: also return the summed per-token ``log sum_v p_v^2``
            (WPO's weight), computed in the same pass by every backend.
        position_ids: packed sequences (padding-free): ``[N, T]`` integer positions
            aligned with ``logits``, 0 where a sequence starts (every row starts one), or
        cu_seqlens: ``[S+1]`` integer cumulative sequence lengths over the flattened
            ``N*T`` tokens (flash-attention's varlen layout). Either gives S sequences,
            each inside one row; label each one's last position ``ignore_index`` (it
            would predict the next one's first token). See :mod:`pyfastpo.packed`.

    Returns:
        :class:`SequenceLogps` ``(logps, num_tokens, entropy, mean_logits)``, each ``[N]``
        (``[S]`` packed: one entry per sequence, in order of appearance).

    Vocab-parallel: ``logits`` may be a DTensor sharded on V (``Shard(-1)``, what
    ``ColwiseParallel(use_local_output=False)`` on the lm_head gives); each rank streams its
    slice and the results, identical on every rank, come from two all-reduces of per-token
    tensors (:mod:`pyfastpo.vocab_parallel`).
    """
    if is_dtensor(logits):
        return sharded_sequence_logps(
            logits,
            labels,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            backend=backend,
            inplace_backward=inplace_backward,
            token_weights=token_weights,
            return_log_sum_sq=return_log_sum_sq,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
    labels = check_logits_labels(logits, labels, ignore_index)
    check_flags(return_entropy=return_entropy, inplace_backward=inplace_backward, return_log_sum_sq=return_log_sum_sq)
    check_token_weights(token_weights, labels)
    impl = get_backend(backend, logits.device, logits.dtype)
    inplace = inplace_backward and can_overwrite(logits)
    segments = packed_segments(labels.shape, labels.device, position_ids, cu_seqlens)
    if segments is not None:
        args = (token_weights, int(ignore_index), impl.name, inplace, return_log_sum_sq)
        per_seq = _packed_sequence_logps(logits, labels, segments, *args)
        return make_sequence_logps(per_seq, return_entropy, return_log_sum_sq, token_weights is not None)
    logps, num_tokens, entropy, mean_logits, sq, _, unweighted = _sequence_logps_op(
        logits, labels, token_weights, int(ignore_index), impl.name, inplace, return_log_sum_sq
    )
    per_seq = (logps, num_tokens, entropy, mean_logits, sq, unweighted)
    return make_sequence_logps(per_seq, return_entropy, return_log_sum_sq, token_weights is not None)
