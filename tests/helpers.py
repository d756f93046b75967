"""Shared test helpers: an independent float64 oracle and random inputs."""

from __future__ import annotations

import os

import torch

import pyfastpo

IGNORE = -100

# Backends every install must have on each device (a missing one fails, never skips).
# Triton runs on CPU tensors only under its interpreter, which tests/conftest.py turns
# on when there is no GPU; with a GPU it is tested on CUDA tensors instead.
EXPECTED_BACKENDS = {
    "cpu": ["reference", "cpp"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []),
    "cuda": ["reference", "triton", "cuda"],
}


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs() -> list[tuple[str, str]]:
    return [(b, d) for d in devices() for b in EXPECTED_BACKENDS[d]]


def oracle(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor | None = None, ignore_index=IGNORE):
    """Float64 log_softmax oracle: per-sequence logps, entropy, mean_logits, counts, and
    the gradient ``g[n] * (onehot - softmax)`` when ``grad_scale`` [N] is given."""
    x = logits.detach().double()
    v = x.shape[-1]
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lsm = torch.log_softmax(x, dim=-1)
    p = lsm.exp()
    tok = lsm.gather(-1, safe[..., None]).squeeze(-1) * valid
    ent = -(p * lsm).sum(-1) * valid
    sumx = x.sum(-1) * valid
    n = valid.sum(1)
    out = {
        "logps": tok.sum(1),
        "entropy": ent.sum(1),
        "num_tokens": n,
        "mean_logits": sumx.sum(1) / (n * v).clamp_min(1),
    }
    if grad_scale is not None:
        onehot = torch.nn.functional.one_hot(safe, v).double()
        out["grad"] = grad_scale.double()[:, None, None] * (onehot - p) * valid[..., None]
    return out


def make_logits(n, t, v, dtype=torch.float32, layout="contiguous", scale=3.0, device="cpu", seed=0):
    """Random ``[n, t, v]`` logits (never zeros) in one of several memory layouts, all with
    unit last stride: contiguous, a shifted view ``base[:, :-1]``, rows padded past V, every
    other batch row."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return rand(n, t, v)
    if layout == "shifted":
        return rand(n, t + 1, v)[:, :-1]
    if layout == "padded":
        return rand(n, t, v + 5)[..., :v]
    if layout == "batch_stride":
        return rand(2 * n, t, v)[::2]
    raise ValueError(layout)


def make_labels(n, t, v, ignore="random", device="cpu", seed=1):
    """Random labels in [0, v) with ignored tokens: none, ~30% at random, or random plus
    an all-ignored row 0 (prompt-only / padding-only sequence)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n, t), generator=g)
    if ignore in ("random", "all_ignored_row"):
        labels[torch.rand(n, t, generator=g) < 0.3] = IGNORE
    if ignore == "all_ignored_row":
        labels[0] = IGNORE
    return labels.to(device)


def tolerances(dtype: torch.dtype, scale: float, t: int) -> dict:
    """Absolute/relative tolerances for per-sequence sums over t tokens."""
    if dtype == torch.float64:
        return dict(atol=1e-9 * scale * t, rtol=1e-9)
    return dict(atol=2e-5 * max(scale, 1.0) * t, rtol=1e-5)


def grad_tolerances(dtype: torch.dtype) -> dict:
    """Per-element gradient tolerances: the gradient is stored in the logits' dtype."""
    return {
        torch.float64: dict(atol=1e-12, rtol=1e-9),
        torch.float32: dict(atol=1e-6, rtol=1e-5),
        torch.float16: dict(atol=1e-3, rtol=1e-3),
        torch.bfloat16: dict(atol=8e-3, rtol=8e-3),
    }[dtype]


def run(logits, labels, backend, grad_scale=None, inplace=True, **kw):
    """sequence_logps on a non-leaf tensor with the same memory layout as ``logits``
    (so in-place backward is exercised on the real strides).

    Returns the outputs and the gradient w.r.t. ``logits`` (None without
    ``grad_scale``). Checks that the backward wrote nothing into the storage
    outside the view (and nothing at all when not in place).
    """
    base = logits._base if logits._base is not None else logits
    leaf = base.detach().clone().requires_grad_(grad_scale is not None)
    nonleaf = leaf * 1 if grad_scale is not None else leaf
    offset = logits.storage_offset() - base.storage_offset()
    x = nonleaf.as_strided(logits.shape, logits.stride(), nonleaf.storage_offset() + offset)
    out = pyfastpo.sequence_logps(x, labels, backend=backend, inplace_backward=inplace, return_entropy=True, **kw)
    if grad_scale is None:
        return out, None
    before = nonleaf.detach().clone()
    (out.logps * grad_scale.to(out.logps.dtype)).sum().backward()
    untouched = torch.ones_like(leaf, dtype=torch.bool)
    if inplace:
        untouched.as_strided(logits.shape, logits.stride(), offset).fill_(False)
    assert torch.equal(nonleaf.detach()[untouched], before[untouched]), "backward wrote outside the logits view"
    return out, leaf.grad.as_strided(logits.shape, logits.stride(), offset)
