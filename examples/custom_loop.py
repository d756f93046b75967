"""pyfastpo in a plain PyTorch training loop with a Transformers model (no TRL).

Two variants on the same tiny Llama and synthetic preference data (see ``tiny_setup.py``):

1. ``fused_preference_loss``: the model's logits (a view, ``logits[:, :-1]``) and
   the reference's logits go in; the gradient is written back into the logits'
   storage.
2. ``linear_preference_loss``: the decoder's last hidden states and the
   ``lm_head`` weight go in; the logits are never materialized (only chunks of
   the completion tokens are projected, and freed).

Both start from the same model and see the same batches, so their losses agree
step for step (up to float32 rounding).

    python examples/custom_loop.py                    # 100 steps each, sigmoid
    python examples/custom_loop.py --loss-type mallows_dpo --steps 200
    python examples/custom_loop.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_setup  # noqa: E402

import pyfastpo  # noqa: E402


def batches(num_pairs: int, batch_pairs: int, steps: int, seed: int):
    """Row indices ``[2b]`` of each step: ``b`` pairs' chosen rows, then the same pairs' rejected rows."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, num_pairs, (batch_pairs,), generator=generator)
        yield torch.cat([idx, idx + num_pairs])


def run(variant, model, ref_model, data, args):
    input_ids, attention_mask, labels = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    history = []
    start = time.perf_counter()
    for step, rows in enumerate(batches(input_ids.shape[0] // 2, args.batch_size, args.steps, args.seed), 1):
        ids, mask, lab = input_ids[rows], attention_mask[rows], labels[rows]
        # Trim to the longest sequence of the batch (right padding).
        width = int(mask.sum(1).max())
        ids, mask, lab = ids[:, :width], mask[:, :width], lab[:, : width - 1]
        loss_kwargs = dict(loss_type=args.loss_type, beta=args.beta, backend=args.backend)

        if variant == "fused_preference_loss":
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # a view: never copied
            with torch.no_grad():
                ref_logits = ref_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            out = pyfastpo.fused_preference_loss(logits, lab, ref_logits=ref_logits, **loss_kwargs)
        else:
            # The decoder without lm_head: [N, T, H] hidden states instead of [N, T, V] logits.
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            with torch.no_grad():
                ref_hidden = ref_model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            out = pyfastpo.linear_preference_loss(
                hidden,
                model.lm_head.weight,
                lab,
                bias=model.lm_head.bias,
                ref_hidden=ref_hidden,
                ref_weight=ref_model.lm_head.weight,
                ref_bias=ref_model.lm_head.bias,
                **loss_kwargs,
            )

        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        metrics = {k: v.item() for k, v in out.metrics.items()}
        history.append({"loss": out.loss.item(), **metrics})
        if step % args.log_every == 0 or step == 1:
            extra = (
                f"  mallows/dispersion {metrics['mallows/dispersion']:.3f}" if "mallows/dispersion" in metrics else ""
            )
            print(
                f"  [{variant}] step {step:4d}  loss {out.loss.item():.4f}  "
                f"rewards/accuracies {metrics['rewards/accuracies']:.3f}  "
                f"rewards/margins {metrics['rewards/margins']:+.4f}{extra}",
                flush=True,
            )
    return history, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss-type", default="sigmoid")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the matrices are tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.log_every = 20, 5
    torch.set_num_threads(args.threads)

    tokenizer = tiny_setup.make_tokenizer()
    init_model = tiny_setup.make_sft_model(tokenizer, steps=30 if args.quick else 60, seed=args.seed)
    data = tiny_setup.tokenize_pairs(tokenizer, tiny_setup.make_pairs(512, seed=args.seed))
    print(f"pyfastpo backends here: {pyfastpo.available_backends()}; loss_type={args.loss_type!r}")

    results = {}
    for variant in ("fused_preference_loss", "linear_preference_loss"):
        print(f"{variant}:")
        ref_model = copy.deepcopy(init_model).eval().requires_grad_(False)
        results[variant] = run(variant, copy.deepcopy(init_model), ref_model, data, args)

    print("\n| variant | first loss | final loss | rewards/accuracies (last 10) | time (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant, (history, seconds) in results.items():
        tail = history[-10:]
        accuracy = sum(h["rewards/accuracies"] for h in tail) / len(tail)
        print(f"| {variant} | {history[0]['loss']:.4f} | {history[-1]['loss']:.4f} | {accuracy:.3f} | {seconds:.1f} |")
    a, b = (h for h, _ in results.values())
    diff = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b))
    print(f"\nlargest relative loss difference between the two variants over {len(a)} steps: {diff:.1e}")


if __name__ == "__main__":
    main()
