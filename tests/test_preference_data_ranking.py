"""pyfastpo.preference_data without models: the ranking against synthetic judges with a known
true order (noise, position bias), its comparison bound, cache, seed and ties; the pair
builders; the TRL-style and callable judge adapters."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from pyfastpo.preference_data import (
    Ranking,
    as_judge,
    build_pairs,
    combine_orders,
    compare_pairs,
    insertion_bound,
    rank_completions,
)
from pyfastpo.preference_data.ranking import insertion_order


def quality(text: str) -> int:
    """Completions are ``"c<quality>"``: the true order is known to the test."""
    return int(text[1:])


def kendall_tau(order: list[int], scores: list[float]) -> float:
    """Kendall's tau-a between ``order`` (best first) and the order of ``scores`` (higher better)."""
    rank = {item: r for r, item in enumerate(order)}
    total = 0
    for i, j in itertools.combinations(range(len(scores)), 2):
        truth = scores[i] > scores[j]
        total += 1 if (rank[i] < rank[j]) == truth else -1
    return total / (len(scores) * (len(scores) - 1) / 2)


class FlipJudge:
    """Hard choices of the truth, each flipped with probability ``flip`` (seeded); counts queries."""

    def __init__(self, flip: float = 0.0, seed: int = 0):
        self.flip, self.rng, self.calls, self.queries = flip, random.Random(seed), 0, []

    def compare(self, prompts, firsts, seconds):
        self.calls += 1
        out = []
        for p, a, b in zip(prompts, firsts, seconds):
            self.queries.append((p, a, b))
            better = quality(a) > quality(b)
            out.append(float(better != (self.rng.random() < self.flip)))
        return out


class FirstSlotJudge:
    """Answers "the first" with probability ``bias`` whatever the content, else the truth (hard)."""

    def __init__(self, bias: float, seed: int = 0):
        self.bias, self.rng = bias, random.Random(seed)

    def compare(self, prompts, firsts, seconds):
        return [
            1.0 if self.rng.random() < self.bias else float(quality(a) > quality(b)) for a, b in zip(firsts, seconds)
        ]


def problem(num_prompts: int, k: int, seed: int = 0):
    """Prompts with K completions of distinct qualities, shuffled."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for n in range(num_prompts):
        qualities = rng.sample(range(1000), k)
        prompts.append(f"prompt {n}")
        completions.append([f"c{q}" for q in qualities])
    return prompts, completions


def mean_tau(prompts, completions, rankings) -> float:
    taus = [kendall_tau(r.order, [quality(c) for c in comps]) for r, comps in zip(rankings, completions)]
    return sum(taus) / len(taus)


def pair_accuracy(data) -> float:
    return sum(quality(c) > quality(r) for c, r in zip(data["chosen"], data["rejected"])) / len(data)


def test_insertion_bound_is_at_most_k_log2_k():
    assert [insertion_bound(k) for k in (1, 2, 3, 4, 5, 8)] == [0, 1, 3, 5, 8, 17]
    for k in range(2, 65):
        assert math.ceil(math.log2(math.factorial(k))) <= insertion_bound(k) <= k * math.log2(k)


@pytest.mark.parametrize("k", [4, 5, 8, 13, 16, 32])
def test_noiseless_judge_recovers_the_order_within_the_bound(k):
    prompts, completions = problem(12, k, seed=k)
    judge = FlipJudge(0.0)
    rankings = rank_completions(judge, prompts, completions, progress=False)
    for ranking, comps in zip(rankings, completions):
        assert kendall_tau(ranking.order, [quality(c) for c in comps]) == 1.0
        assert ranking.comparisons <= insertion_bound(k) <= k * math.log2(k)
        assert ranking.comparisons < k * (k - 1) / 2 or k <= 4
        assert ranking.queries == 2 * ranking.comparisons
        assert ranking.ties == 0
    # Lockstep: one judge call per step, as many steps as the longest prompt's comparisons.
    assert judge.calls == max(r.comparisons for r in rankings)
    assert len(judge.queries) == sum(r.queries for r in rankings)
    data = build_pairs(prompts, completions, rankings, "best_worst")
    assert len(data) == len(prompts) and pair_accuracy(data) == 1.0
    assert data["margin"] == [k - 1] * len(prompts)


def test_noise_lowers_tau_gracefully():
    prompts, completions = problem(40, 16, seed=1)
    taus, accuracy = {}, {}
    for flip in (0.0, 0.05, 0.15, 0.3):
        rankings = rank_completions(FlipJudge(flip, seed=3), prompts, completions, progress=False)
        taus[flip] = mean_tau(prompts, completions, rankings)
        accuracy[flip] = pair_accuracy(build_pairs(prompts, completions, rankings, "best_worst"))
        assert all(r.comparisons <= insertion_bound(16) for r in rankings)
    assert taus[0.0] == 1.0 and accuracy[0.0] == 1.0
    assert taus[0.0] > taus[0.05] > taus[0.15] > taus[0.3]
    assert taus[0.05] > 0.75 and taus[0.3] > 0.2  # degrades, still far better than chance (0)
    assert accuracy[0.05] >= 0.95 and accuracy[0.15] >= 0.85


def test_one_order_is_the_same_sort_with_half_the_queries():
    prompts, completions = problem(8, 10, seed=2)
    both = rank_completions(FlipJudge(0.0), prompts, completions, progress=False)
    one = rank_completions(FlipJudge(0.0), prompts, completions, both_orders=False, progress=False)
    assert [r.order for r in both] == [r.order for r in one]
    assert all(r.queries == r.comparisons for r in one)


def test_position_bias_both_orders_never_resolve_a_pair_wrongly():
    """A judge that says "the first" with probability 0.3 whatever the content (hard choices).

    One order takes the biased answers at face value: about bias/2 of its judgments are
    wrong. Both orders turn every biased answer into a tie (both orders name the same
    slot) or cancel it, so every resolved judgment is right, as with an unbiased judge;
    the pairs kept (ties dropped, the pair judged when the sort did not) are all right.
    The ranking itself loses about as much Kendall tau either way: a tie tells the sort
    nothing, and it places the inserted item after the tied one (see ranking.py)."""
    prompts, completions = problem(60, 8, seed=4)
    truth = [[quality(c) for c in comps] for comps in completions]

    def judged_accuracy(rankings):
        right = total = 0
        for ranking, scores in zip(rankings, truth):
            for (i, j), p in ranking.probabilities.items():
                if p != 0.5:
                    total += 1
                    right += (p > 0.5) == (scores[i] > scores[j])
        return right / total

    both = rank_completions(FirstSlotJudge(0.3, seed=5), prompts, completions, progress=False)
    one = rank_completions(FirstSlotJudge(0.3, seed=5), prompts, completions, both_orders=False, progress=False)
    assert judged_accuracy(both) == 1.0
    assert judged_accuracy(one) < 0.93
    assert sum(r.ties for r in both) > 0 and sum(r.ties for r in one) == 0

    pairs = {}
    for name, rankings, orders in (("both", both, True), ("one", one, False)):
        pairs[name] = build_pairs(
            prompts,
            completions,
            rankings,
            "best_vs_rest",
            judge=FirstSlotJudge(0.3, seed=6),
            both_orders=orders,
            min_confidence=0.5,
        )
    unbiased = rank_completions(FlipJudge(0.0), prompts, completions, progress=False)
    assert pair_accuracy(build_pairs(prompts, completions, unbiased, "best_vs_rest")) == 1.0
    assert pair_accuracy(pairs["both"]) == 1.0
    assert pair_accuracy(pairs["one"]) < 0.95
    assert all(c is not None and c > 0.5 for c in pairs["both"]["confidence"])


def test_both_orders_cancel_an_additive_position_bias_in_the_probabilities():
    """A soft judge whose P(first) is the true Bradley-Terry probability plus 0.03: the averaged
    probabilities of both orders are the unbiased ones exactly; one order keeps the +0.03."""
    prompts, completions = problem(20, 8, seed=7)

    def truth(a, b):
        return 1.0 / (1.0 + math.exp((quality(b) - quality(a)) / 400.0))

    def biased(prompts, firsts, seconds):
        return [truth(a, b) + 0.03 for a, b in zip(firsts, seconds)]

    def unbiased(prompts, firsts, seconds):
        return [truth(a, b) for a, b in zip(firsts, seconds)]

    with_bias = rank_completions(biased, prompts, completions, progress=False)
    without = rank_completions(unbiased, prompts, completions, progress=False)
    one = rank_completions(biased, prompts, completions, both_orders=False, progress=False)
    errors_both, errors_one = [], []
    for b, u, o, comps in zip(with_bias, without, one, completions):
        for (i, j), p in b.probabilities.items():
            if p != 0.5:  # pairs closer than the bias are ties (both orders prefer the first slot)
                errors_both.append(abs(p - truth(comps[i], comps[j])))
        for (i, j), p in o.probabilities.items():
            errors_one.append(abs(p - truth(comps[i], comps[j])))
        if b.ties == 0:
            assert b.order == u.order
    assert max(errors_both) < 1e-12
    assert sum(errors_one) / len(errors_one) == pytest.approx(0.03)


def test_no_pair_is_judged_twice_and_the_cache_answers_both_ways():
    prompts, completions = problem(10, 12, seed=8)
    judge = FlipJudge(0.2, seed=9)
    rankings = rank_completions(judge, prompts, completions, progress=False)
    seen = set()
    for prompt, a, b in judge.queries:
        seen.add((prompt, a, b))
    assert len(seen) == len(judge.queries)  # no presentation asked twice
    unordered = {(p, frozenset((a, b))) for p, a, b in judge.queries}
    assert len(unordered) == sum(r.comparisons for r in rankings)
    r = rankings[0]
    (i, j), p = next(iter(r.probabilities.items()))
    assert i < j and r.probability(i, j) == p and r.probability(j, i) == 1.0 - p
    assert Ranking.from_json(r.to_json()) == r


def test_a_seed_fixes_the_ranking_and_other_prompts_do_not_change_it():
    prompts, completions = problem(6, 9, seed=10)

    def run(seed, subset=None):
        subset = subset or range(len(prompts))
        return rank_completions(
            FlipJudge(0.0), [prompts[i] for i in subset], [completions[i] for i in subset], seed=seed, progress=False
        )

    first, again = run(0), run(0)
    assert [r.to_json() for r in first] == [r.to_json() for r in again]
    assert [r.to_json() for r in run(0, [3, 4])] == [first[3].to_json(), first[4].to_json()]
    assert insertion_order(prompts[0], completions[0], 0) != insertion_order(prompts[0], completions[0], 1)


def test_ties_are_counted_stable_and_dropped_from_pairs():
    # A judge that always names the first slot: every comparison is a tie in both orders.
    prompts, completions = ["p"], [["c1", "c2", "c3", "c4"]]
    rankings = rank_completions(lambda p, a, b: [1.0] * len(p), prompts, completions, progress=False)
    (ranking,) = rankings
    assert ranking.ties == ranking.comparisons == 4  # ties go after: the search runs to the bottom
    assert ranking.order == insertion_order("p", completions[0], 0)  # stable: insertion order kept
    assert len(build_pairs(prompts, completions, rankings, "adjacent")) == 0
    assert len(build_pairs(prompts, completions, rankings, "adjacent", drop_ties=False)) == 3
    assert all(p == 0.5 for p in ranking.probabilities.values())
    # Identical texts: a symmetric judge ties them; the builder drops identical pairs anyway.
    same = rank_completions(FlipJudge(0.0), ["p"], [["c5", "c5", "c1"]], progress=False)
    assert build_pairs(["p"], [["c5", "c5", "c1"]], same, "best_vs_rest")["rejected"] == ["c1"]


def test_combine_orders():
    assert combine_orders(0.9, 0.2) == pytest.approx(0.85)
    assert combine_orders(0.9, 0.6) == 0.5 and combine_orders(0.1, 0.4) == 0.5  # same slot: tie
    assert combine_orders(0.5, 0.5) == 0.5 and combine_orders(0.5, 0.0) == 0.75
    assert compare_pairs(FlipJudge(0.0), ["p", "p"], ["c2", "c1"], ["c1", "c2"]) == [1.0, 0.0]


def test_builders_columns_confidence_and_judging_missing_pairs():
    prompts, completions = problem(3, 6, seed=11)
    rankings = rank_completions(FlipJudge(0.0), prompts, completions, progress=False)
    for strategy, per_prompt in (("best_worst", 1), ("best_vs_rest", 5), ("adjacent", 5)):
        data = build_pairs(prompts, completions, rankings, strategy)
        assert len(data) == 3 * per_prompt
        assert set(data.column_names) == {
            "prompt",
            "chosen",
            "rejected",
            "chosen_rank",
            "rejected_rank",
            "margin",
            "confidence",
            "comparisons",
        }
        assert all(m == r - c >= 1 for m, r, c in zip(data["margin"], data["rejected_rank"], data["chosen_rank"]))
        assert pair_accuracy(data) == 1.0
    plain = build_pairs(prompts, completions, rankings, "best_worst")
    missing = [c is None for c in plain["confidence"]]
    judged = build_pairs(prompts, completions, rankings, "best_worst", judge=FlipJudge(0.0))
    assert all(c == 1.0 for c in judged["confidence"])
    if any(missing):  # the best-worst pair is ordered by transitivity
        assert plain.to_pandas()["confidence"].isna().sum() == sum(missing)
    with pytest.raises(ValueError, match="unknown pair strategy"):
        build_pairs(prompts, completions, rankings, "best_of_all")


class PairRMLike:
    """PairRMJudge's signature: return_scores gives P(first better)."""

    def __init__(self):
        self.kwargs = None

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False, temperature=1.0):
        self.kwargs = dict(shuffle_order=shuffle_order, return_scores=return_scores)
        scores = [1.0 / (1.0 + math.exp(quality(b) - quality(a))) for a, b in completions]
        return scores if return_scores else [0 if s >= 0.5 else 1 for s in scores]


class IndexJudge:
    """BasePairwiseJudge's signature: the index of the better completion, -1 when undecided."""

    def judge(self, prompts, completions, shuffle_order=True):
        assert shuffle_order is False
        return [-1 if p == "undecided" else int(quality(b) > quality(a)) for p, (a, b) in zip(prompts, completions)]


def test_trl_style_judges_and_callables():
    pairrm = PairRMLike()
    judge = as_judge(pairrm)
    assert judge.compare(["p", "p"], ["c3", "c1"], ["c1", "c3"]) == pytest.approx(
        [1 / (1 + math.e**-2)] * 1 + [0.119], abs=1e-3
    )
    assert pairrm.kwargs == {"shuffle_order": False, "return_scores": True}
    index = as_judge(IndexJudge())
    assert index.compare(["p", "p", "undecided"], ["c3", "c1", "c3"], ["c1", "c3", "c1"]) == [1.0, 0.0, 0.5]
    rankings = rank_completions(IndexJudge(), ["p"], [["c4", "c9", "c1"]], progress=False)
    assert rankings[0].order == [1, 0, 2]

    class BadIndex:
        def judge(self, prompts, completions, shuffle_order=True):
            return [2] * len(prompts)

    with pytest.raises(ValueError, match="index 0 or 1"):
        as_judge(BadIndex()).compare(["p"], ["a"], ["b"])
    fn = as_judge(lambda p, a, b: [0.25] * len(p))
    assert fn.compare(["p"], ["a"], ["b"]) == [0.25]
    with pytest.raises(ValueError, match="outside"):
        as_judge(lambda p, a, b: [2.0] * len(p)).compare(["p"], ["a"], ["b"])
    with pytest.raises(ValueError, match="returned 0"):
        as_judge(lambda p, a, b: []).compare(["p"], ["a"], ["b"])
    with pytest.raises(TypeError, match="cannot judge"):
        as_judge(42)
    flip = FlipJudge()
    assert as_judge(flip) is flip
