"""``fused_preference_loss``: policy (and reference) logits to the preference loss in one call."""

from __future__ import annotations

import torch

from .backends import get_backend
from .packed import packed_segments
from .pairs import (
    FusedPreferenceLossOutput,
    check_pair_loss_arguments,
    ld_token_weights,
    pair_loss_from_stats,
    wpo_pair_weights,
)
from .sequence_logps import IGNORE_INDEX, sequence_logps
from .validation import check_logits_labels, check_pairs, check_reference_input, is_dtensor
from .vocab_parallel import check_sharded_logits


def _check_logits(logits, labels, ignore_index: int, name: str = "logits") -> None:
    """:func:`check_logits_labels`, for vocab-sharded DTensor logits too."""
    if is_dtensor(logits):
        check_sharded_logits(logits, labels, ignore_index, name)
    else:
        check_logits_labels(logits, labels, ignore_index, name)


def fused_preference_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    loss_type="sigmoid",
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    inplace_backward: bool = True,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **loss_kwargs,
) -> FusedPreferenceLossOutput:
    """Preference loss straight from logits: ``sequence_logps`` then ``preference_loss``.

    Args:
        logits: ``[N, T, V]`` policy logits, N even: rows ``[:N/2]`` are the
            chosen completions, rows ``[N/2:]`` their rejected partners.
        labels: ``[N, T]`` aligned with ``logits`` (shifted by the caller);
            prompt and padding tokens set to ``ignore_index``.
        ref_logits: ``[N, T, V]`` reference-model logits (used without
            gradient; their entropies feed the Mallows losses), or
        ref_chosen_logps, ref_rejected_logps: ``[N/2]`` precomputed reference
            log-probs. Neither: reference-free.
        loss_type, **loss_kwargs: as :func:`pyfastpo.preference_loss`; token
            counts and ``vocab_size`` are filled in from the logits.
        backend, inplace_backward, ignore_index: as :func:`pyfastpo.sequence_logps`.
            Vocab-parallel: ``logits`` (and ``ref_logits``) may be DTensors sharded on V, as
            in :func:`pyfastpo.sequence_logps`; the loss and metrics are the same on every rank.
        ld_alpha: LD-DPO (trl's ``ld_alpha``): each completion's tokens past the
            shorter completion of its pair weigh ``ld_alpha`` in the policy's and the
            reference logits' log-probs (:func:`pyfastpo.ld_token_weights`; precomputed
            reference log-probs must be weighted the same way); None: off. The NLL terms
            and WPO's weights read the plain log-probs, as in trl.
        use_weighting: WPO (trl's ``use_weighting``): each pair's loss is weighted by
            :func:`pyfastpo.wpo_pair_weights`, from ``log sum_v p_v^2`` computed in the
            policy's pass.
        position_ids, cu_seqlens: packed sequences (padding-free), as in
            :func:`pyfastpo.sequence_logps`: S sequences, S even, the first S/2 the chosen
            completions and the last S/2 their rejected partners (TRL concatenates chosen
            then rejected before packing); ``ref_logits`` packed the same way, reference
            log-probs ``[S/2]``. All per-sequence outputs are then ``[S]``.

    Returns:
        :class:`pyfastpo.pairs.FusedPreferenceLossOutput` (policy entropies
        included); its metrics add TRL's ``logits/chosen`` and ``logits/rejected``.
    """
    # Every argument is checked before the first pass over the logits (on a GPU a
    # pass over multi-GB logits costs real time before an error would surface).
    _check_logits(logits, labels, ignore_index)
    packing = dict(position_ids=position_ids, cu_seqlens=cu_seqlens)
    segments = packed_segments(labels.shape, labels.device, **packing)
    num_seqs = logits.shape[0] if segments is None else segments.count
    check_pairs(num_seqs, "logits" if segments is None else "the packed logits")
    get_backend(backend, logits.device, logits.dtype)
    if ref_logits is not None:
        check_reference_input("ref_logits", ref_logits, "logits", logits, ref_chosen_logps, ref_rejected_logps)
        _check_logits(ref_logits, labels, ignore_index, name="ref_logits")
        get_backend(backend, ref_logits.device, ref_logits.dtype)
    check_pair_loss_arguments(
        num_seqs,
        logits.device,
        logits.shape[-1],
        ref_logits is not None,
        ref_chosen_logps,
        ref_rejected_logps,
        loss_type,
        loss_kwargs,
        ld_alpha,
        use_weighting,
    )
    weights = None if ld_alpha is None else ld_token_weights(labels, ld_alpha, ignore_index, **packing)
    policy = sequence_logps(
        logits,
        labels,
        ignore_index=ignore_index,
        return_entropy=True,
        backend=backend,
        inplace_backward=inplace_backward,
        token_weights=weights,
        return_log_sum_sq=use_weighting,
        **packing,
    )
    reference = None
    if ref_logits is not None:
        with torch.no_grad():
            reference = sequence_logps(
                ref_logits,
                labels,
                ignore_index=ignore_index,
                return_entropy=True,
                backend=backend,
                token_weights=weights,
                **packing,
            )
    if use_weighting:
        loss_kwargs = dict(loss_kwargs, pair_weights=wpo_pair_weights(policy))
    return pair_loss_from_stats(
        policy, reference, ref_chosen_logps, ref_rejected_logps, logits.shape[-1], loss_type, loss_kwargs
    )
