"""CPU benchmark of sequence_logps: ``cpp`` vs ``reference`` vs the naive PyTorch path.

The naive path is what users run today::

    logp = log_softmax(logits.float(), -1).gather(-1, labels).squeeze(-1)
    logps = (logp * mask).sum(-1)

Each method runs forward + backward (gradient to the logits) on float32 logits
``[N, T, V]`` with a quarter of the tokens ignored. The logits are a fresh
non-leaf tensor each repeat (as they are in training, coming out of the
lm_head), so pyfastpo's in-place backward applies; their creation is outside
the timed and measured region, and the gradient is taken w.r.t. them with
``torch.autograd.grad`` (what the lm_head's backward would receive).

Time: median wall time of forward+backward over ``--repeats`` after
``--warmup`` runs. Extra peak memory: the torch profiler's CPU memory events
(``profile_memory=True``), every allocation (+) and free (-) that torch's CPU
allocator made inside the region, summed in time order; the peak of the running
sum is the extra memory over what existed before the region (the logits).
Memory that C++ code allocates outside torch's allocator is not seen by this
method; pyfastpo's C++ kernels allocate none (their buffers are on the stack).

Usage: python benchmarks/bench_cpu.py [--n 8 --t 256 --v 32000 --repeats 10]
Writes benchmarks/results/cpu_<date>.md (with --out to change the path).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

import pyfastpo

IGNORE = -100


def naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The usual PyTorch per-sequence log-probability: ``[N]`` float32."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


METHODS = {
    "naive PyTorch": naive_logps,
    "pyfastpo reference": lambda x, y: pyfastpo.sequence_logps(x, y, backend="reference").logps,
    "pyfastpo cpp": lambda x, y: pyfastpo.sequence_logps(x, y, backend="cpp").logps,
}


def step(fn, leaf: torch.Tensor, labels: torch.Tensor, profiled: bool = False):
    """One forward + backward of ``fn``: ``(seconds, grad wrt logits, profiler or None)``.

    The gradient is taken with ``torch.autograd.grad`` w.r.t. the non-leaf logits,
    as an lm_head backward would consume it (no leaf ``.grad`` accumulation copy).
    """
    logits = leaf.clone()  # non-leaf logits, made outside the region
    ctx = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiled else nullcontext()
    with ctx as prof:
        t0 = time.perf_counter()
        loss = fn(logits, labels).sum()
        (grad,) = torch.autograd.grad(loss, logits)
        elapsed = time.perf_counter() - t0
    return elapsed, grad, prof


def peak_extra_bytes(fn, leaf: torch.Tensor, labels: torch.Tensor) -> int:
    """Peak of the running sum of torch CPU allocations (+) and frees (-) during one step."""
    _, _, prof = step(fn, leaf, labels, profiled=True)
    # The allocator's own "[memory]" records (+bytes on allocation, -bytes on
    # free), not the op-level aggregates, which also carry their children's usage.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="sequences")
    parser.add_argument("--t", type=int, default=256, help="positions")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary")
    parser.add_argument("--ignored", type=float, default=0.25, help="fraction of ignored tokens")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="markdown output path")
    args = parser.parse_args()

    torch.manual_seed(0)
    n, t, v = args.n, args.t, args.v
    leaf = torch.randn(n, t, v, requires_grad=True)  # logits = leaf.clone() each step
    labels = torch.randint(0, v, (n, t))
    labels[:, : int(t * args.ignored)] = IGNORE  # the prompt part of each row
    logits_mb = leaf.numel() * 4 / 2**20

    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    grads = {}
    for name, fn in METHODS.items():
        for _ in range(args.warmup):
            step(fn, leaf, labels)
        times = [step(fn, leaf, labels)[0] for _ in range(args.repeats)]
        grads[name] = step(fn, leaf, labels)[1].clone()
        peak = peak_extra_bytes(fn, leaf, labels)
        rows.append((name, statistics.median(times), peak))
        print(f"{name}: {statistics.median(times) * 1e3:.1f} ms, +{peak / 2**20:.0f} MiB", file=sys.stderr)
    for name in METHODS:  # every method must compute the same gradient
        torch.testing.assert_close(grads[name], grads["naive PyTorch"], rtol=1e-4, atol=1e-6)

    load_after = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    base_time, base_mem = rows[0][1], rows[0][2]
    date = datetime.date.today().isoformat()
    lines = [
        f"# CPU benchmark: sequence_logps forward + backward ({date})",
        "",
        f"- machine: {machine()}; load average before the run {load_before}, after {load_after} "
        "(other processes on the machine inflate the times)",
        f"- commit: {git_commit()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- shape: N={n}, T={t}, V={v}, float32 (logits {logits_mb:.0f} MiB), "
        f"{args.ignored:.0%} of tokens ignored; median of {args.repeats} after {args.warmup} warm-up; "
        f"pyfastpo._C ISA: {pyfastpo._C.isa()}",
        "- extra peak memory: torch profiler CPU memory events (allocations - frees, in time order), "
        "over the logits that exist before the step; it includes the returned gradient "
        "(logits-sized unless written into the logits' storage, as pyfastpo does by default)",
        "",
        "| method | fwd+bwd median (ms) | speed-up vs naive | extra peak memory (MiB) | vs naive |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, sec, peak in rows:
        lines.append(
            f"| {name} | {sec * 1e3:.1f} | {base_time / sec:.2f}x | {peak / 2**20:.2f} | "
            f"{peak / base_mem:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"cpu_{date}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(table)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
