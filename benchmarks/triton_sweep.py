"""BLOCK_V x num_warps sweep of the Triton kernels at one size: forward + in-place backward.

For each configuration: median time of the forward, of the backward, and the achieved
bandwidth of both together as a fraction of the measured copy bandwidth over the floor of
3 x logits bytes (read in the forward, read and written in the backward). The default
configuration (``kernels/config.py``) is marked; the fastest is listed last. Every
configuration's statistics are checked against the default's (they must agree).

    python benchmarks/triton_sweep.py --size 16x2048x128256 --dtype bfloat16 --out sweep.md

On a machine without a GPU it runs under Triton's interpreter (``--device cpu``, tiny
sizes only): that checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from pyfastpo.kernels.config import launch_config  # noqa: E402
from pyfastpo.kernels.logps_backward import logps_backward  # noqa: E402
from pyfastpo.kernels.logps_forward import logps_forward  # noqa: E402

IGNORE = -100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="16x2048x128256", help="NxTxV")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--blocks", default="1024,2048,4096,8192", help="BLOCK_V values (powers of two)")
    p.add_argument("--warps", default="4,8,16", help="num_warps values")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    try:
        args.n, args.t, args.v = (int(x) for x in args.size.lower().split("x"))
        args.block_list = [int(b) for b in args.blocks.split(",")]
        args.warp_list = [int(w) for w in args.warps.split(",")]
    except ValueError:
        p.error(f"--size NxTxV and comma-separated integers for --blocks/--warps, got {args.size!r}")
    return args


def _timer(device: str):
    """A function that runs ``fn`` and returns its wall time in seconds (CUDA events on a GPU)."""
    if device == "cuda":

        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    def run_cpu(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run_cpu


def copy_bandwidth(x: torch.Tensor, timer, repeats: int) -> float:
    """Bytes per second of a device-to-device copy of ``x`` (read + write)."""
    y = torch.empty_like(x)
    times = [timer(lambda: y.copy_(x)) for _ in range(repeats)]
    return 2 * x.numel() * x.element_size() / statistics.median(times)


def time_config(logits, labels, grad_scale, block: int, warps: int, timer, repeats: int) -> tuple:
    """``(forward s, backward s, forward stats)``: medians over ``repeats`` after one compiling run;
    each run's backward writes in place into a fresh copy of the logits."""
    fwd, bwd = [], []
    for _ in range(repeats + 1):
        x = logits.clone()
        stats = []
        fwd.append(timer(lambda: stats.append(logps_forward(x, labels, IGNORE, block, warps))))  # noqa: B023
        m, ls = stats[0][1], stats[0][2]
        bwd.append(timer(lambda: logps_backward(x, labels, m, ls, grad_scale, IGNORE, x, block, warps)))  # noqa: B023
    return statistics.median(fwd[1:]), statistics.median(bwd[1:]), stats[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=args.device).manual_seed(0)
    logits = torch.randn(args.n, args.t, args.v, device=args.device, dtype=dtype, generator=gen)
    labels = torch.randint(0, args.v, (args.n, args.t), device=args.device, generator=gen)
    labels[:, : args.t // 4] = IGNORE  # a quarter of each row prompt
    grad_scale = torch.ones(args.n, device=args.device)
    timer = _timer(args.device)
    copy_bw = copy_bandwidth(logits, timer, args.repeats)
    floor_bytes = 3 * logits.numel() * logits.element_size()
    default = launch_config(args.v, dtype)
    want = logps_forward(logits, labels, IGNORE)

    rows = []
    for block in args.block_list:
        for warps in args.warp_list:
            f, b, stats = time_config(logits, labels, grad_scale, block, warps, timer, args.repeats)
            for got, ref in zip(stats, want):
                # Another block shape sums a row in another order: float32 rounding that scales
                # with the statistic's size (sum_logits over 128k logits reaches the hundreds).
                atol = 1e-5 * max(1.0, ref.nan_to_num().abs().max().item())
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol, equal_nan=True)
            rows.append((block, warps, f, b, floor_bytes / (f + b) / copy_bw))

    lines = [
        f"Triton kernels, {args.n}x{args.t}x{args.v} {args.dtype} on {args.device}, median of {args.repeats}; "
        f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; default configuration {default} marked *",
        "",
        "| BLOCK_V | warps | forward ms | backward ms | fraction of copy bandwidth |",
        "|---|---|---|---|---|",
    ]
    for block, warps, f, b, frac in rows:
        mark = " *" if (block, warps) == default else ""
        lines.append(f"| {block}{mark} | {warps} | {f * 1e3:.3f} | {b * 1e3:.3f} | {frac:.2f} |")
    best = min(rows, key=lambda r: r[2] + r[3])
    lines += ["", f"fastest: BLOCK_V={best[0]}, num_warps={best[1]} ({(best[2] + best[3]) * 1e3:.3f} ms fwd+bwd)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
