"""Chosen/rejected pairs: from per-sequence statistics of the policy (and reference) to the
preference loss. Shared by the logits path (:func:`pyfastpo.fused_preference_loss`) and
the hidden-state path (:func:`pyfastpo.linear_preference_loss`), which differ only in how
they get the statistics.

Conventions: ``N`` sequences, rows ``[:N/2]`` the chosen completions and ``[N/2:]`` their
rejected partners (pair ``i`` is rows ``i`` and ``N/2 + i``). Both paths return
:class:`FusedPreferenceLossOutput` with the policy's full :class:`SequenceLogps`
(log-probs, token counts, entropies, mean logits) and the reference's when it was
streamed (None when reference log-probs were given precomputed, or reference-free).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .losses import PreferenceLossOutput, preference_loss
from .losses.options import needs_reference_entropy
from .losses.preference_loss import check_loss_kwargs
from .packed import packed_ld_token_weights, packed_segments
from .sequence_logps import SequenceLogps
from .validation import check_pairs

REFERENCE_ENTROPIES = ("ref_chosen_entropy", "ref_rejected_entropy")
"""Loss arguments filled in from a streamed reference (the Mallows losses' dispersion)."""


class FusedPreferenceLossOutput(NamedTuple):
    """:class:`PreferenceLossOutput`'s fields plus the per-sequence stats.

    policy: :class:`SequenceLogps` of the policy, ``[N]`` each, entropy included.
    reference: the same for the reference (None when reference log-probs were given
        precomputed or training is reference-free).
    mode: the fused linear path's mode and why ("single-pass: ..." or "two-pass: ...",
        see :mod:`pyfastpo.linear_single_pass`); None on the logits path.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict
    policy: SequenceLogps
    reference: SequenceLogps | None
    mode: str | None = None


def check_use_weighting(use_weighting, loss_type, options: dict) -> None:
    """WPO (``use_weighting``): a flag; not with the batch-sorting AOT losses (trl refuses
    them too) or with explicit ``pair_weights``."""
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be True or False, got {use_weighting!r}")
    if not use_weighting:
        return
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if {"aot", "aot_unpaired"} & set(types):
        raise ValueError(
            "use_weighting=True (WPO) needs a per-pair loss; 'aot' and 'aot_unpaired' sort across the batch"
        )
    if options.get("pair_weights") is not None:
        raise ValueError("use_weighting=True computes pair_weights itself; pass one or the other")


def check_ld_alpha(ld_alpha) -> None:
    """``ld_alpha``: None (off) or a number in [0, 1]. The NLL terms (trl's ``sft`` type,
    ``nll_weight``, ``sft_weight``) and WPO's weights keep reading the plain log-probs
    (``SequenceLogps.unweighted_logps``), as in trl."""
    if ld_alpha is None:
        return
    ok = not isinstance(ld_alpha, bool) and isinstance(ld_alpha, (int, float)) and 0.0 <= ld_alpha <= 1.0
    if not ok:
        raise ValueError(f"ld_alpha must be a number in [0, 1] (1: plain DPO, 0: shared length only), got {ld_alpha!r}")


def wpo_pair_weights(policy: SequenceLogps) -> torch.Tensor:
    """WPO's per-pair weights ``[N/2]`` (Zhou et al. 2024, Eq. 2, as trl 1.13's
    ``use_weighting``), constants: each sequence's weight is ``exp`` of the mean over its
    completion tokens of ``log p(y_t) - log sum_v p_v^2``, and a pair's is the product of
    its chosen and rejected weights. ``policy`` must carry ``log_sum_sq``; the plain
    log-probs are read (``unweighted_logps`` under LD-DPO's token weights, as trl does)."""
    if policy.log_sum_sq is None:
        raise ValueError("WPO's weights need the policy's log_sum_sq (return_log_sum_sq=True)")
    logps = policy.logps if policy.unweighted_logps is None else policy.unweighted_logps
    mean = (logps - policy.log_sum_sq) / policy.num_tokens.clamp_min(1).to(logps.dtype)
    chosen, rejected = torch.exp(mean.detach()).chunk(2)
    return chosen * rejected


def ld_token_weights(
    labels: torch.Tensor,
    ld_alpha: float,
    ignore_index: int = -100,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """LD-DPO's token weights ``[N, T]`` float32 (Liu et al. 2024, trl 1.13's ``ld_alpha``).

    Rows ``[:N/2]`` are the chosen completions and ``[N/2:]`` the rejected ones. Within a
    pair, the first ``min(len_chosen, len_rejected)`` completion tokens of each row weigh 1
    and the rest ``ld_alpha``; ignored tokens weigh 0. ``ld_alpha = 1`` is plain DPO, and
    0 keeps only the shared length. ``labels``: ``[N, T]``, completion tokens not
    ``ignore_index``. Packed (``position_ids`` or ``cu_seqlens``, as in
    :func:`pyfastpo.sequence_logps`): the same per packed sequence, the first S/2 chosen
    and the last S/2 their rejected partners.
    """
    check_ld_alpha(ld_alpha)
    segments = packed_segments(labels.shape, labels.device, position_ids, cu_seqlens)
    if segments is not None:
        check_pairs(segments.count, "the packed labels")
        return packed_ld_token_weights(labels, segments, ld_alpha, ignore_index)
    check_pairs(labels.shape[0], "labels")
    valid = labels != ignore_index
    position = valid.cumsum(dim=1)  # 1-based index among the row's completion tokens
    lengths = valid.sum(dim=1)
    chosen, rejected = lengths.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)[:, None]
    weights = torch.where(position <= shared, 1.0, float(ld_alpha))
    return (weights * valid).to(torch.float32)


def check_reference_logps(ref_chosen_logps, ref_rejected_logps, num_pairs: int, device: torch.device) -> None:
    """Precomputed reference log-probs: both or neither, each a ``[num_pairs]`` tensor on ``device``."""
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (num_pairs,):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of shape [{num_pairs}] (one value per pair), got {got}")
        if not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor (log-probabilities), got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}; move it with .to(device)")


def check_pair_loss_arguments(
    num_rows: int,
    device: torch.device,
    vocab_size: int,
    reference_streamed: bool,
    ref_chosen_logps,
    ref_rejected_logps,
    loss_type,
    loss_kwargs: dict,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
) -> None:
    """The loss-side arguments of both entry points, checked before any pass over the data:
    precomputed reference log-probs, the loss options (``num_rows = N`` sequences) and
    ``ld_alpha``."""
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, num_rows // 2, device)
    given = reference_streamed or ref_chosen_logps is not None
    if loss_kwargs.get("reference_free") and given and not needs_reference_entropy(loss_type):
        raise ValueError(
            "reference_free=True takes the reference log-probs as 0 and no loss type here reads the "
            "reference's entropies (only the Mallows losses do): pass no reference inputs"
        )
    check_ld_alpha(ld_alpha)
    check_use_weighting(use_weighting, loss_type, loss_kwargs)
    check_loss_kwargs(
        loss_type,
        loss_kwargs,
        num_pairs=num_rows // 2,
        device=device,
        vocab_size=vocab_size,
        filled=REFERENCE_ENTROPIES if reference_streamed else (),
    )


def pair_loss_from_stats(
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    vocab_size: int,
    loss_type,
    loss_kwargs: dict,
) -> FusedPreferenceLossOutput:
    """The preference loss from per-sequence stats ``[N]`` of the policy and (optionally)
    the reference: splits chosen/rejected halves, fills token counts, reference
    entropies and ``vocab_size`` in for the losses, adds TRL's ``logits/*`` metrics."""
    loss_kwargs = dict(loss_kwargs)
    if reference is not None:
        ref_chosen_logps, ref_rejected_logps = reference.logps.chunk(2)
        if reference.entropy is not None and needs_reference_entropy(loss_type):
            loss_kwargs["ref_chosen_entropy"], loss_kwargs["ref_rejected_entropy"] = reference.entropy.chunk(2)
    chosen_logps, rejected_logps = policy.logps.chunk(2)
    chosen_tokens, rejected_tokens = policy.num_tokens.chunk(2)
    # Computed here; the entry points refuse them as user arguments (check_loss_kwargs).
    loss_kwargs.update(chosen_num_tokens=chosen_tokens, rejected_num_tokens=rejected_tokens, vocab_size=vocab_size)
    if policy.unweighted_logps is not None:  # LD-DPO: the NLL terms read the plain log-probs
        loss_kwargs["chosen_nll_logps"] = policy.unweighted_logps.chunk(2)[0]
    out: PreferenceLossOutput = preference_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=loss_type, **loss_kwargs
    )
    metrics = dict(out.metrics)
    for name, mean, count in zip(("chosen", "rejected"), policy.mean_logits.chunk(2), (chosen_tokens, rejected_tokens)):
        # TRL's metric: the mean logit over all valid tokens of that half.
        metrics[f"logits/{name}"] = (mean * count).sum() / count.sum().clamp_min(1)
    return FusedPreferenceLossOutput(*out[:4], metrics, policy, reference)
