"""pyfastpo: a fused, memory-lean loss backend for preference optimization.

Public API (README.md has the details and an example):

- :func:`sequence_logps`: logits ``[N, T, V]`` to per-sequence log-probs, the heavy op.
- :func:`preference_loss`: the loss zoo on per-sequence tensors.
- :func:`fused_preference_loss`: both in one call, from logits.
- :func:`linear_preference_loss`: from hidden states and the lm_head weight,
  logits never materialized (:func:`linear_sequence_logps` for the log-probs alone).
- :func:`available_backends`: what this install can run.
- :func:`set_label_check`: ``"sync"`` label checks (a ValueError) or ``"async"`` ones
  (a device-side assert, no host synchronization: CUDA graphs).
"""

from .backends import available_backends
from .fused import fused_preference_loss
from .linear import linear_preference_loss, linear_sequence_logps
from .losses import LOSS_TYPES, PreferenceLossOutput, preference_loss
from .pairs import FusedPreferenceLossOutput, ld_token_weights, wpo_pair_weights
from .sequence_logps import IGNORE_INDEX, SequenceLogps, sequence_logps
from .validation import set_label_check
from .version import __version__

__all__ = [
    "IGNORE_INDEX",
    "__version__",
    "LOSS_TYPES",
    "FusedPreferenceLossOutput",
    "PreferenceLossOutput",
    "SequenceLogps",
    "available_backends",
    "fused_preference_loss",
    "linear_preference_loss",
    "ld_token_weights",
    "linear_sequence_logps",
    "preference_loss",
    "sequence_logps",
    "set_label_check",
    "wpo_pair_weights",
]
