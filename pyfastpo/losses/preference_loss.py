"""``preference_loss``: per-sequence log-probs to a preference loss, rewards and metrics."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from ..validation import check_same_device
from .mallows import dispersion_from_entropy
from .options import SCALAR_DEFAULTS, check_loss_options
from .pairwise import LOSSES, MALLOWS, NEEDS_TOKEN_COUNTS, PairTerms


class PreferenceLossOutput(NamedTuple):
    """Result of :func:`preference_loss`.

    loss: scalar, ``losses.mean()``; what to call ``backward()`` on.
    losses: ``[B]`` per-pair loss (weighted sum over loss types plus BCR and NLL terms).
    chosen_rewards, rejected_rewards: ``[B]`` detached ``beta * (logps - ref_logps)``.
    metrics: detached 0-dim tensors under TRL's names (``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected``) plus ``mallows/dispersion``,
        ``loss/bcr``, ``loss/nll`` when those terms are used. Call ``.item()`` to log.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict


def _check_vector(name: str, value, size: int) -> None:
    if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != (size,)):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape [{size}] (one value per pair), got {shape}")


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float | None = None,
    focal_gamma: float = 0.05,
    focal_detach: bool = False,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    ref_chosen_entropy: torch.Tensor | None = None,
    ref_rejected_entropy: torch.Tensor | None = None,
    vocab_size: int | None = None,
    dispersion_scale: float = 0.29,
    dispersion: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    bcr_weight: float = 0.0,
    bcr_budget: float = 0.0,
    bcr_per_token: bool = False,
    nll_weight: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    length_normalize: bool = False,
    reference_free: bool = False,
    home_advantage: float = 0.0,
    mixing_alpha: float | None = None,
    sft_weight: float = 0.0,
    chosen_nll_logps: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Preference loss from per-sequence log-probs; plain torch, autograd gives the gradient.

    Args:
        chosen_logps, rejected_logps: ``[B]`` policy log-probs of each pair's
            chosen and rejected completion (float32 or float64; lower
            precisions are computed in float32).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs, or
            None for reference-free training (treated as 0).
        loss_type: a name or a list of names (see README's table); with a list,
            ``loss_weights`` (default all 1) weights each type's mean.
        beta: inverse temperature of the implicit reward.
        label_smoothing: flip rate for ``robust``, ``aot``, ``aot_unpaired`` and
            ``mallows_dpo`` (cDPO smoothing, as the MallowsPO authors apply it);
            the target smoothing for ``exo_pair``.
        gamma: shorthand for ``focal_gamma`` (``focalpo``) or ``simpo_gamma``
            (``simpo``), whichever is in ``loss_type``.
        focal_gamma, focal_detach: FocalPO's exponent and whether to stop the
            gradient through the modulating factor.
        simpo_gamma: SimPO's target margin.  discopop_tau: DiscoPOP's temperature.
        chosen_num_tokens, rejected_num_tokens: ``[B]`` completion token counts;
            needed by ``ipo``, ``sigmoid_norm``, ``sft``, ``simpo``, the Mallows
            dispersion from entropies, ``bcr_per_token`` and ``nll_weight``.
            Zero counts are treated as one (no NaN).
        ref_chosen_entropy, ref_rejected_entropy, vocab_size, dispersion_scale:
            the reference's summed token entropies ``[B]``, V and ``c``, from
            which the Mallows losses estimate the dispersion ``phi``.
        dispersion: ``[B]`` dispersion ``phi`` in (0, 1] given directly instead.
        pair_weights: ``[B]`` weights of each pair's loss-type losses (not of the BCR,
            NLL or SFT terms), taken as constants: WPO's weights
            (:func:`pyfastpo.wpo_pair_weights`), as trl's ``use_weighting`` applies them.
        bcr_weight, bcr_budget, bcr_per_token: budget-controlled regularization
            ``bcr_weight * relu(ref_chosen - chosen - bcr_budget)`` (the drop
            divided by the chosen token count when ``bcr_per_token``).
        nll_weight: weight of the chosen completion's per-token NLL (RPO).
        f_divergence_type, f_alpha_divergence_coef: f-DPO (trl's options): the log-ratios
            enter through ``f'`` of ``reverse_kl`` (DPO), ``forward_kl``,
            ``js_divergence`` or ``alpha_divergence`` (coefficient alpha); see
            :mod:`pyfastpo.losses.f_divergence`. Rewards stay ``beta * log-ratio``.
        length_normalize: divide every log-prob (policy and reference) by its
            completion's token count before the loss, as the MallowsPO authors' trainer
            does (``length_normalization``); not with the types that already do.
        reference_free: take the reference log-probs as 0 even when given (the
            MallowsPO authors' default: the reference model then only sets the Mallows
            dispersion through its entropies).
        home_advantage: a margin subtracted from the log-ratio difference inside the
            logit ``h`` (the logit-based types: ``sigmoid``, ``robust``, ``hinge``,
            ``exo_pair``, ``discopop``, ``focalpo``, ``mallows_dpo``, ``mallows_phi``,
            ``cauchy``).
        mixing_alpha: the MallowsPO authors' mixing, for the same types: the logit is
            ``beta ((chosen - rejected) - alpha (ref_chosen - ref_rejected) - (1 - alpha)
            home_advantage)``; None: off.
        sft_weight: adds ``sft_weight * (-chosen_logps)`` per pair, the chosen completion's
            summed NLL (per token under ``length_normalize``): the authors' SFT term.
        chosen_nll_logps: ``[B]`` the chosen completions' plain summed log-probs, which the
            NLL terms (the ``sft`` type, ``nll_weight``, ``sft_weight``) read in place of
            ``chosen_logps`` when those are weighted per token (LD-DPO: as trl, whose
            ``sft`` is a plain cross-entropy under ``ld_alpha`` too); None: ``chosen_logps``.

    Options are checked before anything is computed (see
    :mod:`pyfastpo.losses.options`): out-of-range values, values that would flip
    the training signal and scalar options the chosen loss types never read raise
    ValueError. Per-pair data the chosen types do not read (token counts,
    reference entropies, ``dispersion``, ``vocab_size``) is accepted, so that one
    call site can serve every loss type; the fused entry points refuse it.

    Returns:
        :class:`PreferenceLossOutput`.
    """
    # The scalar options by name (SCALAR_DEFAULTS lists them; a test ties it to this
    # signature). Spelled out, not locals(): torch.compile traces this without a break.
    scalars = dict(
        loss_weights=loss_weights,
        beta=beta,
        bcr_weight=bcr_weight,
        nll_weight=nll_weight,
        label_smoothing=label_smoothing,
        gamma=gamma,
        focal_gamma=focal_gamma,
        focal_detach=focal_detach,
        simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau,
        dispersion_scale=dispersion_scale,
        bcr_budget=bcr_budget,
        bcr_per_token=bcr_per_token,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        length_normalize=length_normalize,
        reference_free=reference_free,
        home_advantage=home_advantage,
        mixing_alpha=mixing_alpha,
        sft_weight=sft_weight,
    )
    assert scalars.keys() == SCALAR_DEFAULTS.keys()
    options = check_loss_options(loss_type, dispersion_given=dispersion is not None, vocab_size=vocab_size, **scalars)
    types, weights = options.types, options.weights
    focal_gamma, simpo_gamma = options.focal_gamma, options.simpo_gamma

    b = chosen_logps.shape[0] if isinstance(chosen_logps, torch.Tensor) and chosen_logps.dim() == 1 else -1
    if b < 1:
        raise ValueError("chosen_logps must be a non-empty tensor of shape [B] (one value per pair)")
    vectors = dict(
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens,
        ref_chosen_entropy=ref_chosen_entropy,
        ref_rejected_entropy=ref_rejected_entropy,
        dispersion=dispersion,
        pair_weights=pair_weights,
        chosen_nll_logps=chosen_nll_logps,
    )
    if rejected_logps is None:
        raise ValueError("rejected_logps is required: a tensor of shape [B], one value per pair")
    for name, value in vectors.items():
        _check_vector(name, value, b)
    check_same_device(chosen_logps=chosen_logps, **vectors)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    if reference_free and ref_chosen_logps is not None and not MALLOWS & set(types):
        raise ValueError(
            "reference_free=True takes the reference log-probs as 0 and no loss type here reads the "
            "reference's entropies (only the Mallows losses do): pass no reference log-probs"
        )

    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    no_reference = reference_free or ref_chosen_logps is None
    ref_chosen = chosen.new_zeros(b) if no_reference else ref_chosen_logps.to(dtype)
    ref_rejected = chosen.new_zeros(b) if no_reference else ref_rejected_logps.to(dtype)

    needs_counts = [t for t in types if t in NEEDS_TOKEN_COUNTS]
    needs_counts += ["bcr_per_token"] if bcr_per_token and bcr_weight else []
    needs_counts += ["nll_weight"] if nll_weight else []
    needs_counts += ["length_normalize"] if length_normalize else []
    have_counts = chosen_num_tokens is not None and rejected_num_tokens is not None
    if needs_counts and not have_counts:
        raise ValueError(f"{needs_counts} need chosen_num_tokens and rejected_num_tokens (completion token counts)")
    chosen_tokens = chosen_num_tokens.to(dtype) if chosen_num_tokens is not None else None
    rejected_tokens = rejected_num_tokens.to(dtype) if rejected_num_tokens is not None else None
    # BCR and the NLL term read the summed log-probs (they divide by the counts themselves);
    # the NLL terms read the plain ones (chosen_nll_logps, under LD-DPO's token weights).
    nll_chosen = chosen if chosen_nll_logps is None else chosen_nll_logps.to(dtype)
    summed_chosen, summed_ref_chosen, summed_nll = chosen, ref_chosen, nll_chosen
    if length_normalize:  # every log-prob per token, as the MallowsPO authors' trainer does
        nc, nr = chosen_tokens.clamp_min(1), rejected_tokens.clamp_min(1)
        chosen, rejected, ref_chosen, ref_rejected = chosen / nc, rejected / nr, ref_chosen / nc, ref_rejected / nr
        nll_chosen = nll_chosen / nc

    phi = None
    if MALLOWS & set(types):
        phi = _mallows_dispersion(
            dispersion,
            ref_chosen_entropy,
            ref_rejected_entropy,
            chosen_num_tokens,
            rejected_num_tokens,
            vocab_size,
            dispersion_scale,
        ).to(dtype)

    terms = PairTerms(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta,
        label_smoothing,
        chosen_tokens,
        rejected_tokens,
        phi,
        focal_gamma,
        focal_detach,
        simpo_gamma,
        discopop_tau,
        f_divergence_type,
        float(f_alpha_divergence_coef),
        float(home_advantage),
        None if mixing_alpha is None else float(mixing_alpha),
        nll_chosen,
    )
    losses = sum(w * LOSSES[t](terms) for t, w in zip(types, weights))
    if pair_weights is not None:
        if {"aot", "aot_unpaired"} & set(types):
            raise ValueError("pair_weights (WPO) need a per-pair loss; 'aot' and 'aot_unpaired' sort across the batch")
        losses = losses * pair_weights.detach().to(dtype)
    metrics = {}
    if bcr_weight:
        drop = summed_ref_chosen - summed_chosen
        bcr = bcr_weight * torch.relu((drop / terms.nc if bcr_per_token else drop) - bcr_budget)
        losses = losses + bcr
        metrics["loss/bcr"] = bcr.detach().mean()
    if nll_weight:
        nll = nll_weight * (-summed_nll / terms.nc)
        losses = losses + nll
        metrics["loss/nll"] = nll.detach().mean()
    if sft_weight:
        sft_term = sft_weight * (-nll_chosen)
        losses = losses + sft_term
        metrics["loss/sft"] = sft_term.detach().mean()

    chosen_rewards = (beta * terms.dc).detach()
    rejected_rewards = (beta * terms.dr).detach()
    metrics.update(
        {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
    )
    if phi is not None:
        metrics["mallows/dispersion"] = phi.detach().mean()
    return PreferenceLossOutput(losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)


def check_dispersion(dispersion: torch.Tensor) -> None:
    """A given Mallows dispersion ``[B]`` must lie in (0, 1] (NaN refused too)."""
    if not bool(((dispersion > 0) & (dispersion <= 1)).all()):  # written so that NaN fails the test
        raise ValueError("dispersion must lie in (0, 1] (1: uniform preferences), with no NaN")


def _mallows_dispersion(dispersion, hc, hr, nc, nr, vocab_size, scale) -> torch.Tensor:
    if dispersion is not None:
        check_dispersion(dispersion)
        return dispersion
    missing = [
        name
        for name, value in dict(
            ref_chosen_entropy=hc,
            ref_rejected_entropy=hr,
            chosen_num_tokens=nc,
            rejected_num_tokens=nr,
            vocab_size=vocab_size,
        ).items()
        if value is None
    ]
    if missing:
        raise ValueError(
            f"the Mallows losses need a dispersion: pass dispersion=, or {missing} "
            "(reference entropies from sequence_logps(ref_logits, labels, return_entropy=True))"
        )
    return dispersion_from_entropy(hc, hr, nc, nr, vocab_size, scale)


PER_PAIR_ARGS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_num_tokens",
    "rejected_num_tokens",
    "ref_chosen_entropy",
    "ref_rejected_entropy",
    "dispersion",
    "pair_weights",
    "chosen_nll_logps",
)
"""The per-pair ``[B]`` tensors preference_loss takes besides the policy log-probs."""
# Scalar options check_loss_options takes under the same names.

COMPUTED_BY_ENTRY_POINTS = frozenset({"chosen_num_tokens", "rejected_num_tokens", "vocab_size", "chosen_nll_logps"})
"""preference_loss arguments the fused entry points compute from the labels and logits."""


def check_loss_kwargs(
    loss_type,
    loss_kwargs: dict,
    *,
    num_pairs: int,
    device: torch.device,
    vocab_size: int | None,
    filled: Iterable[str] = (),
) -> None:
    """Validate the ``loss_type`` and ``**loss_kwargs`` that a fused entry point
    (``fused_preference_loss``, ``linear_preference_loss``) forwards to
    :func:`preference_loss`, before any kernel runs.

    Args:
        loss_kwargs: the keyword arguments as the caller gave them.
        num_pairs: B; every per-pair tensor must be ``[B]`` on ``device``.
        vocab_size: V of the logits (the Mallows dispersion needs ``V >= 2``).
        filled: names of per-pair tensors the entry point computes itself
            (``ref_chosen_entropy`` ... ); a Mallows loss needs its dispersion
            from those, from ``dispersion`` or from given entropies.
    """
    params = inspect.signature(preference_loss).parameters
    allowed = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "loss_type")
    unknown = sorted(set(loss_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown loss option(s) {unknown}; preference_loss takes {allowed}")
    computed = sorted(set(loss_kwargs) & (COMPUTED_BY_ENTRY_POINTS | set(filled)))
    if computed:
        raise ValueError(f"{computed} are computed from the labels and logits here; do not pass them")
    scalars = {k: v for k, v in loss_kwargs.items() if k in SCALAR_DEFAULTS}
    dispersion = loss_kwargs.get("dispersion")
    types = set(
        check_loss_options(loss_type, **scalars, dispersion_given=dispersion is not None, vocab_size=vocab_size).types
    )
    for name in PER_PAIR_ARGS:
        value = loss_kwargs.get(name)
        _check_vector(name, value, num_pairs)
        if value is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}; move it with .to(device)")
    if dispersion is not None:
        check_dispersion(dispersion)
    if not MALLOWS & types:
        unread = [
            k for k in ("dispersion", "ref_chosen_entropy", "ref_rejected_entropy") if loss_kwargs.get(k) is not None
        ]
        if unread:
            raise ValueError(
                f"{unread} have no effect with loss_type {sorted(types)}: only {sorted(MALLOWS)} read them"
            )
    if MALLOWS & types and dispersion is None:
        have = set(filled) | {
            k for k in ("ref_chosen_entropy", "ref_rejected_entropy") if loss_kwargs.get(k) is not None
        }
        if not {"ref_chosen_entropy", "ref_rejected_entropy"} <= have:
            raise ValueError(
                "the Mallows losses need the reference model's token entropies: pass reference logits / hidden "
                "states (their entropies are computed in the same pass), ref_chosen_entropy and "
                "ref_rejected_entropy with precomputed reference log-probs, or dispersion="
            )
