"""``python -m pyfastpo.bench`` (``pyfastpo-bench``): pyfastpo against the ways trainers compute log-probs.

One small module per job:

- :mod:`.data`: random logits, hidden states and DPO-shaped labels; sweep sizes.
- :mod:`.contenders`: the registry of contenders (every pyfastpo backend, TRL's
  way eager and compiled, Liger-Kernel, Cut Cross-Entropy, the materialized
  linear path), each either runnable or skipped with a reason.
- :mod:`.measure`: timing, peak memory, the byte/FLOP model, copy bandwidth,
  correctness against ``reference``.
- :mod:`.report`: ``results.md``, ``results.json`` and the PNG plots.
- :mod:`.cli`: argument parsing and the sweep loop.

Importing this package is cheap (no matplotlib, tqdm or trl): ``pyfastpo.demo``
uses its data helpers.
"""

from .data import IGNORE, make_batch, make_labels, trl_way_logps

__all__ = ["IGNORE", "make_batch", "make_labels", "trl_way_logps"]
