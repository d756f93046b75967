"""Property-based checks: random shapes, layouts and ignore patterns, the compiled CPU backend
and the Triton kernels (interpreter) against the float64 oracle, in place and not; and loss
identities that hold for any inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import EXPECTED_BACKENDS, IGNORE, grad_tolerances, make_logits, oracle, run, tolerances
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpo
from pyfastpo.losses.options import USED_BY


@pytest.mark.parametrize("backend", EXPECTED_BACKENDS["cpu"])
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    t=st.integers(1, 6),
    v=st.integers(1, 700),
    layout=st.sampled_from(["contiguous", "shifted", "padded", "batch_stride"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    ignore_p=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
    inplace=st.booleans(),
)
def test_backend_matches_oracle(backend, n, t, v, layout, dtype, ignore_p, scale, seed, inplace):
    logits = make_logits(n, t, v, dtype, layout, scale=scale, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[torch.rand(n, t, generator=g) < ignore_p] = IGNORE
    grad_scale = torch.randn(n, generator=g, dtype=torch.float64)
    out, grad = run(logits, labels, backend, grad_scale=grad_scale, inplace=inplace)
    ref = oracle(logits, labels, grad_scale)
    tol = tolerances(dtype, scale, t)
    torch.testing.assert_close(out.logps.double(), ref["logps"], **tol)
    torch.testing.assert_close(out.entropy.double(), ref["entropy"], **tol)
    torch.testing.assert_close(grad.double(), ref["grad"], **grad_tolerances(dtype))


@settings(max_examples=50, deadline=None)
@given(
    margin=st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=8),
    beta=st.floats(0.01, 5.0),
)
def test_sigmoid_family_identities(margin, beta):
    """With a zero reference: DPO equals robust at label_smoothing 0, FocalPO at gamma 0,
    and MallowsPO-theta with dispersion e^-1 (weight 1); every loss is finite."""
    c = torch.tensor(margin, dtype=torch.float64)
    r = torch.zeros_like(c)
    dpo = pyfastpo.preference_loss(c, r, beta=beta).losses
    for kw in (
        dict(loss_type="robust"),
        dict(loss_type="focalpo", focal_gamma=0.0),
        dict(loss_type="mallows_dpo", dispersion=torch.full_like(c, torch.e**-1)),
    ):
        torch.testing.assert_close(pyfastpo.preference_loss(c, r, beta=beta, **kw).losses, dpo)
    counts = torch.full_like(c, 3)
    for loss_type in pyfastpo.LOSS_TYPES:
        kw = dict(chosen_num_tokens=counts, rejected_num_tokens=counts)
        if loss_type in USED_BY["label_smoothing"]:
            kw["label_smoothing"] = 0.1
        if loss_type.startswith("mallows"):
            kw["dispersion"] = torch.full_like(c, 0.5)
        out = pyfastpo.preference_loss(c, r, beta=beta, loss_type=loss_type, **kw)
        assert torch.isfinite(out.losses).all(), loss_type
