"""Every backend of sequence_logps against a float64 log_softmax oracle, forward and backward."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    EXPECTED_BACKENDS,
    IGNORE,
    backend_device_pairs,
    grad_tolerances,
    make_labels,
    make_logits,
    oracle,
    run,
    tolerances,
)

import pyfastpo

BACKENDS = backend_device_pairs()
SHAPES = [(2, 3, 1), (2, 5, 33), (4, 3, 4099), (2, 6, 300)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "shifted", "padded", "batch_stride"]
IGNORES = ["none", "random", "all_ignored_row"]

# Every shape with every dtype (layout and ignore pattern rotating), and every layout
# with every ignore pattern at one shape: broad coverage at a size the Triton
# interpreter finishes quickly.
CASES = [
    (shape, dtype, LAYOUTS[i % 4], IGNORES[i % 3]) for i, (shape, dtype) in enumerate(itertools.product(SHAPES, DTYPES))
] + [((3, 4, 257), torch.float32, layout, ign) for layout, ign in itertools.product(LAYOUTS, IGNORES)]


def check_against_oracle(backend, device, shape, dtype, layout, ignore, scale=3.0, inplace=True):
    n, t, v = shape
    logits = make_logits(n, t, v, dtype, layout, scale=scale, device=device)
    labels = make_labels(n, t, v, ignore, device=device)
    g = torch.randn(n, dtype=torch.float64).to(device) + 0.5
    out, grad = run(logits, labels, backend, grad_scale=g, inplace=inplace)
    ref = oracle(logits, labels, g)
    tol = tolerances(dtype, scale, t)
    assert out.logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out.num_tokens.cpu(), ref["num_tokens"].cpu())
    for key in ("logps", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(out, key).double(), ref[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref["grad"], **grad_tolerances(dtype))
    if ignore == "all_ignored_row":
        assert out.logps[0].item() == 0.0 and out.entropy[0].item() == 0.0
        assert not grad[0].any()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,dtype,layout,ignore", CASES, ids=str)
def test_matches_oracle(backend, device, shape, dtype, layout, ignore):
    check_against_oracle(backend, device, shape, dtype, layout, ignore)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite(backend, device, dtype):
    check_against_oracle(backend, device, (2, 4, 129), dtype, "contiguous", "random", scale=1e4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_place_backward_matches(backend, device):
    check_against_oracle(backend, device, (2, 4, 65), torch.float32, "shifted", "random", inplace=False)


def test_reference_float64():
    check_against_oracle("reference", "cpu", (3, 5, 77), torch.float64, "shifted", "all_ignored_row")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    logits = make_logits(4, 6, 513, device=device)
    labels = make_labels(4, 6, 513, device=device)
    kw = dict(backend=backend, return_entropy=True, return_log_sum_sq=True)
    a = pyfastpo.sequence_logps(logits, labels, **kw)
    b = pyfastpo.sequence_logps(logits, labels, **kw)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inplace_backward_bumps_version_so_other_users_fail(backend, device):
    leaf = make_logits(2, 3, 40, device=device).requires_grad_()
    logits = leaf * 1
    other = (logits**2).sum()  # saves `logits` for its own backward, runs after ours
    out = pyfastpo.sequence_logps(logits, make_labels(2, 3, 40, device=device), backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.logps.sum() + other).backward()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inplace_backward_twice_fails_loudly(backend, device):
    logits = make_logits(2, 3, 40, device=device).requires_grad_() * 1
    out = pyfastpo.sequence_logps(logits, make_labels(2, 3, 40, device=device), backend=backend)
    out.logps.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.logps.sum().backward()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_leaf_logits_are_never_overwritten(backend, device):
    leaf = make_logits(2, 3, 40, device=device).requires_grad_()
    before = leaf.detach().clone()
    out = pyfastpo.sequence_logps(leaf, make_labels(2, 3, 40, device=device), backend=backend)
    out.logps.sum().backward()
    assert torch.equal(leaf.detach(), before)
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_entropy_only_on_request():
    logits, labels = make_logits(2, 3, 10), make_labels(2, 3, 10)
    assert pyfastpo.sequence_logps(logits, labels).entropy is None
    assert pyfastpo.sequence_logps(logits, labels, return_entropy=True).entropy is not None


def test_ignore_index_is_configurable():
    logits, labels = make_logits(2, 4, 10), make_labels(2, 4, 10)
    custom = torch.where(labels == IGNORE, torch.full_like(labels, -1), labels)
    a = pyfastpo.sequence_logps(logits, labels)
    b = pyfastpo.sequence_logps(logits, custom, ignore_index=-1)
    assert torch.equal(a.logps, b.logps)


def test_expected_backends_are_installed():
    """The CI build must have every backend of this device: a missing one is a failure."""
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        assert set(EXPECTED_BACKENDS[device]) <= set(pyfastpo.available_backends(device))


def test_auto_picks_a_compiled_backend_on_cpu():
    from pyfastpo.backends import get_backend

    assert get_backend("auto", torch.device("cpu"), torch.float32).name == "cpp"
    assert get_backend("auto", torch.device("cpu"), torch.float64).name == "reference"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_leaf_logits_are_never_overwritten_through_a_view(backend, device):
    leaf = make_logits(2, 4, 40, device=device).requires_grad_()
    before = leaf.detach().clone()
    out = pyfastpo.sequence_logps(leaf[:, :-1], make_labels(2, 3, 40, device=device), backend=backend)
    out.logps.sum().backward()
    assert torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_overlapping_logits_get_the_right_gradient(backend, device):
    """An expanded tensor's rows share memory: writing the gradient in place would
    clobber logits another row still has to read, so the backward must not."""
    w = make_logits(1, 3, 33, device=device).requires_grad_()
    labels = make_labels(4, 3, 33, ignore="none", device=device)
    pyfastpo.sequence_logps((w * 1).expand(4, 3, 33), labels, backend=backend).logps.sum().backward()
    want = oracle(w.expand(4, 3, 33), labels, torch.ones(4, dtype=torch.float64, device=device))["grad"].sum(0)
    torch.testing.assert_close(w.grad[0].double(), want, **grad_tolerances(torch.float32))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignore_index_inside_the_vocabulary(backend, device):
    """ignore_index may be a real token id (e.g. 0): such labels are skipped, not scored."""
    logits, labels = make_logits(2, 5, 20, device=device), make_labels(2, 5, 20, ignore="none", device=device)
    labels[0, :2] = 0
    out = pyfastpo.sequence_logps(logits, labels, ignore_index=0, backend=backend)
    ref = oracle(logits, labels, ignore_index=0)
    torch.testing.assert_close(out.logps.double(), ref["logps"], **tolerances(torch.float32, 3.0, 5))
    assert torch.equal(out.num_tokens.cpu(), (labels != 0).sum(1).cpu())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_logit_is_never_silently_skipped(backend, device):
    logits, labels = make_logits(2, 3, 40, device=device), make_labels(2, 3, 40, ignore="none", device=device)
    logits[0, 1, 7] = float("nan")
    out = pyfastpo.sequence_logps(logits, labels, backend=backend, return_entropy=True)
    assert torch.isnan(out.logps[0]) and torch.isnan(out.entropy[0])
    assert torch.isfinite(out.logps[1]) and torch.isfinite(out.entropy[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_double_backward_raises(backend, device):
    logits = make_logits(2, 3, 10, device=device).requires_grad_()
    out = pyfastpo.sequence_logps(logits, make_labels(2, 3, 10, device=device), backend=backend)
    (grad,) = torch.autograd.grad(out.logps.sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()
