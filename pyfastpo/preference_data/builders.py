"""Preference pairs from rankings, in TRL's ``prompt`` / ``chosen`` / ``rejected`` format.

A strategy maps a ranking (completion indices, best first) to ``(chosen,
rejected)`` index pairs:

- ``best_worst``: the best against the worst (one pair per prompt; the paper's choice);
- ``best_vs_rest``: the best against each of the others (K - 1 pairs);
- ``adjacent``: each completion against the next one down (K - 1 pairs).

:func:`build_pairs` turns them into a ``datasets.Dataset``.
"""

from __future__ import annotations

import math

from .ranking import Ranking, compare_pairs


def best_worst(order: list[int]) -> list[tuple[int, int]]:
    """``[(order[0], order[-1])]`` (none for fewer than two completions)."""
    return [(order[0], order[-1])] if len(order) >= 2 else []


def best_vs_rest(order: list[int]) -> list[tuple[int, int]]:
    """``[(order[0], order[r]) for r in 1..K-1]``."""
    return [(order[0], other) for other in order[1:]]


def adjacent(order: list[int]) -> list[tuple[int, int]]:
    """``[(order[r], order[r + 1]) for r in 0..K-2]``."""
    return list(zip(order[:-1], order[1:]))


STRATEGIES = {"best_worst": best_worst, "best_vs_rest": best_vs_rest, "adjacent": adjacent}


def pair_features():
    """The ``datasets.Features`` of :func:`build_pairs`' output."""
    from datasets import Features, Value

    return Features(
        {
            "prompt": Value("string"),
            "chosen": Value("string"),
            "rejected": Value("string"),
            "chosen_rank": Value("int32"),
            "rejected_rank": Value("int32"),
            "margin": Value("int32"),
            "confidence": Value("float64"),
            "comparisons": Value("int32"),
        }
    )


def pair_rows(
    prompts: list[str],
    completions: list[list[str]],
    rankings: list[Ranking],
    strategy: str = "best_worst",
    *,
    judge=None,
    both_orders: bool = True,
    drop_ties: bool = True,
    min_confidence: float | None = None,
) -> dict[str, list]:
    """The columns of :func:`build_pairs` as a dict of lists (same arguments)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    if not (len(prompts) == len(completions) == len(rankings)):
        raise ValueError(
            f"prompts, completions and rankings differ in length: {len(prompts)}, {len(completions)}, {len(rankings)}"
        )
    candidates = []  # (prompt index, chosen index, rejected index, confidence or None)
    for n, ranking in enumerate(rankings):
        if sorted(ranking.order) != list(range(len(completions[n]))):
            raise ValueError(f"ranking {n} is not a permutation of its {len(completions[n])} completions")
        for chosen, rejected in STRATEGIES[strategy](ranking.order):
            candidates.append([n, chosen, rejected, ranking.probability(chosen, rejected)])
    if judge is not None:
        missing = [c for c in candidates if c[3] is None]
        probs = compare_pairs(
            judge,
            [prompts[c[0]] for c in missing],
            [completions[c[0]][c[1]] for c in missing],
            [completions[c[0]][c[2]] for c in missing],
            both_orders=both_orders,
        )
        for c, p in zip(missing, probs):
            c[3] = p
    columns = {name: [] for name in pair_features()}
    for n, chosen, rejected, confidence in candidates:
        chosen_text, rejected_text = completions[n][chosen], completions[n][rejected]
        if drop_ties and (chosen_text == rejected_text or confidence == 0.5):
            continue
        if min_confidence is not None and confidence is not None and confidence < min_confidence:
            continue
        ranking = rankings[n]
        columns["prompt"].append(prompts[n])
        columns["chosen"].append(chosen_text)
        columns["rejected"].append(rejected_text)
        columns["chosen_rank"].append(ranking.rank(chosen))
        columns["rejected_rank"].append(ranking.rank(rejected))
        columns["margin"].append(ranking.rank(rejected) - ranking.rank(chosen))
        columns["confidence"].append(None if confidence is None or math.isnan(confidence) else confidence)
        columns["comparisons"].append(ranking.comparisons)
    return columns


def build_pairs(
    prompts: list[str],
    completions: list[list[str]],
    rankings: list[Ranking],
    strategy: str = "best_worst",
    *,
    judge=None,
    both_orders: bool = True,
    drop_ties: bool = True,
    min_confidence: float | None = None,
):
    """A ``datasets.Dataset`` of preference pairs from rankings (TRL's standard preference format).

    Args:
        prompts: N prompts; completions: N lists of completion strings.
        rankings: N :class:`~.ranking.Ranking` (from :func:`~.ranking.rank_completions`).
        strategy: ``"best_worst"``, ``"best_vs_rest"`` or ``"adjacent"``.
        judge: when given (anything :func:`~.judges.as_judge` accepts), the built pairs
            the ranking never judged directly are judged now, in one call
            (``both_orders`` as in the ranking), to give them a confidence.
        drop_ties: drop pairs whose two texts are identical or whose direct judgment is a tie (0.5).
        min_confidence: also drop pairs whose confidence is known and below this.

    Returns:
        A ``datasets.Dataset``, one row per pair, columns: ``prompt``, ``chosen``,
        ``rejected`` (str); ``chosen_rank``, ``rejected_rank`` (0 = best) and
        ``margin`` (``rejected_rank - chosen_rank`` >= 1) (int32); ``confidence``
        (float64: the judged P(chosen better than rejected) when that pair was judged,
        directly by the ranking or by ``judge`` here; ``None`` when it was not, as
        happens for pairs the sort ordered by transitivity); ``comparisons`` (int32:
        unique pairs judged for that prompt).
    """
    from datasets import Dataset

    columns = pair_rows(
        prompts,
        completions,
        rankings,
        strategy,
        judge=judge,
        both_orders=both_orders,
        drop_ties=drop_ties,
        min_confidence=min_confidence,
    )
    return Dataset.from_dict(columns, features=pair_features())
