"""Preference data by iterative pairwise ranking (the data half of arXiv 2411.05875).

"Towards Improved Preference Optimization Pipeline: from Data Generation to
Budget-Controlled Regularization" finds that preference pairs chosen by a
scoring reward model (best and worst score) are noisy, and builds them instead
from an iterative pairwise ranking: a judge compares two completions at a time
and the ranking of a prompt's sampled completions follows from those
comparisons; chosen/rejected are then the best and the worst. This package
maps the pipeline onto small modules (one job each):

- :mod:`.sampling`: K completions per prompt from the policy (the paper samples
  from the model being trained): :func:`sample_completions`.
- :mod:`.judges`: the pairwise judge (the paper's LLM judge asked "which is
  better"): a local causal LM read at the next token (:class:`CausalLMJudge`),
  TRL's pairwise judges as they are, any callable; and the scoring reward model
  the paper compares against (:class:`RewardModelJudge`, which also gives scores).
- :mod:`.ranking`: the iterative pairwise ranking with O(K log K) comparisons
  (binary insertion), both presentation orders against position bias, cached
  and seeded, batched across prompts: :func:`rank_completions`.
- :mod:`.builders`: chosen/rejected from the ranking (``best_worst``, the
  paper's; ``best_vs_rest``, ``adjacent``) as a TRL preference dataset: :func:`build_pairs`.
- :mod:`.cli`: ``python -m pyfastpo.preference_data`` / ``pyfastpo-pairs``, resumable.

The regularization half of the paper (budget-controlled regularization) is the
``bcr_*`` options of :func:`pyfastpo.preference_loss`.

Importing this package is cheap: torch, transformers, datasets and tqdm are
imported by the functions that use them.
"""

from .builders import STRATEGIES, adjacent, best_vs_rest, best_worst, build_pairs
from .judges import CallableJudge, CausalLMJudge, Judge, RewardModelJudge, TRLPairwiseJudge, as_judge
from .ranking import Ranking, combine_orders, compare_pairs, insertion_bound, rank_completions
from .sampling import sample_completions

__all__ = [
    "STRATEGIES",
    "CallableJudge",
    "CausalLMJudge",
    "Judge",
    "Ranking",
    "RewardModelJudge",
    "TRLPairwiseJudge",
    "adjacent",
    "as_judge",
    "best_vs_rest",
    "best_worst",
    "build_pairs",
    "combine_orders",
    "compare_pairs",
    "insertion_bound",
    "rank_completions",
    "sample_completions",
]
