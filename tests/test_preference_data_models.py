"""pyfastpo.preference_data with tiny transformers models built locally (no downloads):
CausalLMJudge, RewardModelJudge (and the scoring baseline), sample_completions."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import torch  # noqa: E402
import transformers  # noqa: E402

from pyfastpo.preference_data import (  # noqa: E402
    CausalLMJudge,
    RewardModelJudge,
    compare_pairs,
    rank_completions,
    sample_completions,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import tiny_setup  # noqa: E402

transformers.logging.set_verbosity_error()

TEMPLATE = "{prompt} {first} or {second} :"
PROMPTS = ["give me a red cat :", "show a blue dog :", "i want a green hat please :", "give me a red cat :"]
FIRSTS = ["here is a red cat", "look", "take this green hat", "cat"]
SECONDS = ["here is a blue cat", "look , a blue dog dog", "hat", "here is a red cat"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_setup.make_tokenizer(num_nouns=20)


@pytest.fixture(scope="module")
def causal_lm(tokenizer):
    return tiny_setup.make_model(tokenizer, seed=1).eval()


def reward_model(tokenizer, seed: int = 2):
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(config).eval()


def test_causal_lm_judge_reads_the_two_labels_at_the_next_token(tokenizer, causal_lm):
    judge = CausalLMJudge(causal_lm, tokenizer, template=TEMPLATE, labels=("red", "blue"), batch_size=3)
    got = judge.compare(PROMPTS, FIRSTS, SECONDS)
    assert len(got) == 4 and all(0.0 < p < 1.0 for p in got)
    # Each query alone, unpadded: the next-token log-probs of the two labels, softmaxed over the two.
    red, blue = tokenizer.convert_tokens_to_ids(["red", "blue"])
    for p, prompt, a, b in zip(got, PROMPTS, FIRSTS, SECONDS):
        ids = tokenizer(TEMPLATE.format(prompt=prompt, first=a, second=b), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logps = causal_lm(input_ids=ids).logits[0, -1].log_softmax(-1)
        assert p == pytest.approx(torch.sigmoid(logps[red] - logps[blue]).item(), abs=1e-5)
    swapped = CausalLMJudge(causal_lm, tokenizer, template=TEMPLATE, labels=("blue", "red"), batch_size=1)
    assert swapped.compare(PROMPTS, FIRSTS, SECONDS) == pytest.approx([1 - p for p in got], abs=1e-5)
    rankings = rank_completions(judge, PROMPTS[:2], [FIRSTS[:3], SECONDS[:3]], progress=False)
    assert sorted(rankings[0].order) == [0, 1, 2] and rankings[0].comparisons <= 3


def test_causal_lm_judge_rejects_bad_labels_and_templates(tokenizer, causal_lm):
    with pytest.raises(ValueError, match="2 tokens"):
        CausalLMJudge(causal_lm, tokenizer, labels=("red cat", "blue"))
    with pytest.raises(ValueError, match="vocabulary"):
        CausalLMJudge(causal_lm, tokenizer, labels=("zebra", "blue"))
    with pytest.raises(ValueError, match="same token"):
        CausalLMJudge(causal_lm, tokenizer, labels=("red", "red"))
    with pytest.raises(ValueError, match="lacks"):
        CausalLMJudge(causal_lm, tokenizer, template="{prompt} {first}", labels=("red", "blue"))


def test_reward_model_judge_scores_cached_and_bradley_terry(tokenizer):
    model = reward_model(tokenizer)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    judge = RewardModelJudge(model, tokenizer, batch_size=3)
    scores = judge.scores(PROMPTS, FIRSTS)
    alone = RewardModelJudge(model, tokenizer, batch_size=1).scores(PROMPTS, FIRSTS)
    assert scores == pytest.approx(alone, abs=1e-5)  # right padding reads the last real token
    calls.clear()
    probs = judge.compare(PROMPTS, FIRSTS, SECONDS)
    assert len(calls) == 1  # cached: the firsts, and (PROMPTS[3], SECONDS[3]) == (PROMPTS[0], FIRSTS[0])
    seconds = judge.scores(PROMPTS, SECONDS)
    for p, a, b in zip(probs, scores, seconds):
        assert p == pytest.approx(torch.sigmoid(torch.tensor(a - b)).item(), abs=1e-6)
    # Both orders agree by construction: no tie, and the combined probability is the one-order one.
    assert compare_pairs(judge, PROMPTS, FIRSTS, SECONDS) == pytest.approx(probs, abs=1e-9)


def test_reward_model_ranking_is_the_score_order(tokenizer):
    """The scoring baseline: pairwise ranking with a reward-model judge is sorting by score."""
    judge = RewardModelJudge(reward_model(tokenizer, seed=3), tokenizer, batch_size=4)
    prompts = PROMPTS[:2]
    distinct = list(dict.fromkeys(FIRSTS + SECONDS))  # equal texts would tie (kept in insertion order)
    completions = [distinct, distinct[::-1][:5]]
    rankings = rank_completions(judge, prompts, completions, progress=False)
    for prompt, comps, ranking in zip(prompts, completions, rankings):
        scores = judge.scores([prompt] * len(comps), comps)
        assert [scores[i] for i in ranking.order] == sorted(scores, reverse=True)  # equal scores tie


def test_reward_model_judge_checks_its_model(tokenizer):
    model = reward_model(tokenizer)
    model.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels"):
        RewardModelJudge(model, tokenizer)


def test_sample_completions_shape_seed_and_new_tokens_only(tokenizer, causal_lm):
    prompts = ["give me a red cat :", "i want a blue dog please :", "show a gold hat :"]
    out = sample_completions(causal_lm, tokenizer, prompts, 3, max_new_tokens=4, batch_size=2, seed=5, progress=False)
    assert len(out) == 3 and all(len(group) == 3 for group in out)
    assert all(isinstance(c, str) and 0 < len(c.split()) <= 4 for group in out for c in group)
    assert "<pad>" not in " ".join(c for group in out for c in group)
    again = sample_completions(causal_lm, tokenizer, prompts, 3, max_new_tokens=4, batch_size=2, seed=5, progress=False)
    other = sample_completions(causal_lm, tokenizer, prompts, 3, max_new_tokens=4, batch_size=2, seed=6, progress=False)
    assert again == out and other != out
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(causal_lm, tokenizer, prompts, 2, temperature=0.0)
