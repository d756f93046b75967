"""``python -m pyfastpo.demo``: every loss type on every backend, checked against ``reference``.

Builds a random preference batch with a large vocabulary (a prompt, completions
of different lengths, padding), runs ``fused_preference_loss`` forward and
backward for each loss type with each backend available on the device, plus the
way trainers do it today (a float32 ``log_softmax`` + ``gather``), and prints one
table: loss, rewards, the largest absolute difference to ``reference`` (loss and gradient), time and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyfastpo.backends import available_backends
from pyfastpo.bench.data import IGNORE, make_batch, trl_way_logps
from pyfastpo.fused import fused_preference_loss
from pyfastpo.losses import LOSS_TYPES, preference_loss
from pyfastpo.memory import peak_memory


def run_one(contender: str, logits, ref_logits, labels, loss_type: str, repeats: int):
    """Forward + backward of one loss on one contender; returns (loss output, grad, ms, peak bytes)."""
    leaf = logits.detach().clone().requires_grad_()

    def step(x):
        kwargs = dict(loss_type=loss_type, beta=0.1, label_smoothing=0.1 if loss_type == "exo_pair" else 0.0)
        if contender == "trl-way":
            valid = labels != IGNORE
            with torch.no_grad():
                ref = trl_way_logps(ref_logits, labels)
                if loss_type.startswith("mallows"):  # the reference's token entropies, the same way
                    logp = torch.log_softmax(ref_logits.float(), dim=-1)
                    kwargs["ref_chosen_entropy"], kwargs["ref_rejected_entropy"] = (
                        (-(logp.exp() * logp).sum(-1) * valid).sum(-1).chunk(2)
                    )
                    del logp
            counts = valid.sum(-1).chunk(2)
            out = preference_loss(
                *trl_way_logps(x, labels).chunk(2),
                *ref.chunk(2),
                chosen_num_tokens=counts[0],
                rejected_num_tokens=counts[1],
                vocab_size=logits.shape[-1],
                **kwargs,
            )
        else:
            out = fused_preference_loss(x, labels, ref_logits=ref_logits, backend=contender, **kwargs)
        (grad,) = torch.autograd.grad(out.loss, x)
        return out, grad

    times = []
    for i in range(repeats + 2):
        x = leaf * 1  # a non-leaf, like a model's output: the in-place backward may reuse it
        if logits.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if i == repeats + 1:  # the last run measures memory (the profiler slows it down)
            (out, grad), peak = peak_memory(lambda x=x: step(x), logits.device)
        else:
            out, grad = step(x)
            if logits.device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first run warms up
                times.append(time.perf_counter() - start)
    return out, grad, 1e3 * statistics.median(times) if times else float("nan"), peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loss-types", nargs="+", default=list(LOSS_TYPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument(
        "--include-interpreted", action="store_true", help="also run triton under its (slow) CPU interpreter"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    logits, ref_logits, labels = make_batch(args.pairs, args.seq_len, args.vocab, dtype, device)
    contenders = ["reference"] + [b for b in available_backends(device) if b != "reference"]
    if device.type == "cpu" and "triton" in contenders and not args.include_interpreted:
        contenders.remove("triton")
        print("skipped: triton (on a CPU it runs only under the slow interpreter; pass --include-interpreted)")
    contenders.append("trl-way")
    size_mb = logits.numel() * logits.element_size() / 2**20
    print(
        f"pyfastpo demo: {args.pairs} pairs x {args.seq_len} tokens x V={args.vocab}, {args.dtype} on {device} "
        f"(logits {size_mb:.0f} MiB, {int((labels != IGNORE).sum())} of {labels.numel()} tokens scored)"
    )
    print(f"contenders: {', '.join(contenders)}  (trl-way = float32 log_softmax + gather, what trainers run today)\n")
    header = (
        f"| {'loss_type':<13} | {'contender':<9} | {'loss':>10} | {'rew/chosen':>10} | {'rew/rejected':>12} "
        f"| {'dloss vs ref':>14} | {'dgrad vs ref':>14} | {'fwd+bwd ms':>10} | {'peak MiB':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    worst = 0.0
    for loss_type in args.loss_types:
        ref_out = ref_grad = None
        for contender in contenders:
            out, grad, ms, peak = run_one(contender, logits, ref_logits, labels, loss_type, args.repeats)
            if contender == "reference":
                ref_out, ref_grad = out, grad
            dloss = abs(out.loss.item() - ref_out.loss.item())
            dgrad = (grad.float() - ref_grad.float()).abs().max().item()
            worst = max(worst, dgrad)
            print(
                f"| {loss_type:<13} | {contender:<9} | {out.loss.item():>10.5f} | "
                f"{out.metrics['rewards/chosen'].item():>10.4f} | {out.metrics['rewards/rejected'].item():>12.4f} | "
                f"{dloss:>14.2e} | {dgrad:>14.2e} | {ms:>10.1f} | {peak / 2**20:>8.1f} |"
            )
    print(f"\nlargest gradient difference to reference: {worst:.2e}")


if __name__ == "__main__":
    main()
