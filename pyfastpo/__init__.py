"""pyfastpo: a fused, memory-lean loss backend for preference optimization.

Public API (see README.md and ../DESIGN.md):
``sequence_logps``, ``preference_loss``, ``fused_preference_loss``,
``available_backends``.
"""

from .backends import available_backends
from .sequence_logps import SequenceLogps, sequence_logps

__all__ = ["SequenceLogps", "available_backends", "sequence_logps"]
__version__ = "0.1.0"
