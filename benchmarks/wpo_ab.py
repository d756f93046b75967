"""WPO's extra cost on the CPU logits path, timed A/B interleaved (plain, then with
``log sum p^2``, alternately, so that a load change on a shared machine hits both alike).

    python benchmarks/wpo_ab.py --sizes 4x256x32000,4x128x128256 --rounds 30

Prints, per size, the median forward and forward+backward times of ``sequence_logps``
(``backend="cpp"``, float32, a quarter prompt) with and without ``return_log_sum_sq``."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyfastpo
from pyfastpo.bench.data import make_labels


def one(leaf, labels, wpo: bool, backward: bool) -> float:
    """Seconds of one forward (and backward: the gradient written in place into the
    non-leaf logits, as in training), the logits' copy made before the clock starts."""
    x = leaf * 1 if backward else leaf.detach()
    start = time.perf_counter()
    out = pyfastpo.sequence_logps(x, labels, backend="cpp", return_log_sum_sq=wpo)
    if backward:
        torch.autograd.grad(out.logps.sum(), x)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4x256x32000,4x128x128256")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    for size in args.sizes.split(","):
        n, t, v = map(int, size.split("x"))
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(n, t, v, generator=g) * 2).requires_grad_()
        labels = make_labels(n, t, v, g, prompt_fraction=0.25)
        for backward in (False, True):
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for wpo in (False, True):
                    times[wpo].append(one(logits, labels, wpo, backward))
            plain, wpo = statistics.median(times[False]), statistics.median(times[True])
            what = "fwd+bwd" if backward else "fwd"
            print(f"{size} {what}: plain {plain * 1e3:.2f} ms, with WPO {wpo * 1e3:.2f} ms, ratio {wpo / plain:.3f}")


if __name__ == "__main__":
    main()
