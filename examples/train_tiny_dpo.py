"""Train a tiny Llama with TRL + pyfastpo on a synthetic preference task, one run per loss type.

No downloads: the model is a 2-layer Llama built from a config, the tokenizer is
trained locally, and the data are synthetic (see ``tiny_setup.py``: each prompt
asks for an object of a colour; the chosen answer has that colour, the rejected
one another). Every run starts from the same initial model.

    python examples/train_tiny_dpo.py                       # 300 steps each: sigmoid, focalpo, mallows_dpo
    python examples/train_tiny_dpo.py --quick               # a few seconds per loss type
    python examples/train_tiny_dpo.py --loss-types sigmoid ipo simpo --steps 500 --out runs/

Prints a progress line every ``--log-every`` steps, then a table (final loss,
rewards/accuracies, rewards/margins, wall time), and saves ``tiny_dpo.png``
(loss and rewards/accuracies per step, one line per loss type) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_setup  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss-types", nargs="+", default=["sigmoid", "focalpo", "mallows_dpo"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=1024, help="size of the synthetic data set")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--backend", default="auto", help="pyfastpo backend")
    parser.add_argument("--log-every", type=int, default=25, help="print a progress line every N steps")
    parser.add_argument("--out", default="tiny_dpo_out", help="folder for the plot and the metrics")
    parser.add_argument(
        "--quick", action="store_true", help="150 steps at lr 4e-3 on 512 pairs (the start of learning only)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the matrices are tiny: 1 is fastest)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.pairs, args.lr, args.log_every = 150, 512, 4e-3, 25
    return args


def train_one(loss_type, args, tokenizer, init_model, dataset, progress=True):
    from transformers import PrinterCallback, TrainerCallback

    from pyfastpo.integrations.trl import FastDPOConfig, FastDPOTrainer

    class Progress(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "loss" in logs and (state.global_step % args.log_every == 0 or state.global_step == 1):
                print(
                    f"  [{loss_type:>12}] step {state.global_step:4d}/{args.steps}  loss {logs['loss']:.4f}  "
                    f"rewards/accuracies {logs['rewards/accuracies']:.3f}  "
                    f"rewards/margins {logs['rewards/margins']:+.4f}",
                    flush=True,
                )

    config = FastDPOConfig(
        **tiny_setup.dpo_config_kwargs(
            output_dir=os.path.join(args.out, "checkpoints", loss_type),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            data_seed=args.seed,
        ),
        loss_type=loss_type,
        beta=args.beta,
        pyfastpo_backend=args.backend,
    )
    trainer = FastDPOTrainer(
        model=copy.deepcopy(init_model),
        ref_model=copy.deepcopy(init_model),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Progress()] if progress else [],
    )
    trainer.remove_callback(PrinterCallback)  # our Progress line replaces the raw log dicts
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    history = [h for h in trainer.state.log_history if "loss" in h and "rewards/accuracies" in h]
    return history, elapsed


def summarize(history, key, window):
    tail = [h[key] for h in history[-window:]]
    return sum(tail) / len(tail)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for loss_type, (history, _) in results.items():
        steps = [h["step"] for h in history]
        for ax, key in zip(axes, ("loss", "rewards/accuracies")):
            values = [h[key] for h in history]
            width = max(1, len(values) // 30)  # light moving average: per-step values are noisy
            smooth = [
                sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
                for i in range(len(values))
            ]
            ax.plot(steps, smooth, label=loss_type)
    for ax, key in zip(axes, ("loss", "rewards/accuracies")):
        ax.set_xlabel("step")
        ax.set_title(key + " (moving average)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    tokenizer = tiny_setup.make_tokenizer()
    start = time.perf_counter()
    # DPO starts from an SFT model: a short supervised warm-up on both completions (see tiny_setup.sft_warmup).
    init_model = tiny_setup.make_sft_model(tokenizer, steps=30 if args.quick else 60, seed=args.seed)
    dataset = tiny_setup.make_preference_dataset(args.pairs, seed=args.seed)
    n_params = sum(p.numel() for p in init_model.parameters())
    print(
        f"tiny Llama: {n_params / 1e3:.0f}k parameters, vocabulary {len(tokenizer)}, SFT warm-up "
        f"{time.perf_counter() - start:.1f} s; {args.pairs} synthetic pairs; "
        f"{args.steps} steps x {args.batch_size} pairs per loss type"
    )
    # One throwaway 2-step run so that one-time start-up costs do not land in the first loss type's time.
    train_one(
        args.loss_types[0],
        argparse.Namespace(**{**vars(args), "steps": 2}),
        tokenizer,
        init_model,
        dataset,
        progress=False,
    )

    results = {}
    for loss_type in args.loss_types:
        print(f"training with loss_type={loss_type!r}", flush=True)
        results[loss_type] = train_one(loss_type, args, tokenizer, init_model, dataset)

    window = max(1, args.steps // 10)
    header = "| loss type | final loss | rewards/accuracies | rewards/margins | time (s) |"
    print(f"\nfinal = mean over the last {window} steps; time = trainer.train() wall time\n")
    print(header)
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = []
    for loss_type, (history, elapsed) in results.items():
        row = dict(
            loss_type=loss_type,
            loss=summarize(history, "loss", window),
            accuracy=summarize(history, "rewards/accuracies", window),
            margin=summarize(history, "rewards/margins", window),
            seconds=elapsed,
        )
        rows.append(row)
        print(f"| {loss_type} | {row['loss']:.4f} | {row['accuracy']:.3f} | {row['margin']:+.4f} | {elapsed:.1f} |")
    path = os.path.join(args.out, "tiny_dpo.png")
    plot(results, path)
    print(f"\nplot: {path}")
    return rows


if __name__ == "__main__":
    main()
