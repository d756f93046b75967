"""``fused_preference_loss``: policy (and reference) logits to the preference loss in one call."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backends import get_backend
from .losses import PreferenceLossOutput, preference_loss
from .losses.options import loss_types
from .losses.pairwise import MALLOWS
from .losses.preference_loss import check_loss_kwargs
from .sequence_logps import SequenceLogps, sequence_logps
from .validation import check_logits_labels, check_pairs, check_reference_input


class FusedPreferenceLossOutput(NamedTuple):
    """:class:`PreferenceLossOutput`'s fields plus the per-sequence stats.

    policy: :class:`SequenceLogps` of the policy logits, ``[N]`` each.
    reference: the same for the reference logits (None when reference log-probs
        were given precomputed or training is reference-free).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict
    policy: SequenceLogps
    reference: SequenceLogps | None


def fused_preference_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    loss_type="sigmoid",
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = True,
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

    Returns:
        :class:`FusedPreferenceLossOutput`; its metrics add TRL's
        ``logits/chosen`` and ``logits/rejected``.
    """
    # Every argument is checked before the first pass over the logits (on a GPU a
    # pass over multi-GB logits costs real time before an error would surface).
    check_logits_labels(logits, labels, ignore_index)
    check_pairs(logits.shape[0])
    get_backend(backend, logits.device, logits.dtype)
    if ref_logits is not None:
        check_reference_input("ref_logits", ref_logits, "logits", logits, ref_chosen_logps, ref_rejected_logps)
        check_logits_labels(ref_logits, labels, ignore_index, name="ref_logits")
        get_backend(backend, ref_logits.device, ref_logits.dtype)
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, logits.shape[0] // 2, logits.device)
    filled = ("ref_chosen_entropy", "ref_rejected_entropy") if ref_logits is not None else ()
    check_loss_kwargs(
        loss_type, loss_kwargs, num_pairs=logits.shape[0] // 2, device=logits.device,
        vocab_size=logits.shape[-1], filled=filled,
    )  # fmt: skip
    policy = sequence_logps(
        logits, labels, ignore_index=ignore_index, backend=backend, inplace_backward=inplace_backward
    )
    reference = None
    if ref_logits is not None:
        with torch.no_grad():
            reference = sequence_logps(
                ref_logits, labels, ignore_index=ignore_index, return_entropy=True, backend=backend
            )
    return _preference_from_stats(
        policy, reference, ref_chosen_logps, ref_rejected_logps, logits.shape[-1], loss_type, loss_kwargs
    )


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


def _preference_from_stats(
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
        if reference.entropy is not None and MALLOWS & set(loss_types(loss_type)):
            loss_kwargs["ref_chosen_entropy"], loss_kwargs["ref_rejected_entropy"] = reference.entropy.chunk(2)
    chosen_logps, rejected_logps = policy.logps.chunk(2)
    nc, nr = policy.num_tokens.chunk(2)
    # Computed here; the entry points refuse them as user arguments (check_loss_kwargs).
    loss_kwargs.update(chosen_num_tokens=nc, rejected_num_tokens=nr, vocab_size=vocab_size)
    out: PreferenceLossOutput = preference_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=loss_type, **loss_kwargs
    )
    metrics = dict(out.metrics)
    for name, mean, count in zip(("chosen", "rejected"), policy.mean_logits.chunk(2), (nc, nr)):
        # TRL's metric: the mean logit over all valid tokens of that half.
        metrics[f"logits/{name}"] = (mean * count).sum() / count.sum().clamp_min(1)
    return FusedPreferenceLossOutput(*out[:4], metrics, policy, reference)
