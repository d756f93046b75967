"""A small case for compute-sanitizer's memcheck (benchmarks/gpu_check.sh): the CUDA and Triton
kernels on every layout that takes a different path through them, forward and in-place backward.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/memcheck_case.py

Layouts: an odd vocabulary (a scalar tail), a view one element in (a misaligned row start,
so the peeled lead), a strided slice, ignored labels, a row with a -inf logit, a row of only
-inf (the forward's exact pass), bf16 and float32. Without a GPU it does nothing and says so.
"""

from __future__ import annotations

import sys

import torch


def cases(device: str):
    """``(name, logits, labels)`` covering the kernels' paths."""
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(3, 5, 1 + 50257, device=device, dtype=dtype, generator=gen)
        views = {"odd V": base[..., :50257], "misaligned": base[..., 1:], "strided": base[:, ::2, :4099]}
        for name, x in views.items():
            x = x.clone() if name == "strided" else x
            y = torch.randint(0, x.shape[-1], x.shape[:2], device=device, generator=gen)
            y[0, 0] = -100
            if name == "odd V":
                x = x.clone()
                x[1, 1, 7] = float("-inf")  # a masked entry: the fast pass
                x[2, 0] = float("-inf")  # only -inf: an undefined row, the exact pass
            yield f"{name} {dtype}", x, y


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    from pyfastpo.backends import available_backends, get_backend

    for backend in [b for b in ("cuda", "triton") if b in available_backends("cuda")]:
        for name, x, y in cases("cuda"):
            impl = get_backend(backend, x.device, x.dtype)
            stats = impl.forward(x, y, -100)
            g = torch.ones(x.shape[0], device=x.device)
            # In place, on the view itself: the backward then reads and writes the misaligned rows.
            impl.backward(x, y, stats.row_max.contiguous(), stats.log_sum.contiguous(), g, -100, x)
            torch.cuda.synchronize()
            print(f"{backend}: {name}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
