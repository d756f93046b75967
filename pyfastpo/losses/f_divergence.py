"""f-DPO (Wang et al. 2023, "Beyond Reverse KL"): the log-ratio ``u = log(pi / pi_ref)`` of
each completion enters the loss through ``f'(exp(u))`` of the chosen f-divergence, as trl
1.13's DPOTrainer computes it. Reverse KL (``f'(t) = log t + 1``, the constant cancels) is
standard DPO.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

F_DIVERGENCE_LOSSES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    | {"focalpo", "mallows_dpo", "mallows_ipo", "mallows_phi", "cauchy"}
)
"""Loss types built on the score difference: trl 1.13's list, plus pyfastpo's types that
are written in DPO's logit ``h`` (FocalPO, MallowsPO, Cauchy). The others read the log-ratios
themselves (NCA, BCO, SPPO, AOT, APO) or have no reference (SimPO), and are refused."""

_ALPHA_CLAMP = 80.0
"""Largest ``(alpha - 1) u`` exponentiated (trl's float32 bound; exp(80) ~ 5.5e34 is finite)."""


def f_divergence_score(logratio: torch.Tensor, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """``f'(pi / pi_ref)`` up to a constant, from ``logratio = log(pi / pi_ref)`` ``[B]``.

    reverse_kl: ``u``; forward_kl: ``1 - exp(-u)``; js_divergence: ``log 2 + logsigmoid(u)``;
    alpha_divergence: ``(exp((alpha - 1) u) - 1) / (alpha - 1)``, with ``(alpha - 1) u``
    clamped at 80 and ``u`` itself where ``|alpha - 1| < 1e-6`` (the limit), as trl does.
    """
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = torch.clamp((alpha - 1.0) * logratio, max=_ALPHA_CLAMP)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {kind!r}")
