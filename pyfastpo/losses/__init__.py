"""The loss zoo: small functions on per-sequence tensors of size B (pairs)."""

from .mallows import dispersion_from_entropy, mallows_kendall_log_prob
from .options import check_loss_options, needs_reference_entropy
from .pairwise import LOSSES, PairTerms
from .preference_loss import PreferenceLossOutput, preference_loss

LOSS_TYPES = tuple(LOSSES)
"""Every accepted ``loss_type``."""

__all__ = [
    "LOSS_TYPES",
    "PairTerms",
    "PreferenceLossOutput",
    "check_loss_options",
    "dispersion_from_entropy",
    "mallows_kendall_log_prob",
    "needs_reference_entropy",
    "preference_loss",
]
