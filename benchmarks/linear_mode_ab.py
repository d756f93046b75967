"""The fused linear path's two modes and Liger-Kernel, timed A/B/C interleaved (one run of
each in turn, so that a load change on a shared machine hits all three alike). The bench's
sweep runs contenders one after the other, and two contenders running the same code there
measured up to 29% apart on this 2-core machine.

    python benchmarks/linear_mode_ab.py --sizes 2x1024x32000x128 --prompt 0 --budget-mib 1024

Prints, per size, the median forward+backward time of ``linear_preference_loss`` in its
automatic mode (and which mode ran), with ``single_pass=False``, and of Liger-Kernel's
``LigerFusedLinearDPOLoss`` (the bench's contenders: sigmoid DPO, no reference)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyfastpo
from pyfastpo.bench import contenders
from pyfastpo.bench.data import make_labels


def timed(op, hidden, weight, labels) -> float:
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    start = time.perf_counter()
    loss = op(h, w, labels)[0]
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2x1024x32000x128")
    p.add_argument("--prompt", type=float, default=0.0, help="prompt fraction of each row")
    p.add_argument("--budget-mib", type=int, default=None, help="pyfastpo's chunk budget (default: its own)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cpu")
    budget = None if args.budget_mib is None else args.budget_mib << 20
    options = contenders.Options(frozenset({"liger"}), memory_budget_bytes=budget)
    auto = contenders._pyfastpo_linear("cpp")(device, torch.float32, options)[0]
    two = contenders._pyfastpo_linear("cpp", single_pass=False)(device, torch.float32, options)[0]
    liger = contenders._build_liger(device, torch.float32, options)[0]
    for size in args.sizes.split(","):
        n, t, v, h = map(int, size.split("x"))
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, t, h, generator=g)
        weight = torch.randn(v, h, generator=g) / h**0.5
        labels = make_labels(n, t, v, g, prompt_fraction=args.prompt)
        mode = pyfastpo.linear_preference_loss(
            hidden.requires_grad_(), weight, labels, backend="cpp", memory_budget_bytes=budget
        ).mode
        times = {"auto": [], "two-pass": [], "liger": []}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, op in (("auto", auto), ("two-pass", two), ("liger", liger)):
                times[name].append(timed(op, hidden, weight, labels))
        med = {k: statistics.median(x[1:]) * 1e3 for k, x in times.items()}
        print(
            f"{size} prompt {args.prompt:g}: auto ({mode.split(':')[0]}) {med['auto']:.0f} ms, "
            f"two-pass {med['two-pass']:.0f} ms, liger {med['liger']:.0f} ms; "
            f"liger / auto {med['liger'] / med['auto']:.2f}x, two-pass / auto {med['two-pass'] / med['auto']:.2f}x"
        )


if __name__ == "__main__":
    main()
