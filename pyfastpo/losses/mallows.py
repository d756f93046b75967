"""MallowsPO: the dispersion index and the Mallows-Kendall pairwise preference.

Reference: Chen, Zhao, Lam, Yao, Tang, "MallowsPO: Fine-Tune Your LLM with
Preference Dispersions", arXiv 2405.14953.

The dispersion index ``phi(x) in (0, 1]`` of a prompt says how spread human
preferences over its answers are (1: uniform, 0: one certain ranking). Its
practical estimate is the reference model's normalized token entropy over both
completions, ``phi = Hbar ** c`` with

    Hbar = (H_c / (n_c log V) + H_r / (n_r log V)) / 2   in [0, 1],

so that MallowsPO-theta's weight ``-log phi = -c log Hbar`` (``c`` =
``dispersion_scale``, 0.29 in the authors' configuration) multiplies DPO's
logit: concentrated prompts (low entropy) get a larger weight.
"""

from __future__ import annotations

import math

import torch

PHI_MIN = 1e-6
"""Dispersions are clamped to [PHI_MIN, 1 - PHI_MIN] where the formulas need it."""


def dispersion_from_entropy(
    ref_chosen_entropy: torch.Tensor,
    ref_rejected_entropy: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    vocab_size: int,
    dispersion_scale: float = 0.29,
) -> torch.Tensor:
    """Dispersion index ``phi = Hbar ** c`` per pair, ``[B]``, from the reference model.

    Args:
        ref_chosen_entropy, ref_rejected_entropy: ``[B]`` summed per-token
            entropies (nats) of the reference model over each completion
            (``sequence_logps(ref_logits, labels, return_entropy=True).entropy``).
        chosen_num_tokens, rejected_num_tokens: ``[B]`` completion token counts;
            a completion with no token is left out of the average (the other
            side's normalized entropy is used alone).
        vocab_size: V, the logits' width (at least 2).
        dispersion_scale: ``c``.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 for the Mallows dispersion, got {vocab_size}")
    log_v = math.log(vocab_size)
    hc = ref_chosen_entropy / (chosen_num_tokens.clamp_min(1) * log_v)
    hr = ref_rejected_entropy / (rejected_num_tokens.clamp_min(1) * log_v)
    sides = (chosen_num_tokens > 0).to(hc.dtype) + (rejected_num_tokens > 0).to(hc.dtype)
    hbar = ((hc + hr) / sides.clamp_min(1)).clamp(PHI_MIN, 1.0)
    return hbar**dispersion_scale


def _log_r(k: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``log r(k)`` with ``r(k) = k / (exp(theta k) - 1)`` for ``k >= 0`` (``r(0) = 1/theta``)."""
    x = theta * k
    small = x < 1e-4
    # Away from 0: log k - x - log(1 - exp(-x)), stable for large x.
    x_big = torch.where(small, torch.ones_like(x), x)
    k_big = torch.where(small, torch.ones_like(k), k)
    big = torch.log(k_big) - x_big - torch.log(-torch.expm1(-x_big))
    # Near 0: r(k) = (1/theta) * x / expm1(x) = (1/theta) (1 - x/2 + x^2/12 - ...).
    x_small = torch.where(small, x, torch.zeros_like(x))
    series = -torch.log(theta) + torch.log1p(-x_small / 2 + x_small * x_small / 12)
    return torch.where(small, series, big)


def mallows_kendall_log_prob(margin: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Log-probability that the chosen answer is preferred, under Mallows-Kendall.

    Derivation. Under a Mallows model with Kendall's tau distance and dispersion
    ``phi``, ``P(pi) ∝ phi ** inv(pi, pi0)``. Take two items whose ranks in the
    central ranking ``pi0`` differ by ``d >= 1``. Summing over the other items'
    placements (Mallows 1957) the probability that they keep their central order
    depends on ``d`` only:

        g(d, phi) = h(d + 1) - h(d),   h(k) = k / (1 - phi ** k).

    Writing ``h(k) = k + r(k)`` with ``r(k) = k / (phi ** -k - 1)
    = k / (exp(theta k) - 1)``, ``theta = -log phi``, gives the forms used here,
    free of cancellation:

        g(d) = 1 + r(d + 1) - r(d),        1 - g(d) = r(d) - r(d + 1).

    MallowsPO-phi puts the implicit reward margin in the place of the rank gap:
    ``d = |margin|`` with ``margin = beta * delta``; the chosen answer is the
    higher-ranked item when ``margin > 0`` (probability ``g(d)``) and the lower
    one when ``margin < 0`` (probability ``1 - g(d)``). ``g`` is extended to real
    ``d >= 0`` by the same formula.

    Limits (tested): ``phi -> 1`` gives 1/2 for every margin (uniform
    preferences, loss log 2); ``margin = 1`` gives ``1 / (1 + phi)`` (adjacent
    items); ``margin -> +inf`` gives 1; ``P(m) + P(-m) = 1`` for ``m != 0``;
    ``phi -> 0`` gives 1 for any positive margin. At ``margin = 0`` the
    probability jumps from ``1 - g(0+)`` to ``g(0+) = 1/(1 - phi) - 1/theta``
    (two distinct items are never tied); the value there is ``g(0+)`` and the
    gradient the one-sided ``margin -> 0+`` one, so training that starts from
    policy == reference (every margin exactly 0) moves.

    Args:
        margin: ``[B]`` ``beta * delta``.
        phi: ``[B]`` (or scalar) dispersion in (0, 1), clamped to
            ``[PHI_MIN, 1 - PHI_MIN]``.
    Returns:
        ``[B]`` log-probabilities, in ``margin``'s dtype (computed in float64).
    """
    m = margin.double()
    theta = -torch.log(torch.as_tensor(phi, device=m.device).double().clamp(PHI_MIN, 1 - PHI_MIN))
    # |m|, with the one-sided (m -> 0+) derivative at m = 0, where the value is g(0+): abs() would give a zero
    # gradient there, and a trainer starting from policy == reference (every margin exactly 0) would never move.
    d = torch.where(m >= 0, m, -m)
    log_r0 = _log_r(d, theta)
    log_r1 = _log_r(d + 1, theta)
    log_win = torch.log1p(torch.exp(log_r1) - torch.exp(log_r0))  # log g(d)
    log_lose = log_r0 + torch.log(-torch.expm1(log_r1 - log_r0))  # log (1 - g(d))
    return torch.where(m >= 0, log_win, log_lose).to(margin.dtype)
