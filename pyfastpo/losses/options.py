"""Checks of the scalar options of :func:`pyfastpo.preference_loss`, runnable before any kernel.

Every entry point (``preference_loss``, ``fused_preference_loss``,
``linear_preference_loss``, ``FastDPOConfig``) calls :func:`check_loss_options`
first, so a wrong option costs no pass over the logits. Three kinds of fault are
refused with a ValueError that names the valid range:

- values outside their domain (``beta`` not a positive finite number, a
  label-smoothing rate of the wrong range for the loss, an unknown loss type);
- values that would flip the training signal (a negative regularization or
  loss weight, a negative focal exponent, a dispersion scale that makes
  ``phi > 1``);
- options that the chosen loss types never read, set to a non-default value
  (they would be silently ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..validation import check_flags
from .f_divergence import F_DIVERGENCE_LOSSES, F_DIVERGENCES
from .pairwise import LOGIT_LOSSES, LOSSES, MALLOWS, PER_TOKEN

OPTION_DEFAULTS = {
    "label_smoothing": 0.0,
    "gamma": None,
    "focal_gamma": 0.05,
    "focal_detach": False,
    "simpo_gamma": 0.5,
    "discopop_tau": 0.05,
    "dispersion_scale": 0.29,
    "bcr_budget": 0.0,
    "bcr_per_token": False,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "home_advantage": 0.0,
    "mixing_alpha": None,
}
"""Defaults of the loss-specific options (``preference_loss``'s signature matches; a test checks it)."""

SCALAR_DEFAULTS = {
    "loss_weights": None,
    "beta": 0.1,
    "bcr_weight": 0.0,
    "nll_weight": 0.0,
    "sft_weight": 0.0,
    "length_normalize": False,
    "reference_free": False,
    **OPTION_DEFAULTS,
}
"""Defaults of every scalar option :func:`check_loss_options` takes (the same test checks them)."""

USED_BY = {
    "label_smoothing": {"robust", "exo_pair", "aot", "aot_unpaired", "mallows_dpo"},
    "gamma": {"focalpo", "simpo"},
    "focal_gamma": {"focalpo"},
    "focal_detach": {"focalpo"},
    "simpo_gamma": {"simpo"},
    "discopop_tau": {"discopop"},
    "dispersion_scale": set(MALLOWS),
    "home_advantage": LOGIT_LOSSES,
    "mixing_alpha": LOGIT_LOSSES,
}
"""Which loss types read each loss-specific option; set elsewhere, an option is refused."""

# Loss types whose label smoothing is a flip rate: at 0.5 the loss carries no signal, above it is reversed.
_FLIP_RATE = {"robust", "aot", "aot_unpaired", "mallows_dpo"}


@dataclass(frozen=True)
class LossOptions:
    """Validated options: the loss types, one weight each, and the resolved exponents."""

    types: list
    weights: list
    focal_gamma: float
    simpo_gamma: float


def loss_types(loss_type) -> list:
    """``loss_type`` (a name or a sequence of names) as a non-empty list of known names."""
    if isinstance(loss_type, str):
        types = [loss_type]
    elif isinstance(loss_type, Sequence) and all(isinstance(t, str) for t in loss_type):
        types = list(loss_type)
    else:
        raise ValueError(f"loss_type must be a name or a list of names from {sorted(LOSSES)}, got {loss_type!r}")
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    unknown = [t for t in types if t not in LOSSES]
    if unknown:
        raise ValueError(f"loss_type {unknown} is unknown; choose from {sorted(LOSSES)}")
    return types


def _number(
    name: str,
    value,
    *,
    low: float | None = None,
    strict: bool = False,
    high: float | None = None,
    high_open: bool = True,
    why: str = "",
) -> float:
    """``value`` as a finite float within the given bounds, else a ValueError naming the range."""
    lo = "" if low is None else ("(" if strict else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    rng = f"{lo or '(-inf'}, {hi or 'inf)'}"
    try:
        if isinstance(value, bool):  # True would silently read as 1.0
            raise TypeError
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}") from None
    ok = math.isfinite(x)
    ok = ok and (low is None or (x > low if strict else x >= low))
    ok = ok and (high is None or (x < high if high_open else x <= high))
    if not ok:
        raise ValueError(f"{name} must be a finite number in {rng}{why}, got {value!r}")
    return x


def needs_reference_entropy(loss_type) -> bool:
    """Whether ``loss_type`` (a name or a list) reads the reference's token entropies
    (the MallowsPO dispersion): then they must be streamed or precomputed."""
    return bool(MALLOWS & set(loss_types(loss_type)))


def check_loss_options(
    loss_type, *, dispersion_given: bool = False, vocab_size: int | None = None, **options
) -> LossOptions:
    """Validate :func:`pyfastpo.preference_loss`'s scalar options; no tensor is touched.

    ``options``: any of :data:`SCALAR_DEFAULTS` (the others take those defaults).
    ``dispersion_given``: the caller passes the Mallows dispersion directly (then
    ``dispersion_scale`` and ``vocab_size`` are not read). ``vocab_size``: V when
    known (the Mallows dispersion from entropies needs ``V >= 2``).

    Returns:
        :class:`LossOptions` (types, one weight per type, resolved focal and SimPO exponents).
    """
    unknown = sorted(set(options) - set(SCALAR_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown loss options {unknown}; the options are {sorted(SCALAR_DEFAULTS)}")
    o = {**SCALAR_DEFAULTS, **options}
    loss_weights, beta, label_smoothing, gamma = o["loss_weights"], o["beta"], o["label_smoothing"], o["gamma"]
    focal_gamma, focal_detach, simpo_gamma = o["focal_gamma"], o["focal_detach"], o["simpo_gamma"]
    discopop_tau, dispersion_scale = o["discopop_tau"], o["dispersion_scale"]
    bcr_weight, bcr_budget, bcr_per_token, nll_weight = (
        o["bcr_weight"],
        o["bcr_budget"],
        o["bcr_per_token"],
        o["nll_weight"],
    )
    types = loss_types(loss_type)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
            raise ValueError(f"loss_weights must be a list of numbers, one per loss type, got {loss_weights!r}")
        loss_weights = list(loss_weights)
        if len(loss_weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} entries for {len(types)} loss types; give one per type"
            )
        weights = [
            _number(f"loss_weights[{i}]", w, low=0.0, why=" (a negative weight reverses that loss)")
            for i, w in enumerate(loss_weights)
        ]
    _number("beta", beta, low=0.0, strict=True)
    label_smoothing = _number("label_smoothing", label_smoothing)
    if _FLIP_RATE & set(types) and not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5) for {sorted(_FLIP_RATE & set(types))} (a label-flip rate; "
            f"0.5 carries no signal, more reverses it), got {label_smoothing}"
        )
    if "exo_pair" in types and not 0 < label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must lie in (0, 0.5) for 'exo_pair' (EXO suggests 1e-3; at 0.5 or more the loss "
            f"prefers the rejected answer), got {label_smoothing}"
        )
    check_flags(focal_detach=focal_detach, bcr_per_token=bcr_per_token)

    values = {name: o[name] for name in OPTION_DEFAULTS}
    for name, users in USED_BY.items():
        if values[name] != OPTION_DEFAULTS[name] and not users & set(types):
            raise ValueError(
                f"{name}={values[name]!r} has no effect with loss_type {types}: only {sorted(users)} read it; "
                f"leave it at its default ({OPTION_DEFAULTS[name]!r})"
            )
    if gamma is not None:
        if "focalpo" in types and "simpo" in types:
            raise ValueError("gamma is ambiguous with both 'focalpo' and 'simpo': pass focal_gamma and simpo_gamma")
        for name in ("focal_gamma", "simpo_gamma"):
            if values[name] != OPTION_DEFAULTS[name]:
                raise ValueError(f"gamma is a shorthand for {name}: pass one of them, not both")
        focal_gamma = gamma if "focalpo" in types else focal_gamma
        simpo_gamma = gamma if "simpo" in types else simpo_gamma
    name = "gamma" if gamma is not None else None
    focal_gamma = _number(
        name or "focal_gamma", focal_gamma, low=0.0, why=" (negative up-weights the pairs already won)"
    )
    simpo_gamma = _number(name or "simpo_gamma", simpo_gamma, low=0.0, why=" (SimPO's target margin)")
    _number("discopop_tau", discopop_tau, low=0.0, strict=True)
    if MALLOWS & set(types):
        if dispersion_given and dispersion_scale != OPTION_DEFAULTS["dispersion_scale"]:
            raise ValueError("dispersion_scale has no effect when dispersion is given directly; pass one of them")
        _number(
            "dispersion_scale",
            dispersion_scale,
            low=0.0,
            strict=True,
            why=" (phi = Hbar ** c must stay in (0, 1]; c <= 0 makes phi >= 1)",
        )
        if not dispersion_given and vocab_size is not None and int(vocab_size) < 2:
            raise ValueError(
                "the Mallows losses normalize entropies by log V and need a vocabulary of at least 2, "
                f"got V={vocab_size}"
            )
    _check_f_divergence(types, values["f_divergence_type"], values["f_alpha_divergence_coef"])
    bcr_weight = _number("bcr_weight", bcr_weight, low=0.0, why=" (negative rewards lowering the chosen likelihood)")
    _number("bcr_budget", bcr_budget, low=0.0, why=" (how far the chosen log-likelihood may fall for free)")
    if not bcr_weight and (bcr_budget != OPTION_DEFAULTS["bcr_budget"] or bcr_per_token):
        raise ValueError("bcr_budget and bcr_per_token have no effect with bcr_weight=0; set bcr_weight > 0")
    _number("nll_weight", nll_weight, low=0.0, why=" (negative rewards lowering the chosen likelihood)")
    _check_mallows_release(types, o)
    return LossOptions(types, weights, focal_gamma, simpo_gamma)


def _check_f_divergence(types: list, kind, alpha) -> None:
    """f-DPO: a known divergence, only with the loss types built on the score difference
    (as trl 1.13 refuses the others), and its alpha only with the alpha divergence."""
    if kind not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, got {kind!r}")
    unsupported = sorted(set(types) - F_DIVERGENCE_LOSSES)
    if kind != "reverse_kl" and unsupported:
        raise ValueError(
            f"f_divergence_type={kind!r} works with {sorted(F_DIVERGENCE_LOSSES)} (the losses built on the score "
            f"difference); {unsupported} read the log-ratios themselves: use f_divergence_type='reverse_kl'"
        )
    _number("f_alpha_divergence_coef", alpha)
    if kind != "alpha_divergence" and alpha != OPTION_DEFAULTS["f_alpha_divergence_coef"]:
        raise ValueError(
            f"f_alpha_divergence_coef={alpha!r} has no effect with f_divergence_type={kind!r}: only "
            "'alpha_divergence' reads it; leave it at its default (0.5)"
        )


def _check_mallows_release(types: list, o: dict) -> None:
    """The options of the MallowsPO authors' trainer: length normalization, reference-free
    training, the home advantage, the mixing alpha and the SFT term."""
    check_flags(length_normalize=o["length_normalize"], reference_free=o["reference_free"])
    _number("sft_weight", o["sft_weight"], low=0.0, why=" (negative rewards lowering the chosen likelihood)")
    _number("home_advantage", o["home_advantage"])
    twice = sorted(PER_TOKEN & set(types))
    if o["length_normalize"] and twice:
        raise ValueError(f"length_normalize=True: {twice} already divide by the token counts; leave it False")
    alpha = o["mixing_alpha"]
    if alpha is not None:
        _number("mixing_alpha", alpha, low=0.0, high=1.0, high_open=False, why=" (the reference ratio's weight)")
    if alpha == 1.0 and o["home_advantage"]:
        raise ValueError("home_advantage has no effect with mixing_alpha=1 (its weight is 1 - mixing_alpha)")
    if (alpha is not None or o["home_advantage"]) and o["f_divergence_type"] != "reverse_kl":
        raise ValueError(
            "home_advantage and mixing_alpha shift DPO's log-ratio logit: use f_divergence_type='reverse_kl'"
        )
