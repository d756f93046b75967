"""Where the linear path's backward time goes on a GPU: the float32 weight-gradient
accumulation per token chunk, against the chunk size.

Per chunk of C valid tokens the backward adds ``grad_logits[C, V]^T @ h[C, H]`` into a
float32 [V, H] accumulator. Done as ``acc.add_(gl.t() @ h)`` that is a 16-bit [V, H]
product plus a read-modify-write of the float32 accumulator: at C = a few hundred tokens
the traffic, not the GEMM, sets the time. This times (a) that, (b) cuBLAS accumulating
into the float32 output itself (``addmm(..., out_dtype=float32)``, where torch has it),
at several C, and (c) the whole ``linear_preference_loss`` fwd+bwd at several
``memory_budget_bytes``.

    python benchmarks/linear_chunk_probe.py --out out/probe.md   (CUDA only)
"""

from __future__ import annotations

import argparse

import torch

import pyfastpo


def _ms(fn, repeats=5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=5084, help="valid tokens in all")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    v, h_dim, tokens = a.vocab, a.hidden, a.tokens
    lines = [f"# linear chunk probe: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    lines += ["| what | chunk tokens | chunks | ms |", "|---|---|---|---|"]
    acc = torch.zeros(v, h_dim, dtype=torch.float32, device=dev)
    for c in (348, 1392, 5084):
        gl = torch.randn(c, v, device=dev, dtype=dt)
        h = torch.randn(c, h_dim, device=dev, dtype=dt)
        chunks = -(-tokens // c)
        t = _ms(lambda gl=gl, h=h, acc=acc: acc.add_(gl.t() @ h))
        lines.append(f"| add_(16-bit GEMM) | {c} | {chunks} | {t * chunks:.2f} |")
        try:
            t = _ms(lambda gl=gl, h=h, acc=acc: torch.addmm(acc, gl.t(), h, out_dtype=torch.float32, out=acc))
            lines.append(f"| addmm(out_dtype=float32, out=acc) | {c} | {chunks} | {t * chunks:.2f} |")
        except Exception as err:  # noqa: BLE001 - report what this torch lacks
            lines.append(f"| addmm(out_dtype=float32, out=acc) | {c} | - | {type(err).__name__}: {str(err)[:80]} |")
        del gl, h
    del acc
    n, t_len = 8, 1024
    hidden = (torch.randn(n, t_len, h_dim, device=dev, dtype=dt)).requires_grad_()
    weight = (torch.randn(v, h_dim, device=dev, dtype=dt) * 2 / h_dim**0.5).requires_grad_()
    labels = torch.randint(0, v, (n, t_len), device=dev)
    labels[:, : t_len // 4] = -100
    lines += ["", "| linear_preference_loss fwd+bwd (triton) | memory_budget_bytes | peak MiB | ms |"]
    lines += ["|---|---|---|---|"]
    for budget in (256 << 20, 1 << 30, 4 << 30):

        def step(budget=budget):
            out = pyfastpo.linear_preference_loss(hidden, weight, labels, backend="triton", memory_budget_bytes=budget)
            torch.autograd.grad(out.loss, (hidden, weight))

        t = _ms(step)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        lines.append(f"| 8x1024x{v}x{h_dim} | {budget >> 20} MiB | {peak:.0f} | {t:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
