"""From prompts alone to a trained model: sample, rank pairwise, train with BCR.

The pipeline of arXiv 2411.05875 on the tiny download-free task of ``tiny_setup.py``:

1. a policy (a tiny Llama after a short supervised warm-up, indifferent between colours)
   samples K completions per prompt (:func:`pyfastpo.preference_data.sample_completions`);
2. a judge compares completions two at a time, in both presentation orders, and
   :func:`~pyfastpo.preference_data.rank_completions` ranks each prompt's K completions by
   binary insertion (at most ``insertion_bound(K)`` comparisons);
3. :func:`~pyfastpo.preference_data.build_pairs` takes the best against the worst;
4. ``FastDPOTrainer`` trains on those pairs with budget-controlled regularization
   (``bcr_weight > 0``), and the trained policy's reward accuracy is read on held-out
   true pairs (the asked colour against another).

The judge here is a rule with noise, standing in for an LLM judge: it prefers the
completion naming the prompt's colour (then its object), and gives a wrong answer with
probability ``--judge-noise``. With a real model, pass ``CausalLMJudge(model, tokenizer)`` (or run the
CLI, ``python -m pyfastpo.preference_data --judge-lm PATH``) instead.

    python examples/prompts_to_dpo.py                 # about 30 s on one CPU thread
    python examples/prompts_to_dpo.py --prompts 128 --k 8 --steps 200
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_setup  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--k", type=int, default=8, help="completions sampled per prompt")
    parser.add_argument("--judge-noise", type=float, default=0.1, help="probability that a judgment is flipped")
    parser.add_argument("--steps", type=int, default=300, help="DPO steps")
    parser.add_argument("--bcr-weight", type=float, default=1.0)
    parser.add_argument("--bcr-budget", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/prompts_to_dpo", help="folder for pairs.jsonl")
    return parser.parse_args(argv)


class NoisyColourJudge:
    """A rule standing in for an LLM judge: a completion's quality is 2 if it names the
    prompt's colour plus 1 if it names the prompt's object; P(first better) is 1, 0 or 0.5
    (equal quality), each decided answer flipped with probability ``noise`` (seeded)."""

    def __init__(self, noise: float, seed: int):
        self.noise, self.rng = noise, random.Random(seed)

    @staticmethod
    def quality(prompt: str, completion: str) -> int:
        words, said = prompt.split(), f" {completion} "
        colour = next(c for c in tiny_setup.COLORS if c in words)
        noun = words[words.index(colour) + 1]
        return 2 * (f" {colour} " in said) + (f" {noun} " in said)

    def compare(self, prompts, firsts, seconds) -> list[float]:
        out = []
        for prompt, a, b in zip(prompts, firsts, seconds):
            qa, qb = self.quality(prompt, a), self.quality(prompt, b)
            p = 0.5 if qa == qb else float(qa > qb)
            out.append(1.0 - p if p != 0.5 and self.rng.random() < self.noise else p)
        return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from datasets import Dataset

    from pyfastpo.integrations.trl import FastDPOConfig, FastDPOTrainer
    from pyfastpo.preference_data import build_pairs, insertion_bound, rank_completions, sample_completions

    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = tiny_setup.make_tokenizer(num_nouns=40)
    policy = tiny_setup.make_sft_model(tokenizer, seed=args.seed)
    prompts = tiny_setup.make_pairs(args.prompts, num_nouns=40, seed=args.seed + 7)["prompt"]

    completions = sample_completions(policy, tokenizer, prompts, args.k, max_new_tokens=8, seed=args.seed)
    # The word-level tokenizer decodes without the space that separates prompt and answer.
    completions = [[" " + c.strip() for c in group] for group in completions]
    judge = NoisyColourJudge(args.judge_noise, args.seed)
    rankings = rank_completions(judge, prompts, completions, seed=args.seed)
    # The judge confirms each best-worst pair the sort ordered by transitivity; ties are dropped.
    pairs = build_pairs(prompts, completions, rankings, "best_worst", judge=judge)
    quality = NoisyColourJudge.quality
    accuracy = sum(quality(r["prompt"], r["chosen"]) > quality(r["prompt"], r["rejected"]) for r in pairs)
    comparisons = sum(r.comparisons for r in rankings) / len(rankings)
    print(
        f"{len(prompts)} prompts x {args.k} samples -> {len(pairs)} pairs (ties dropped); "
        f"{comparisons:.1f} comparisons per prompt (bound {insertion_bound(args.k)}); "
        f"pairs whose chosen is truly better: {accuracy}/{len(pairs)}",
        flush=True,
    )
    os.makedirs(args.out, exist_ok=True)
    pairs.to_pandas().to_json(os.path.join(args.out, "pairs.jsonl"), orient="records", lines=True)

    config = FastDPOConfig(
        **tiny_setup.dpo_config_kwargs(
            output_dir=os.path.join(args.out, "checkpoints"),
            max_steps=args.steps,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=32,
            learning_rate=2e-3,
            seed=args.seed,
            data_seed=args.seed,
            disable_tqdm=True,
        ),
        loss_type="sigmoid",
        beta=0.1,
        bcr_weight=args.bcr_weight,
        bcr_budget=args.bcr_budget,
    )
    held_out = Dataset.from_dict(tiny_setup.make_pairs(128, num_nouns=40, seed=args.seed + 99))
    train = pairs.select_columns(["prompt", "chosen", "rejected"])
    trainer = FastDPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=config,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_rewards/accuracies"]
    trainer.train()
    after = trainer.evaluate()
    print(
        f"held-out rewards/accuracies {before:.3f} -> {after['eval_rewards/accuracies']:.3f} after {args.steps} "
        f"steps (bcr_weight {args.bcr_weight}); {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return dict(pairs=len(pairs), pair_accuracy=accuracy / max(len(pairs), 1), reward_accuracy=after)


if __name__ == "__main__":
    main()
