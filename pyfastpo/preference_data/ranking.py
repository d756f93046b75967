"""Iterative pairwise ranking: K completions per prompt ranked from pairwise judgments.

The sort is a binary-insertion sort: the completions are taken in a seeded
random order and each is inserted into the ranking built so far by binary
search against it. Inserting the i-th item (i items already ranked) takes at
most ``ceil(log2(i + 1))`` comparisons, so a prompt with K completions needs
at most ``sum_{i=1}^{K-1} ceil(log2(i + 1))`` (:func:`insertion_bound`,
``<= K log2 K``) unique comparisons, against ``K (K - 1) / 2`` for all pairs.
Binary insertion is chosen over merge sort because it is close to the
information-theoretic minimum of comparisons (``log2 K!``) for small K and
simple to run as a resumable step function.

Each comparison is asked in both presentation orders, ``(a, b)`` and
``(b, a)``, in the same judge call, and combined by :func:`combine_orders`:
``p = (p_ab + 1 - p_ba) / 2``, except when each order prefers the same *slot*
(the judge follows the position, not the content): then it is a tie, ``p =
0.5``, counted in :attr:`Ranking.ties`. Tie policy: a tie counts as "not
better", so the inserted item goes after the one it ties with (the search
goes on in the lower half; equal items keep their insertion order, stable).

Every prompt's sort is a generator yielding the pair it needs next; the sorts
of all prompts run in lockstep, one judge call per step holding the pending
comparison of every unfinished prompt (both orders). Judged probabilities are
cached per unordered pair: no pair is ever sent to the judge twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Generator
from dataclasses import dataclass, field

from .judges import as_judge, check_probabilities, check_queries


def insertion_bound(k: int) -> int:
    """The most unique comparisons binary insertion needs for ``k`` items: ``sum_{i=1}^{k-1} ceil(log2(i+1))``."""
    return sum(math.ceil(math.log2(i + 1)) for i in range(1, k))


def combine_orders(p_first: float, p_swapped: float) -> float:
    """P(a better than b) from both presentation orders.

    ``p_first`` is the judge's P(first better) for ``(a, b)``, ``p_swapped`` for
    ``(b, a)``. Returns ``(p_first + 1 - p_swapped) / 2``, or exactly ``0.5`` (a
    tie) when both orders strictly prefer the same slot (both > 0.5 or both < 0.5).
    """
    if (p_first > 0.5 and p_swapped > 0.5) or (p_first < 0.5 and p_swapped < 0.5):
        return 0.5
    return (p_first + 1.0 - p_swapped) / 2.0


def compare_pairs(judge, prompts: list[str], firsts: list[str], seconds: list[str], *, both_orders: bool = True):
    """P(firsts[i] better than seconds[i]) for each query, in one judge call (``2N`` queries with both orders).

    ``judge``: anything :func:`~.judges.as_judge` accepts. Returns ``list[float]``
    of length N, each order-combined by :func:`combine_orders` when ``both_orders``.
    """
    judge = as_judge(judge)
    count = check_queries(prompts, firsts, seconds)
    if count == 0:
        return []
    if both_orders:
        values = judge.compare(list(prompts) * 2, list(firsts) + list(seconds), list(seconds) + list(firsts))
        values = check_probabilities(values, 2 * count, "the judge")
        return [combine_orders(values[i], values[count + i]) for i in range(count)]
    return check_probabilities(judge.compare(list(prompts), list(firsts), list(seconds)), count, "the judge")


@dataclass
class Ranking:
    """The ranking of one prompt's completions and what it took.

    Attributes:
        order: completion indices, best first.
        probabilities: ``{(i, j): P(i better than j)}`` for every judged pair, ``i < j``
            (order-combined; ``0.5`` is a tie). Its size is the number of unique comparisons.
        ties: judged pairs that came out as ties (``p == 0.5``).
        queries: presentations sent to the judge (unique comparisons x orders).
    """

    order: list[int]
    probabilities: dict[tuple[int, int], float] = field(default_factory=dict)
    ties: int = 0
    queries: int = 0

    @property
    def comparisons(self) -> int:
        """Unique pairs judged (judge queries per presentation order)."""
        return len(self.probabilities)

    def probability(self, i: int, j: int) -> float | None:
        """P(completion i better than completion j) if that pair was judged, else ``None``."""
        if (i, j) in self.probabilities:
            return self.probabilities[(i, j)]
        if (j, i) in self.probabilities:
            return 1.0 - self.probabilities[(j, i)]
        return None

    def rank(self, i: int) -> int:
        """The rank of completion ``i`` (0 = best)."""
        return self.order.index(i)

    def to_json(self) -> dict:
        """A JSON-serializable dict (probabilities as ``[[i, j, p], ...]``); :meth:`from_json` reads it back."""
        probs = [[i, j, p] for (i, j), p in sorted(self.probabilities.items())]
        return {"order": self.order, "probabilities": probs, "ties": self.ties, "queries": self.queries}

    @classmethod
    def from_json(cls, data: dict) -> Ranking:
        """The inverse of :meth:`to_json`."""
        probs = {(int(i), int(j)): float(p) for i, j, p in data["probabilities"]}
        return cls(list(data["order"]), probs, int(data["ties"]), int(data["queries"]))


def insertion_order(prompt: str, completions: list[str], seed: int) -> list[int]:
    """The seeded order in which :func:`rank_completions` inserts ``completions``.

    Seeded by ``(seed, prompt, completions)`` only, so a prompt's ranking does not
    depend on which other prompts share its batch (a resumed run ranks the same).
    """
    import random

    digest = hashlib.sha256(json.dumps([seed, prompt, completions]).encode()).digest()
    order = list(range(len(completions)))
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    return order


def binary_insertion_sort(order: list[int]) -> Generator[tuple[int, int], float, list[int]]:
    """The sort as a generator: yields ``(a, b)`` and is sent P(a better than b); returns the ranking.

    ``order``: the items in insertion order. A reply ``> 0.5`` puts ``a`` above ``b``;
    ``<= 0.5`` (worse or tie) below it.
    """
    ranked = list(order[:1])
    for item in order[1:]:
        lo, hi = 0, len(ranked)
        while lo < hi:
            mid = (lo + hi) // 2
            if (yield (item, ranked[mid])) > 0.5:
                hi = mid
            else:
                lo = mid + 1
        ranked.insert(lo, item)
    return ranked


class _Sort:
    """One prompt's sort in progress: the generator, its pending pair and its cache."""

    def __init__(self, order: list[int]):
        self.gen = binary_insertion_sort(order)
        self.result = Ranking(order=[])
        self.pending = self._advance(None)

    def _advance(self, reply):
        try:
            pair = next(self.gen) if reply is None else self.gen.send(reply)
            while (cached := self.result.probability(*pair)) is not None:  # never judged twice
                pair = self.gen.send(cached)
            return pair
        except StopIteration as stop:
            self.result.order = stop.value
            return None

    def answer(self, p: float, orders: int):
        a, b = self.pending
        self.result.probabilities[(a, b) if a < b else (b, a)] = p if a < b else 1.0 - p
        self.result.ties += p == 0.5
        self.result.queries += orders
        self.pending = self._advance(p)


def rank_completions(
    judge,
    prompts: list[str],
    completions: list[list[str]],
    *,
    both_orders: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[Ranking]:
    """Rank each prompt's completions by iterative pairwise comparison (binary insertion).

    Args:
        judge: anything :func:`~.judges.as_judge` accepts.
        prompts: N prompts.
        completions: N lists of completions (K_i >= 1 each; K may differ per prompt).
        both_orders: ask each comparison in both presentation orders (see the module docstring).
        seed: seeds each prompt's insertion order (:func:`insertion_order`).
        progress: a tqdm bar over prompts.

    Returns:
        ``list[Ranking]``, one per prompt: the order (best first), the judged
        probabilities, ties and the query count. At most :func:`insertion_bound`
        ``(K_i)`` unique comparisons per prompt; one judge call per lockstep step.
    """
    from tqdm.auto import tqdm

    judge = as_judge(judge)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
    for index, group in enumerate(completions):
        if len(group) < 1:
            raise ValueError(f"prompt {index} has no completions")
    sorts = [_Sort(insertion_order(p, list(c), seed)) for p, c in zip(prompts, completions)]
    orders = 2 if both_orders else 1
    active = [i for i, s in enumerate(sorts) if s.pending is not None]
    with tqdm(total=len(prompts), disable=not progress, desc="ranking", unit="prompt") as bar:
        bar.update(len(prompts) - len(active))
        while active:
            firsts = [completions[i][sorts[i].pending[0]] for i in active]
            seconds = [completions[i][sorts[i].pending[1]] for i in active]
            replies = compare_pairs(judge, [prompts[i] for i in active], firsts, seconds, both_orders=both_orders)
            for i, p in zip(active, replies):
                sorts[i].answer(p, orders)
            still = [i for i in active if sorts[i].pending is not None]
            bar.update(len(active) - len(still))
            active = still
    return [s.result for s in sorts]
