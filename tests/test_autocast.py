"""Mixed precision: under torch.autocast (what ``Trainer(bf16=True)`` does) pyfastpo's
gradients are as accurate as torch's own path under the same autocast, on the logits
path and on the fused linear path, whose backward recomputes the logits and must do so
in the forward's dtype (before the fix it recomputed them in float32 against a bf16
forward's statistics: 10x torch's gradient error)."""

from __future__ import annotations

import pytest
import torch

import pyfastpo

N, T, H, V = 4, 8, 64, 512


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 2.5  # logits of scale ~20
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, :2] = -100  # a prompt
    return hidden, weight, bias, labels


def _torch_path(h, w, b, labels):
    logits = torch.nn.functional.linear(h, w, b)
    lsm = torch.log_softmax(logits, -1)  # autocast runs log_softmax in float32
    valid = labels != -100
    return (lsm.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * valid).sum(1)


PATHS = {
    "torch": _torch_path,
    "logits": lambda h, w, b, y: pyfastpo.sequence_logps(torch.nn.functional.linear(h, w, b), y).logps,
    "linear": lambda h, w, b, y: pyfastpo.linear_sequence_logps(h, w, y, bias=b).logps,
    "linear-chunked": lambda h, w, b, y: pyfastpo.linear_sequence_logps(h, w, y, bias=b, chunk_tokens=5).logps,
}


def _run(path, dtype):
    hidden, weight, bias, labels = _inputs()
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logps = PATHS[path](*leaves, labels)
    (logps.float() * torch.arange(1.0, N + 1)).sum().backward()
    return [logps.detach()] + [x.grad for x in leaves]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["logits", "linear", "linear-chunked"])
def test_gradient_error_under_autocast_at_most_torchs(path, dtype):
    truth = _run("torch", None)  # float32, no autocast
    torch_err = [_rel(x, t) for x, t in zip(_run("torch", dtype), truth)]
    ours_err = [_rel(x, t) for x, t in zip(_run(path, dtype), truth)]
    for name, ours, theirs in zip(("logps", "grad_hidden", "grad_weight", "grad_bias"), ours_err, torch_err):
        assert ours <= 1.1 * theirs + 1e-6, (name, ours, theirs)


def test_linear_projection_follows_autocast():
    from pyfastpo.linear import projection_dtype

    assert projection_dtype("cpu", torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert projection_dtype("cpu", torch.float32) == torch.bfloat16
        assert projection_dtype("cpu", torch.float64) == torch.float64
