"""The fused linear path: preference loss from hidden states and the lm_head weight.

Full logits ``[N, T, V]`` are never materialized. Only positions whose label is
valid are projected (prompts and padding never reach the matmul), a chunk of
tokens at a time; each chunk's logits go through the ``sequence_logps`` backend
kernels (per-token stats forward; gradient in place backward) and are freed.
Backward recomputes each chunk's logits, turns them into their gradient ``G`` in
place, then ``grad_hidden[chunk] = G @ W`` and ``grad_weight += G^T @ h`` in a
float32 accumulator. Peak extra memory is one chunk's logits (plus the float32
weight-gradient accumulator when the weight trains), independent of ``N * T``.

Mixed precision: under ``torch.autocast`` the projection runs in autocast's dtype,
explicitly, in the forward and in the backward's recompute alike (autograd runs a
backward outside autocast; a float32 recompute against a bf16 forward's statistics
would cost ten times torch's gradient error).
"""

from __future__ import annotations

import inspect

import torch

from .backends import TokenStats, backend_module, get_backend
from .linear_chunks import add_chunk_gradients, cast, project
from .linear_inputs import DEFAULT_MEMORY_BUDGET, check_linear_inputs, chunk_tokens_for, projection_dtype  # noqa: F401
from .linear_single_pass import attach_gradients, plan_groups, single_pass
from .losses.preference_loss import PER_PAIR_ARGS
from .packed import packed_segments, reduce_segments
from .pairs import (
    FusedPreferenceLossOutput,
    check_pair_loss_arguments,
    ld_token_weights,
    pair_loss_from_stats,
    wpo_pair_weights,
)
from .sequence_logps import (
    IGNORE_INDEX,
    SequenceLogps,
    first_order_only,
    make_sequence_logps,
    reduce_tokens,
    token_grad_scale,
)
from .validation import (
    check_flags,
    check_label_values,
    check_not_capturing,
    check_pairs,
    check_plain_tensor,
    check_reference_input,
    check_token_weights,
    is_dtensor,
)
from .vocab_parallel_linear import sharded_linear_sequence_logps


def _synchronizing_op_tags() -> dict:
    """custom_op's ``tags`` for an op that synchronizes (it counts the valid tokens):
    ``cudagraph_unsafe``, so that ``torch.compile(mode="reduce-overhead")`` leaves it out of
    its CUDA graphs instead of failing the capture; nothing on torch versions without it."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    takes_tags = "tags" in inspect.signature(torch.library.custom_op).parameters
    return {"tags": (tag,)} if tag is not None and takes_tags else {}


@torch.library.custom_op("pyfastpo::linear_sequence_logps", mutates_args=(), **_synchronizing_op_tags())
def _linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    ignore_index: int,
    backend: str,
    chunk: int,
    proj: torch.dtype,
    with_log_sum_sq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logps, num_tokens, entropy, mean_logits, log_sum_sq, saved, unweighted_logps)`` (as
    :func:`pyfastpo.sequence_logps.reduce_tokens`), ``saved`` the ``[2, N, T]`` row max and
    log-sum the backward reads: a custom op, opaque to torch.compile (its
    ``nonzero`` and chunk loop are data-dependent). Label values are checked first."""
    n, t, _ = hidden.shape
    vocab = weight.shape[0]
    check_not_capturing(hidden, "the fused linear path")
    check_label_values(labels, vocab, ignore_index)
    impl = backend_module(backend)
    n_idx, t_idx = (labels != ignore_index).nonzero(as_tuple=True)
    cdtype = torch.promote_types(hidden.dtype, torch.float32)  # float64 stays float64
    # Per-token stats of valid tokens, in gather order (TokenStats' fields; log_sum_sq on request).
    fields = len(TokenStats._fields) - (not with_log_sum_sq)
    sq = dict(log_sum_sq=True) if with_log_sum_sq else {}
    stats = torch.zeros(fields, n_idx.numel(), dtype=cdtype, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):  # projected in `proj`, explicitly
        w, b = cast(weight, proj), cast(bias, proj)
        for start in range(0, n_idx.numel(), chunk):
            rows = slice(start, start + chunk)
            logits = project(hidden[n_idx[rows], t_idx[rows]].to(proj), w, b)
            out = impl.forward(logits, labels[n_idx[rows], t_idx[rows]][:, None], ignore_index, **sq)
            for i, s in enumerate(out[:fields]):
                stats[i, rows] = s.squeeze(1)
            del logits, out
        del w, b
    per_seq = torch.zeros(fields, n, t, dtype=cdtype, device=hidden.device)
    per_seq[:, n_idx, t_idx] = stats  # unique positions: deterministic, no atomics
    num_tokens = (labels != ignore_index).sum(dim=1)
    logps, entropy, mean_logits, log_sum_sq, unweighted = reduce_tokens(
        TokenStats(*per_seq), num_tokens, vocab, token_weights
    )
    return logps, num_tokens, entropy, mean_logits, log_sum_sq, per_seq[1:3].clone(), unweighted


@_linear_op.register_fake
def _(hidden, weight, bias, labels, token_weights, ignore_index, backend, chunk, proj, with_log_sum_sq):
    n, t, _ = hidden.shape
    cdtype = torch.promote_types(hidden.dtype, torch.float32)
    per_seq = [hidden.new_empty(n, dtype=cdtype) for _ in range(5)]
    num_tokens = labels.new_empty(n, dtype=torch.int64)
    saved = hidden.new_empty(2, n, t, dtype=cdtype)
    return per_seq[0], num_tokens, per_seq[1], per_seq[2], per_seq[3], saved, per_seq[4]


@torch.library.custom_op("pyfastpo::linear_sequence_logps_backward", mutates_args=(), **_synchronizing_op_tags())
def _linear_backward_op(
    grad_scale: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    saved: torch.Tensor,
    ignore_index: int,
    backend: str,
    chunk: int,
    proj: torch.dtype,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)``; an empty tensor for each one not needed.
    ``grad_scale``: dLoss/dlogp per sequence ``[N]`` or per token ``[N, T]``
    (:func:`pyfastpo.sequence_logps.token_grad_scale`)."""
    check_not_capturing(hidden, "the fused linear path")
    impl = backend_module(backend)
    n_idx, t_idx = (labels != ignore_index).nonzero(as_tuple=True)
    row_max, log_sum = saved[0][n_idx, t_idx], saved[1][n_idx, t_idx]
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    acc = log_sum.dtype  # float32 accumulation (float64 for float64 inputs)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    # Each token is its own length-1 sequence: a scale per token.
    g_tok = grad_scale.to(acc)[n_idx] if grad_scale.dim() == 1 else grad_scale.to(acc)[n_idx, t_idx]
    # The forward's projection, recomputed in the same dtype (autocast's when it was on), with
    # autocast off: the matmuls run in exactly that dtype whatever context the backward runs in.
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = cast(weight, proj), cast(bias, proj)
        for start in range(0, n_idx.numel(), chunk):
            rows = slice(start, start + chunk)
            h = hidden[n_idx[rows], t_idx[rows]].to(proj)
            logits = project(h, w, b)
            y = labels[n_idx[rows], t_idx[rows]][:, None]
            stat = (row_max[rows][:, None], log_sum[rows][:, None])
            impl.backward(logits, y, *stat, g_tok[rows].contiguous(), ignore_index, logits)
            grad_logits = logits.squeeze(1)  # [C, V], now dLoss/dlogits, in the logits' dtype
            where = (n_idx[rows], t_idx[rows])
            add_chunk_gradients(grad_logits, h, w, where, grad_hidden, grad_weight, grad_bias)
            del logits, grad_logits
    grad_hidden = grad_hidden if need_h else hidden.new_empty(0)
    grad_weight = grad_weight.to(weight.dtype) if need_w else weight.new_empty(0)
    grad_bias = grad_bias.to(bias.dtype) if need_b else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


@_linear_backward_op.register_fake
def _(grad_scale, hidden, weight, bias, *rest):
    need_h, need_w, need_b = rest[-3:]
    return (
        torch.empty_like(hidden) if need_h else hidden.new_empty(0),
        torch.empty_like(weight) if need_w else weight.new_empty(0),
        torch.empty_like(bias) if need_b else weight.new_empty(0),
    )


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, token_weights, ignore_index, backend, chunk, proj, _ = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, token_weights, output[5])
    ctx.ignore_index, ctx.backend, ctx.chunk, ctx.proj = ignore_index, backend, chunk, proj
    ctx.mark_non_differentiable(*output[1:6])  # logps and unweighted_logps carry gradients


def _linear_autograd(ctx, grad_logps, *grads):
    """The linear path's backward, wired once, for eager and compiled code alike."""
    hidden, weight, bias, labels, token_weights, saved = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    with torch.no_grad():
        grads = _linear_backward_op(
            token_grad_scale(grad_logps, grads[-1], token_weights, saved.dtype),
            hidden,
            weight,
            bias,
            labels,
            saved,
            ctx.ignore_index,
            ctx.backend,
            ctx.chunk,
            ctx.proj,
            *need,
        )
    grads = tuple(g if n else None for g, n in zip(grads, need))
    rest = (None,) * 7  # labels, token_weights, ignore_index, backend, chunk, proj, with_log_sum_sq
    return first_order_only((*grads, *rest), (hidden, weight, bias), "linear_sequence_logps")


_linear_op.register_autograd(_linear_autograd, setup_context=_linear_setup_context)


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    memory_budget_bytes: int | None = None,
    token_weights: torch.Tensor | None = None,
    return_log_sum_sq: bool = False,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> SequenceLogps:
    """:func:`pyfastpo.sequence_logps` of ``hidden @ weight.T (+ bias)`` without the full logits.

    Args:
        hidden: ``[N, T, H]`` last hidden states, aligned with ``labels`` (the
            caller shifts); any strides. float32, bfloat16, float16 or float64.
        weight: ``[V, H]`` lm_head weight, same dtype (a frozen weight costs no
            weight gradient). bias: optional ``[V]``.
        labels: ``[N, T]`` integer; ``ignore_index`` tokens are never projected.
        chunk_tokens: valid tokens projected at once; default from
            ``memory_budget_bytes`` (chunk logits and temporaries; default 1 GiB on
            CUDA, 256 MiB elsewhere: :data:`DEFAULT_MEMORY_BUDGET`).
        backend: as :func:`pyfastpo.sequence_logps`, for the per-chunk kernels.
        token_weights, return_log_sum_sq: as in :func:`pyfastpo.sequence_logps`.
        position_ids, cu_seqlens: packed sequences, as in :func:`pyfastpo.sequence_logps`
            (``hidden`` is viewed as ``[N*T, 1, H]``: copied once if N and T do not merge).

    Vocab-parallel: ``weight`` (and ``bias``) may be DTensors sharded by rows (``Shard(0)``,
    a ``ColwiseParallel`` lm_head) with ``hidden`` the same plain tensor on every rank: each
    rank projects onto its rows only (:mod:`pyfastpo.vocab_parallel_linear`).

    Returns:
        :class:`SequenceLogps`, each ``[N]`` (``[S]`` packed); ``logps`` differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    if is_dtensor(weight):  # vocab-parallel: weight (and bias) DTensors sharded by rows
        return sharded_linear_sequence_logps(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            backend=backend,
            chunk_tokens=chunk_tokens,
            memory_budget_bytes=memory_budget_bytes,
            token_weights=token_weights,
            return_log_sum_sq=return_log_sum_sq,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
    labels = check_linear_inputs(hidden, weight, bias, labels, ignore_index)
    check_token_weights(token_weights, labels)
    check_flags(return_entropy=return_entropy, return_log_sum_sq=return_log_sum_sq)
    proj = projection_dtype(hidden.device.type, hidden.dtype)
    impl = get_backend(backend, hidden.device, proj)
    chunk = chunk_tokens_for(chunk_tokens, memory_budget_bytes, weight.shape[0], proj, hidden.device)
    segments = packed_segments(labels.shape, labels.device, position_ids, cu_seqlens)
    if segments is not None:
        args = (token_weights, int(ignore_index), impl.name, chunk, proj, return_log_sum_sq)
        per_seq = _packed_linear(hidden, weight, bias, labels, segments, *args)
        return make_sequence_logps(per_seq, return_entropy, return_log_sum_sq, token_weights is not None)
    logps, num_tokens, entropy, mean_logits, sq, _, unweighted = _linear_op(
        hidden, weight, bias, labels, token_weights, int(ignore_index), impl.name, chunk, proj, return_log_sum_sq
    )
    per_seq = (logps, num_tokens, entropy, mean_logits, sq, unweighted)
    return make_sequence_logps(per_seq, return_entropy, return_log_sum_sq, token_weights is not None)


def _packed_linear(hidden, weight, bias, labels, segments, token_weights, ignore_index, backend, chunk, proj, sq):
    """The per-sequence tuple of :func:`make_sequence_logps`, each ``[S]``, of a packed batch:
    :func:`_linear_op` with every token its own length-1 row (per-token statistics, and a
    per-token gradient scale in the backward), then summed per segment."""
    n, t, h = hidden.shape
    rows = (hidden.reshape(n * t, 1, h), weight, bias, labels.reshape(n * t, 1), None, ignore_index, backend)
    logp, num_tokens, entropy, mean_logits, log_sum_sq, _, _ = _linear_op(*rows, chunk, proj, sq)
    vocab = weight.shape[0]
    weights = None if token_weights is None else token_weights.reshape(-1)
    # A token's mean logit is its sum of logits over V (0 when ignored).
    return reduce_segments(logp, entropy, mean_logits * vocab, log_sum_sq, num_tokens > 0, segments, vocab, weights)


def linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    loss_type="sigmoid",
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    memory_budget_bytes: int | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    single_pass: bool | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **loss_kwargs,
) -> FusedPreferenceLossOutput:
    """Preference loss from last hidden states and the lm_head, logits never materialized.

    Args:
        hidden: ``[N, T, H]`` policy hidden states (rows ``[:N/2]`` chosen,
            ``[N/2:]`` rejected), aligned with ``labels``.
        weight, bias: the policy's lm_head ``[V, H]`` and optional ``[V]``.
        labels: ``[N, T]``; prompt and padding tokens set to ``ignore_index``.
        ref_hidden: ``[N, T, H]`` reference hidden states (run without
            gradient; ``ref_weight``/``ref_bias`` default to the policy's), or
        ref_chosen_logps, ref_rejected_logps: ``[N/2]`` precomputed. Neither:
            reference-free.
        loss_type, **loss_kwargs: as :func:`pyfastpo.preference_loss`.
        chunk_tokens, memory_budget_bytes, backend: see :func:`linear_sequence_logps`.
        ld_alpha: LD-DPO (as trl's ``ld_alpha``): each completion's tokens past the
            shorter completion of its pair weigh ``ld_alpha`` in the policy's and the
            streamed reference's log-probs (:func:`pyfastpo.ld_token_weights`); None: off.
        use_weighting: WPO, as in :func:`pyfastpo.fused_preference_loss`.
        single_pass: None (default): the gradients are computed in the forward, one
            projection per valid token, whenever the loss is separable per pair and every
            pair's valid tokens fit one chunk (:mod:`pyfastpo.linear_single_pass`); else
            two passes. Only ``loss`` is differentiable then (``losses`` and the policy's
            ``logps`` come detached). True: require it (ValueError saying why not); False:
            always two passes. The output's ``mode`` says which ran and why.
            A vocab-sharded ``weight`` (as in :func:`linear_sequence_logps`) takes two passes.
        position_ids, cu_seqlens: packed sequences (padding-free), as in
            :func:`pyfastpo.fused_preference_loss` (``ref_hidden`` packed the same way);
            two passes (the single pass groups whole pairs of rows).

    Returns:
        :class:`pyfastpo.pairs.FusedPreferenceLossOutput` (policy entropies included).
    """
    # Every argument is checked before the first projection.
    labels = check_linear_inputs(hidden, weight, bias, labels, ignore_index)
    packing = dict(position_ids=position_ids, cu_seqlens=cu_seqlens)
    segments = packed_segments(labels.shape, labels.device, **packing)
    num_seqs = hidden.shape[0] if segments is None else segments.count
    check_pairs(num_seqs, "hidden" if segments is None else "the packed hidden states")
    proj = projection_dtype(hidden.device.type, hidden.dtype)
    impl = get_backend(backend, hidden.device, proj)
    chunk = chunk_tokens_for(chunk_tokens, memory_budget_bytes, weight.shape[0], proj, hidden.device)
    if single_pass not in (None, True, False):
        raise ValueError(f"single_pass must be None (automatic), True or False, got {single_pass!r}")
    if ref_hidden is not None:
        check_reference_input("ref_hidden", ref_hidden, "hidden", hidden, ref_chosen_logps, ref_rejected_logps)
        ref_w = weight if ref_weight is None else ref_weight
        ref_b = bias if ref_weight is None and ref_bias is None else ref_bias
        if not is_dtensor(ref_w):
            check_plain_tensor("ref_weight", ref_w)
        if ref_w.dim() == 2 and ref_w.shape[0] != weight.shape[0]:
            raise ValueError(
                f"ref_weight has {ref_w.shape[0]} rows (V) but weight has {weight.shape[0]}: same vocabulary needed"
            )
        check_linear_inputs(ref_hidden, ref_w, ref_b, labels, ignore_index, "ref_hidden", "ref_weight", "ref_bias")
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight / ref_bias are used only with ref_hidden; pass ref_hidden too, or drop them")
    check_pair_loss_arguments(
        num_seqs,
        hidden.device,
        weight.shape[0],
        ref_hidden is not None,
        ref_chosen_logps,
        ref_rejected_logps,
        loss_type,
        loss_kwargs,
        ld_alpha,
        use_weighting,
    )
    weights = None if ld_alpha is None else ld_token_weights(labels, ld_alpha, ignore_index, **packing)
    common = dict(
        ignore_index=ignore_index,
        backend=backend,
        chunk_tokens=chunk_tokens,
        memory_budget_bytes=memory_budget_bytes,
        token_weights=weights,
        **packing,
    )
    others = (ref_chosen_logps, ref_rejected_logps, *loss_kwargs.values())
    graded = any(isinstance(x, torch.Tensor) and x.requires_grad for x in others)
    if is_dtensor(weight):
        if single_pass:
            raise ValueError("single_pass=True cannot run with a vocab-sharded weight; leave single_pass unset")
        groups, mode = None, "two-pass: vocab-sharded weight (one merge of every rank's stats per step)"
    else:
        plan = (chunk, loss_type, single_pass, proj, graded, segments is not None)
        groups, mode = _plan(hidden, weight, bias, labels, ignore_index, *plan)
    reference = None
    if ref_hidden is not None:  # first: the single pass reads the reference's statistics
        with torch.no_grad():
            reference = linear_sequence_logps(
                ref_hidden.detach(),
                ref_w.detach(),
                labels,
                bias=None if ref_b is None else ref_b.detach(),
                return_entropy=True,
                **common,
            )
    refs = (reference, ref_chosen_logps, ref_rejected_logps)
    if groups is not None:
        run = dict(impl=impl, proj=proj, ignore_index=ignore_index, use_weighting=use_weighting, mode=mode)
        return _single_pass_loss(hidden, weight, bias, labels, weights, groups, refs, loss_type, loss_kwargs, **run)
    policy = linear_sequence_logps(
        hidden, weight, labels, bias=bias, return_entropy=True, return_log_sum_sq=use_weighting, **common
    )
    return _pair_loss(policy, refs, weight.shape[0], loss_type, loss_kwargs, use_weighting)._replace(mode=mode)


def _plan(hidden, weight, bias, labels, ignore_index, chunk, loss_type, single_pass, proj, graded, packed) -> tuple:
    """:func:`pyfastpo.linear_single_pass.plan_groups` under the caller's ``single_pass``,
    after the cases the single pass leaves to two passes: torch.compile, float16 (a loss
    scale must enter before the gradients are rounded to float16), loss inputs other
    than hidden, weight and bias that need a gradient (``graded``), and packed sequences."""
    if single_pass is False:
        return None, "two-pass: single_pass=False"
    if torch.compiler.is_compiling():
        groups, why = None, "two-pass: under torch.compile (the single pass runs the loss inside its own loop)"
    elif proj == torch.float16:
        groups, why = None, "two-pass: float16 (a GradScaler's scale must reach the gradients before rounding)"
    elif graded:
        groups, why = None, "two-pass: a reference log-prob or loss option tensor requires grad"
    elif packed:
        groups, why = None, "two-pass: packed sequences (the single pass groups whole pairs of rows)"
    else:
        needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
        groups, why = plan_groups(labels, ignore_index, chunk, loss_type, needs_grad)
    if single_pass and groups is None:
        raise ValueError(f"single_pass=True cannot run here: {why}")
    return groups, why


def _pair_loss(policy: SequenceLogps, refs: tuple, vocab: int, loss_type, loss_kwargs: dict, use_weighting: bool):
    """:func:`pyfastpo.pairs.pair_loss_from_stats` with WPO's weights from ``policy`` when asked;
    ``refs``: ``(reference stats or None, ref_chosen_logps, ref_rejected_logps)``."""
    if use_weighting:
        loss_kwargs = dict(loss_kwargs, pair_weights=wpo_pair_weights(policy))
    return pair_loss_from_stats(policy, *refs, vocab, loss_type, loss_kwargs)


@torch.compiler.disable  # data-dependent loops and the loss's own autograd inside (never reached compiling)
def _single_pass_loss(
    hidden,
    weight,
    bias,
    labels,
    token_weights,
    groups,
    refs,
    loss_type,
    loss_kwargs,
    *,
    impl,
    proj,
    ignore_index,
    use_weighting,
    mode,
) -> FusedPreferenceLossOutput:
    """:func:`pyfastpo.linear_single_pass.single_pass`, then the loss of the whole batch from
    its detached statistics (the same value, metrics and rewards as two passes), carrying
    the gradients the pass computed."""
    reference, ref_chosen, ref_rejected = refs
    half = hidden.shape[0] // 2
    vocab = weight.shape[0]

    def group_losses(stats: SequenceLogps, pairs: torch.Tensor) -> torch.Tensor:
        seqs = torch.cat((pairs, pairs + half))
        group_refs = (
            None if reference is None else SequenceLogps(*(None if f is None else f[seqs] for f in reference)),
            None if ref_chosen is None else ref_chosen[pairs],
            None if ref_rejected is None else ref_rejected[pairs],
        )
        kwargs = {k: v[pairs] if k in PER_PAIR_ARGS and v is not None else v for k, v in loss_kwargs.items()}
        return _pair_loss(stats, group_refs, vocab, loss_type, kwargs, use_weighting).losses

    policy, grads = single_pass(
        hidden,
        weight,
        bias,
        labels,
        token_weights,
        groups,
        group_losses,
        impl=impl,
        proj=proj,
        ignore_index=ignore_index,
        with_log_sum_sq=use_weighting,
    )
    out = _pair_loss(policy, refs, vocab, loss_type, loss_kwargs, use_weighting)
    return out._replace(loss=attach_gradients(out.loss, hidden, weight, bias, grads), mode=mode)
