"""Per-pair preference losses: one small function per ``loss_type``.

Each takes a :class:`PairTerms` and returns the per-pair loss ``[B]``. The TRL
loss types follow ``trl.DPOTrainer`` (trl 1.13) exactly, so that swapping the
loss reproduces TRL's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .f_divergence import f_divergence_score
from .mallows import mallows_kendall_log_prob


@dataclass
class PairTerms:
    """Everything a per-pair loss may read; tensors are ``[B]`` in the compute dtype.

    ``chosen``/``rejected`` are policy log-probs, ``ref_*`` the reference's (0
    when reference-free), ``chosen_tokens``/``rejected_tokens`` completion token
    counts (None when not given), ``nc``/``nr`` the same clamped to at least 1 (the
    divisors of the length-normalized losses), ``phi`` the Mallows dispersion (None
    unless a Mallows loss is used). ``sc``/``sr`` are the f-DPO scores of the log-ratios
    (the log-ratios themselves under the default reverse KL). ``nll_chosen``: the chosen
    log-probs the NLL-type terms read (None: ``chosen``; the plain ones under LD-DPO).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    beta: float
    label_smoothing: float = 0.0
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    phi: torch.Tensor | None = None
    focal_gamma: float = 0.05
    focal_detach: bool = False
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    home_advantage: float = 0.0
    mixing_alpha: float | None = None
    nll_chosen: torch.Tensor | None = None

    @property
    def nc(self) -> torch.Tensor:
        """Chosen token counts, at least 1 (an empty completion divides by 1, never 0)."""
        return self.chosen_tokens.clamp_min(1)

    @property
    def nr(self) -> torch.Tensor:
        """Rejected token counts, at least 1."""
        return self.rejected_tokens.clamp_min(1)

    @property
    def dc(self) -> torch.Tensor:
        """Chosen log-ratio against the reference."""
        return self.chosen - self.ref_chosen

    @property
    def dr(self) -> torch.Tensor:
        """Rejected log-ratio against the reference."""
        return self.rejected - self.ref_rejected

    @property
    def sc(self) -> torch.Tensor:
        """Chosen f-DPO score ``f'(pi / pi_ref)`` (``dc`` under reverse KL)."""
        return f_divergence_score(self.dc, self.f_divergence_type, self.f_alpha_divergence_coef)

    @property
    def sr(self) -> torch.Tensor:
        """Rejected f-DPO score."""
        return f_divergence_score(self.dr, self.f_divergence_type, self.f_alpha_divergence_coef)

    @property
    def margin(self) -> torch.Tensor:
        """The preference margin before ``beta``: ``sc - sr - home_advantage`` (``dc - dr`` by
        default); with ``mixing_alpha`` (the MallowsPO authors' mixing) ``(chosen - rejected)
        - alpha (ref_chosen - ref_rejected) - (1 - alpha) home_advantage``."""
        if self.mixing_alpha is None:
            return self.sc - self.sr - self.home_advantage
        a = self.mixing_alpha
        return (self.chosen - self.rejected) - a * (self.ref_chosen - self.ref_rejected) - (1 - a) * self.home_advantage

    @property
    def h(self) -> torch.Tensor:
        """DPO's logit ``beta * margin``: ``beta * (dc - dr)`` by default."""
        return self.beta * self.margin


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def sigmoid(p: PairTerms) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): ``-logsigmoid(h)``."""
    return -F.logsigmoid(p.h)


def robust(p: PairTerms) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ``eps``."""
    e = p.label_smoothing
    return (-(1 - e) * F.logsigmoid(p.h) + e * F.logsigmoid(-p.h)) / (1 - 2 * e)


def hinge(p: PairTerms) -> torch.Tensor:
    """SLiC hinge: ``relu(1 - h)``."""
    return torch.relu(1 - p.h)


def ipo(p: PairTerms) -> torch.Tensor:
    """IPO (Azar et al. 2023) on per-token log-ratios: ``(dc/nc - dr/nr - 1/(2 beta))^2``
    (the f-DPO scores in place of ``dc``, ``dr``)."""
    return (p.sc / p.nc - p.sr / p.nr - 1 / (2 * p.beta)) ** 2


def exo_pair(p: PairTerms) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL to the smoothed label ``(1 - eps, eps)``."""
    e = p.label_smoothing
    return torch.sigmoid(p.h) * (F.logsigmoid(p.h) - math.log1p(-e)) + torch.sigmoid(-p.h) * (
        F.logsigmoid(-p.h) - math.log(e)
    )


def nca_pair(p: PairTerms) -> torch.Tensor:
    """NCA (Chen et al. 2024), pairwise."""
    rc, rr = p.beta * p.dc, p.beta * p.dr
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def bco_pair(p: PairTerms) -> torch.Tensor:
    """BCO, pairwise, as TRL 1.13 defines it (no running reward shift)."""
    return -F.logsigmoid(p.beta * p.dc) - F.logsigmoid(-p.beta * p.dr)


def sppo_hard(p: PairTerms) -> torch.Tensor:
    """SPPO (Wu et al. 2024) with hard win probabilities."""
    return (p.dc - 0.5 / p.beta) ** 2 + (p.dr + 0.5 / p.beta) ** 2


def aot(p: PairTerms) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), paired: sorted policy vs sorted reference log-ratio gaps."""
    delta = torch.sort(p.chosen - p.rejected, dim=0)[0] - torch.sort(p.ref_chosen - p.ref_rejected, dim=0)[0]
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


def aot_unpaired(p: PairTerms) -> torch.Tensor:
    """AOT, unpaired: sorted chosen vs sorted rejected log-ratios."""
    delta = torch.sort(p.dc, dim=0)[0] - torch.sort(p.dr, dim=0)[0]
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


def apo_zero(p: PairTerms) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7)."""
    return 1 - torch.sigmoid(p.beta * p.dc) + torch.sigmoid(p.beta * p.dr)


def apo_down(p: PairTerms) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8)."""
    return torch.sigmoid(p.beta * p.dc) + 1 - torch.sigmoid(p.beta * (p.dc - p.dr))


def discopop(p: PairTerms) -> torch.Tensor:
    """DiscoPOP (Chan et al. 2024, Eq. 5): log-ratio-modulated logistic/exponential blend."""
    mix = torch.sigmoid(p.h / p.discopop_tau)
    return -F.logsigmoid(p.h) * (1 - mix) + torch.exp(-p.h) * mix


def sigmoid_norm(p: PairTerms) -> torch.Tensor:
    """DPO on per-token (length-normalized) log-ratios (f-DPO scores)."""
    return -F.logsigmoid(p.beta * (p.sc / p.nc - p.sr / p.nr))


def sft(p: PairTerms) -> torch.Tensor:
    """TRL's ``sft``: token-mean NLL of the chosen completions, the same for every pair."""
    chosen = p.chosen if p.nll_chosen is None else p.nll_chosen
    return (-chosen.sum() / p.chosen_tokens.sum().clamp_min(1)).expand_as(p.chosen)


def focalpo(p: PairTerms) -> torch.Tensor:
    """FocalPO (arXiv 2501.06645): ``-sigmoid(h)^gamma * logsigmoid(h)``.

    The gradient flows through the modulating factor ``sigmoid(h)^gamma`` (the
    loss as written) unless ``focal_detach`` is set.
    """
    log_p = F.logsigmoid(p.h)
    weight = torch.exp(p.focal_gamma * log_p)  # p^gamma, stable for very negative h
    if p.focal_detach:
        weight = weight.detach()
    return -weight * log_p


def _theta(p: PairTerms) -> torch.Tensor:
    """MallowsPO-theta's weight ``-log phi`` per pair."""
    return -torch.log(p.phi)


def mallows_dpo(p: PairTerms) -> torch.Tensor:
    """MallowsPO-theta (arXiv 2405.14953): ``-logsigmoid(-log(phi) * h)``, with cDPO label
    smoothing ``eps`` as the authors' trainer applies it. ``-log(phi) = 1`` gives ``sigmoid``."""
    return _smoothed_sigmoid(_theta(p) * p.h, p.label_smoothing)


def mallows_ipo(p: PairTerms) -> torch.Tensor:
    """MallowsPO-theta with IPO's squared loss on per-token log-ratios (``ipo``'s convention):
    ``(-log(phi) * (dc/nc - dr/nr) - 1/(2 beta))^2``. ``-log(phi) = 1`` gives ``ipo``."""
    return (_theta(p) * (p.sc / p.nc - p.sr / p.nr) - 1 / (2 * p.beta)) ** 2


def mallows_phi(p: PairTerms) -> torch.Tensor:
    """MallowsPO-phi: ``-log P(chosen > rejected)`` under Mallows-Kendall with dispersion
    ``phi`` and rank gap ``h``; see :func:`mallows_kendall_log_prob` for the derivation."""
    return -mallows_kendall_log_prob(p.h, p.phi)


def cauchy(p: PairTerms) -> torch.Tensor:
    """The MallowsPO authors' Cauchy link: ``-log(atan(h) / pi + 1/2)``, the negative log of
    the standard Cauchy CDF at the logit ``h`` (where DPO takes the logistic CDF). Written
    as ``-log(atan2(1, -h) / pi)``, the same value, which does not cancel to 0 for very
    negative ``h``."""
    h = p.h
    return -torch.log(torch.atan2(torch.ones_like(h), -h) / math.pi)


def simpo(p: PairTerms) -> torch.Tensor:
    """SimPO (Meng et al. 2024): ``-logsigmoid(beta (lc/nc - lr/nr) - gamma)``, no reference."""
    return -F.logsigmoid(p.beta * (p.chosen / p.nc - p.rejected / p.nr) - p.simpo_gamma)


LOSSES = {
    f.__name__: f
    for f in (
        sigmoid,
        robust,
        hinge,
        ipo,
        exo_pair,
        nca_pair,
        bco_pair,
        sppo_hard,
        aot,
        aot_unpaired,
        apo_zero,
        apo_down,
        discopop,
        sigmoid_norm,
        sft,
        focalpo,
        mallows_dpo,
        mallows_ipo,
        mallows_phi,
        simpo,
        cauchy,
    )
}
"""Every ``loss_type`` by name."""

NEEDS_TOKEN_COUNTS = {"ipo", "sigmoid_norm", "sft", "simpo", "mallows_ipo"}
MALLOWS = {"mallows_dpo", "mallows_ipo", "mallows_phi"}
LOGIT_LOSSES = {"sigmoid", "robust", "hinge", "exo_pair", "discopop", "focalpo", "mallows_dpo", "mallows_phi", "cauchy"}
"""The loss types written in the logit ``h`` alone: the ones ``home_advantage`` and
``mixing_alpha`` (which change ``h``) apply to."""
PER_TOKEN = {"ipo", "sigmoid_norm", "mallows_ipo", "simpo", "sft"}
"""The loss types that already divide by the token counts (``length_normalize`` would do it twice)."""
