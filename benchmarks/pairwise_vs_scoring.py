"""Scoring-based pairs against pairwise-ranked pairs, in miniature (arXiv 2411.05875's data claim).

A synthetic task with known ground-truth quality: the prompts of ``examples/tiny_setup.py``
("give me a red cat :"), K candidate answers per prompt, each naming a colour; an answer's
quality is minus the distance of its colour from the asked one in a fixed colour list
(the asked colour, quality 0, is among the candidates). Both selectors see the same judge
noise: every reading of a completion is its quality plus Gaussian noise of scale ``sigma``.

- scoring (the reward-model baseline): one reading per completion; chosen = the highest
  score, rejected = the lowest;
- pairwise: :func:`pyfastpo.preference_data.rank_completions` with a judge that compares
  two fresh readings per presentation order (both orders; a disagreement is a tie), then
  :func:`~pyfastpo.preference_data.build_pairs` (best vs worst).

Measured per ``sigma``: pair accuracy (chosen truly better than rejected), the ranking's
Kendall tau against the truth, and judge readings per prompt. Then a tiny Llama is trained
with ``FastDPOTrainer`` on each selector's pairs at one noise level, and its
``rewards/accuracies`` is read on held-out true pairs (asked colour against another).

    python benchmarks/pairwise_vs_scoring.py --out benchmarks/results/<dir>

writes ``results.json`` and ``pairwise_vs_scoring.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import tiny_setup  # noqa: E402


def make_task(num_prompts: int, k: int, seed: int) -> list[dict]:
    """Prompts with K candidate answers and their true qualities (asked colour included)."""
    rng = random.Random(seed)
    pairs = tiny_setup.make_pairs(num_prompts, num_nouns=40, seed=seed)
    task = []
    for prompt, chosen in zip(pairs["prompt"], pairs["chosen"]):
        asked = next(c for c in tiny_setup.COLORS if f" {c} " in f" {prompt} ")
        others = rng.sample([c for c in tiny_setup.COLORS if c != asked], k - 1)
        colours = [asked] + others
        rng.shuffle(colours)
        texts = [chosen.replace(f" {asked} ", f" {c} ") for c in colours]
        index = tiny_setup.COLORS.index
        quality = [-abs(index(c) - index(asked)) for c in colours]
        task.append(dict(prompt=prompt, completions=texts, quality=quality))
    return task


def kendall_tau(order: list[int], quality: list[float]) -> float:
    """Kendall's tau-b between a ranking (indices, best first) and the true qualities."""
    position = {c: r for r, c in enumerate(order)}
    concordant = discordant = ties_q = 0
    n = len(order)
    for i in range(n):
        for j in range(i + 1, n):
            dq = quality[i] - quality[j]
            dr = position[j] - position[i]  # > 0: i ranked above j
            if dq == 0:
                ties_q += 1
            elif dq * dr > 0:
                concordant += 1
            else:
                discordant += 1
    pairs = n * (n - 1) // 2
    return (concordant - discordant) / math.sqrt((pairs - ties_q) * pairs)


class NoisyReadings:
    """Readings ``quality + N(0, sigma^2)``, a fresh draw each time, seeded; counts them."""

    def __init__(self, task: list[dict], sigma: float, seed: int):
        self.quality = {(t["prompt"], c): q for t in task for c, q in zip(t["completions"], t["quality"])}
        self.sigma, self.rng, self.readings = sigma, random.Random(seed), 0

    def read(self, prompt: str, completion: str) -> float:
        self.readings += 1
        return self.quality[(prompt, completion)] + self.rng.gauss(0.0, self.sigma)

    def compare(self, prompts, firsts, seconds) -> list[float]:
        """The pairwise judge: 1.0 when the first's reading beats the second's, else 0.0."""
        return [float(self.read(p, a) > self.read(p, b)) for p, a, b in zip(prompts, firsts, seconds)]


def select(task: list[dict], sigma: float, seed: int) -> dict:
    """Both selectors' best-vs-worst pairs at noise ``sigma``, with their statistics."""
    from pyfastpo.preference_data import build_pairs, rank_completions

    prompts = [t["prompt"] for t in task]
    completions = [t["completions"] for t in task]
    out = {}
    scorer = NoisyReadings(task, sigma, seed)
    rows, taus, correct = [], [], 0
    for t in task:
        scores = [scorer.read(t["prompt"], c) for c in t["completions"]]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        taus.append(kendall_tau(order, t["quality"]))
        best, worst = order[0], order[-1]
        correct += t["quality"][best] > t["quality"][worst]
        rows.append(dict(prompt=t["prompt"], chosen=t["completions"][best], rejected=t["completions"][worst]))
    out["scoring"] = dict(
        pairs=rows,
        pair_accuracy=correct / len(task),
        kendall_tau=sum(taus) / len(taus),
        readings_per_prompt=scorer.readings / len(task),
    )
    judge = NoisyReadings(task, sigma, seed + 1)
    rankings = rank_completions(judge, prompts, completions, seed=seed, progress=False)
    dataset = build_pairs(prompts, completions, rankings, "best_worst", drop_ties=False)
    quality = {(t["prompt"], c): q for t in task for c, q in zip(t["completions"], t["quality"])}
    correct = sum(quality[(r["prompt"], r["chosen"])] > quality[(r["prompt"], r["rejected"])] for r in dataset)
    out["pairwise"] = dict(
        pairs=[dict(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in dataset],
        pair_accuracy=correct / len(dataset),
        kendall_tau=sum(kendall_tau(r.order, t["quality"]) for r, t in zip(rankings, task)) / len(task),
        readings_per_prompt=judge.readings / len(task),
        comparisons_per_prompt=sum(r.comparisons for r in rankings) / len(task),
    )
    return out


def train_and_evaluate(pairs: list[dict], eval_pairs: dict, steps: int, seed: int) -> float:
    """``rewards/accuracies`` on held-out true pairs after ``steps`` DPO steps on ``pairs``."""
    from datasets import Dataset

    from pyfastpo.integrations.trl import FastDPOConfig, FastDPOTrainer

    tokenizer = tiny_setup.make_tokenizer(num_nouns=40)
    model = tiny_setup.make_sft_model(tokenizer, seed=seed)
    config = FastDPOConfig(
        **tiny_setup.dpo_config_kwargs(
            output_dir="/tmp/pyfastpo-pairwise-vs-scoring",
            max_steps=steps,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=32,
            learning_rate=2e-3,
            seed=seed,
            data_seed=seed,
        ),
        loss_type="sigmoid",
        beta=0.1,
    )
    trainer = FastDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=config,
        train_dataset=Dataset.from_list(pairs),
        eval_dataset=Dataset.from_dict(eval_pairs),
        processing_class=tokenizer,
    )
    trainer.train()
    return float(trainer.evaluate()["eval_rewards/accuracies"])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = [r["sigma"] for r in results["selection"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, style in (("scoring", "o--"), ("pairwise", "s-")):
        axes[0].plot(sigmas, [r[name]["pair_accuracy"] for r in results["selection"]], style, label=name)
        axes[1].plot(sigmas, [r[name]["kendall_tau"] for r in results["selection"]], style, label=name)
    axes[0].set(xlabel="judge noise sigma (quality steps of 1)", ylabel="pair accuracy", title="best vs worst pairs")
    axes[1].set(xlabel="judge noise sigma", ylabel="Kendall tau vs truth", title="ranking of K completions")
    names = list(results["training"]["reward_accuracy"])
    values = [results["training"]["reward_accuracy"][n] for n in names]
    axes[2].bar(names, values, color=["tab:blue", "tab:orange"])
    axes[2].set(
        ylabel="held-out rewards/accuracies",
        title=f"DPO on each selector's pairs, sigma {results['training']['sigma']} (mean of seeds)",
        ylim=(0, 1),
    )
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--k", type=int, default=8, help="candidates per prompt")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--train-sigma", type=float, default=4.0, help="the noise level the models are trained at")
    parser.add_argument("--steps", type=int, default=300, help="DPO steps per trained model")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per selector")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    task = make_task(args.prompts, args.k, seed=0)
    start = time.perf_counter()
    selection = []
    for sigma in args.sigmas:
        row = select(task, sigma, seed=1)
        for name in ("scoring", "pairwise"):
            row[name].pop("pairs")
        selection.append(dict(sigma=sigma, **row))
        print(
            f"sigma {sigma:4.2f}: pair accuracy scoring {row['scoring']['pair_accuracy']:.3f} "
            f"pairwise {row['pairwise']['pair_accuracy']:.3f}; tau {row['scoring']['kendall_tau']:.3f} / "
            f"{row['pairwise']['kendall_tau']:.3f}; readings/prompt {row['scoring']['readings_per_prompt']:.1f} / "
            f"{row['pairwise']['readings_per_prompt']:.1f}",
            flush=True,
        )
    chosen = select(task, args.train_sigma, seed=1)
    held_out = tiny_setup.make_pairs(128, num_nouns=40, seed=99)
    accuracy, per_seed = {}, {}
    for name in ("scoring", "pairwise"):
        runs = [train_and_evaluate(chosen[name]["pairs"], held_out, args.steps, seed) for seed in range(args.seeds)]
        accuracy[name], per_seed[name] = sum(runs) / len(runs), runs
        print(f"trained on {name} pairs (sigma {args.train_sigma}): held-out rewards/accuracies {runs}", flush=True)
    results = dict(
        args=vars(args),
        selection=selection,
        training=dict(sigma=args.train_sigma, reward_accuracy=accuracy, reward_accuracy_per_seed=per_seed),
        seconds=time.perf_counter() - start,
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "pairwise_vs_scoring.png"))


if __name__ == "__main__":
    main()
