"""Hardening (issue 10): second-order requests raise, undefined rows are NaN in every
backend, float32 precision matches torch's log_softmax at any logit offset, inputs the
kernels cannot read are refused, and every argument is checked before the first kernel."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import backend_device_pairs, make_labels, make_logits

import pyfastpo
from pyfastpo.backends import cpp_backend, get_backend, reference

BACKENDS = backend_device_pairs()
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------- second order


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_second_order_raises_and_first_order_is_right(backend, device, inplace):
    """The issue's reproduction: before the fix, the in-place backward handed autograd the
    logits tensor itself, and the second backward silently went through ``w * 1.0``."""
    w = make_logits(2, 3, 7, device=device).requires_grad_()
    y = make_labels(2, 3, 7, ignore="none", device=device)
    lp = pyfastpo.sequence_logps(w * 1.0, y, backend=backend, inplace_backward=inplace).logps.sum()
    (g,) = torch.autograd.grad(lp, w, create_graph=True)
    p = torch.softmax(w.detach().double(), -1)
    want = torch.nn.functional.one_hot(y, 7).double() - p
    torch.testing.assert_close(g.detach().double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (g**2).sum().backward()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_second_order_raises_however_it_is_requested(backend, device):
    """Hessian-vector products, ``hessian`` and gradients w.r.t. an upstream weight must
    raise too: a dummy error node not connected to the real inputs would be skipped by
    ``autograd.grad(..., inputs)`` and return a Hessian missing its second-order term."""
    x = make_logits(2, 3, 5, device=device).requires_grad_()
    y = make_labels(2, 3, 5, ignore="none", device=device)
    f = lambda z: pyfastpo.sequence_logps(z * 1.0, y, backend=backend).logps.sum()  # noqa: E731
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad((g * x).sum(), x)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.functional.hessian(f, x)
    h = torch.randn(2, 3, 4, device=device, requires_grad=True)
    w = torch.randn(5, 4, device=device, requires_grad=True)
    (gh,) = torch.autograd.grad(
        pyfastpo.sequence_logps(h @ w.t(), y, backend=backend).logps.sum(), h, create_graph=True
    )
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(gh.pow(2).sum(), w)


def test_second_order_raises_through_the_fused_and_linear_paths():
    logits = make_logits(4, 3, 9).requires_grad_()
    labels = make_labels(4, 3, 9, ignore="none")
    loss = pyfastpo.fused_preference_loss(logits * 1.0, labels, loss_type="sft").loss
    (g,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (g**2).sum().backward()
    hidden = torch.randn(4, 3, 5, requires_grad=True)
    weight = torch.randn(9, 5, requires_grad=True)
    loss = pyfastpo.linear_preference_loss(hidden, weight, labels, loss_type="sft").loss
    gh, gw = torch.autograd.grad(loss, (hidden, weight), create_graph=True)
    for grad in (gh, gw):
        with pytest.raises(RuntimeError, match="linear_sequence_logps is differentiable once"):
            (grad**2).sum().backward(retain_graph=True)
        for wrt in (hidden, weight):
            with pytest.raises(RuntimeError, match="linear_sequence_logps is differentiable once"):
                torch.autograd.grad((grad**2).sum(), wrt, retain_graph=True)


# ------------------------------------------------------------- undefined rows


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_undefined_rows_are_nan_forward_and_backward(backend, device, dtype):
    """A row with a NaN, a +inf, or only -inf logits has no softmax: logp, entropy and
    gradient are NaN in every backend (before the fix, cpp gave finite gradients and the
    backends disagreed on +inf). Other rows are untouched."""
    n, t, v = 4, 2, 37
    x = make_logits(n, t, v, dtype=torch.float32, device=device)
    y = make_labels(n, t, v, ignore="none", device=device)
    x[0, 0, 5] = float("nan")
    x[1, 1, 9] = float("inf")
    x[2, 0] = float("-inf")
    x = x.to(dtype).requires_grad_()
    out = pyfastpo.sequence_logps(x * 1.0, y, backend=backend, return_entropy=True)
    bad = torch.tensor([True, True, True, False], device=device)
    assert torch.isnan(out.logps[bad]).all() and torch.isnan(out.entropy[bad]).all()
    assert torch.isfinite(out.logps[~bad]).all() and torch.isfinite(out.entropy[~bad]).all()
    out.logps.sum().backward()
    rows = torch.zeros(n, t, dtype=torch.bool, device=device)
    rows[0, 0] = rows[1, 1] = rows[2, 0] = True
    assert torch.isnan(x.grad[rows]).all(), "every element of an undefined row's gradient is NaN"
    assert torch.isfinite(x.grad[~rows]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_minus_inf_target_in_a_finite_row_is_exact(backend, device):
    """Masked vocabulary entries are -inf: a -inf target has logp -inf and a finite gradient."""
    x = make_logits(2, 2, 11, device=device)
    y = make_labels(2, 2, 11, ignore="none", device=device)
    x[0, 0, y[0, 0]] = float("-inf")
    x.requires_grad_()
    out = pyfastpo.sequence_logps(x * 1.0, y, backend=backend)
    assert out.logps[0] == float("-inf") and torch.isfinite(out.logps[1])
    out.logps[1].backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ precision

OFFSETS = [0.0, 100.0, 1e4, 1e6, 1e30]


def _precision_inputs(offset, device):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 64, 1000, generator=g) * 3 + offset).float().to(device)
    y = torch.randint(0, 1000, (2, 64), generator=g).to(device)
    return x, y


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_precision_matches_torch_log_softmax_at_any_offset(backend, device, offset):
    """Per token, logp is within 2x of torch float32 log_softmax's error against float64
    truth on the same float32 inputs; so is the gradient. Before the fix (logp = x_y - lse),
    64 tokens lost 0.3 nats at offset 1e6, and at 1e30 logps were 0 and the gradient -1."""
    x, y = _precision_inputs(offset, device)
    truth = torch.log_softmax(x.double(), -1)
    truth_tok = truth.gather(-1, y[..., None]).squeeze(-1)
    torch_tok = torch.log_softmax(x, -1).gather(-1, y[..., None]).squeeze(-1)
    torch_err = (torch_tok.double() - truth_tok).abs().max().item()
    stats = get_backend(backend, x.device, x.dtype).forward(x, y, -100)
    ours_err = (stats.logp.double() - truth_tok).abs().max().item()
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)
    # Per sequence: the float32 sum over 64 tokens adds a few ulps of the sum, as torch's does.
    out = pyfastpo.sequence_logps(x.clone().requires_grad_(), y, backend=backend, return_entropy=True)
    sum_ulp = 2**-23 * truth_tok.sum(1).abs().max().item()
    seq_err = (out.logps.double() - truth_tok.sum(1)).abs().max().item()
    torch_seq_err = (torch_tok.sum(1).double() - truth_tok.sum(1)).abs().max().item()
    assert seq_err <= 2 * torch_seq_err + 2 * sum_ulp, (seq_err, torch_seq_err)
    # The entropy is relative to the max everywhere (reference included).
    p = truth.exp()
    entropy = -(p * truth).sum(-1).sum(1)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-3)
    # Gradient of sum(logps) against float64 truth, vs torch's float32 autograd.
    leaf = x.clone().requires_grad_()
    pyfastpo.sequence_logps(leaf * 1.0, y, backend=backend).logps.sum().backward()
    onehot = torch.nn.functional.one_hot(y, 1000).double()
    truth_grad = onehot - p
    tx = x.clone().requires_grad_()
    torch.log_softmax(tx, -1).gather(-1, y[..., None]).sum().backward()
    torch_grad_err = (tx.grad.double() - truth_grad).abs().max().item()
    grad_err = (leaf.grad.double() - truth_grad).abs().max().item()
    assert grad_err <= 2 * torch_grad_err + 1e-7, (grad_err, torch_grad_err)


# ------------------------------------------------------------ unreadable inputs


def _one_process_mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():  # a file store: no port to collide with a parallel run
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    return init_device_mesh("cpu", (dist.get_world_size(),))


@pytest.mark.parametrize(
    "backend", ["cpp", "reference"] + (["triton"] if "triton" in pyfastpo.available_backends("cpu") else [])
)
def test_dtensor_is_refused_before_any_pointer(backend, tmp_path):
    """Before the fix, a DTensor reached the cpp backend's raw pointers: SIGSEGV. A DTensor
    sharded on the vocabulary now runs (vocab-parallel, tests/test_distributed.py); any
    other layout is refused with a message, before any pointer is taken."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _one_process_mesh(tmp_path)
    x = torch.randn(2, 3, 50)
    y = torch.randint(0, 50, (2, 3))
    by_vocab = pyfastpo.sequence_logps(distribute_tensor(x, mesh, [Shard(2)]), y, backend=backend)
    torch.testing.assert_close(by_vocab.logps, pyfastpo.sequence_logps(x, y, backend=backend).logps)
    # A caller's leaf is never overwritten by the in-place backward, not even through a view.
    leaf = distribute_tensor(x.clone(), mesh, [Shard(2)]).requires_grad_()
    pyfastpo.sequence_logps(leaf[:, :2], y[:, :2], backend=backend).logps.sum().backward()
    torch.testing.assert_close(leaf.to_local(), x, rtol=0, atol=0)
    by_rows = distribute_tensor(x, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="DTensor with placements.*sharded on the vocabulary"):
        pyfastpo.sequence_logps(by_rows, y, backend=backend)
    with pytest.raises(ValueError, match="DTensor with placements.*sharded on the vocabulary"):
        pyfastpo.fused_preference_loss(by_rows, y, backend=backend)
    w = distribute_tensor(torch.randn(50, 8), mesh, [Shard(1)])
    with pytest.raises(ValueError, match="weight is a DTensor with placements.*dim 0"):
        pyfastpo.linear_preference_loss(torch.randn(2, 3, 8), w, y, backend=backend)


def test_meta_sparse_nested_are_refused():
    y = torch.randint(0, 10, (2, 3))
    x = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="meta device"):
        pyfastpo.sequence_logps(x.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="dense strided"):
        pyfastpo.sequence_logps(x.to_sparse(), y, backend="cpp")
    nested = torch.nested.nested_tensor([torch.randn(3, 10), torch.randn(3, 10)])
    with pytest.raises(ValueError, match="nested"):
        pyfastpo.sequence_logps(nested, y, backend="cpp")
    with pytest.raises(ValueError, match="dense strided"):
        pyfastpo.sequence_logps(x, y.to_sparse(), backend="cpp")


# ------------------------------------------- every argument before the first kernel


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts forward passes of the CPU backends (what a GPU pass over multi-GB logits would cost)."""
    calls = []
    for module in (cpp_backend, reference):
        original = module.forward

        def spy(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", spy)
    return calls


def _pairs(n=4, t=5, v=13):
    return make_logits(n, t, v).requires_grad_(), make_labels(n, t, v, ignore="none")


FUSED_BAD = [
    (lambda x, y: dict(ref_logits=torch.randn(4, 4, 13)), "ref_logits shape"),
    (lambda x, y: dict(ref_logits=torch.randn(4, 5, 12)), "ref_logits shape"),
    (lambda x, y: dict(ref_logits=torch.randn(4, 5, 26)[..., ::2]), "stride 1"),
    (lambda x, y: dict(ref_logits=torch.randn(4, 5, 13).to("meta")), "meta"),
    (lambda x, y: dict(ref_logits=[[0.0]]), "ref_logits must be a torch.Tensor"),
    (lambda x, y: dict(beta=0.0), "beta"),
    (lambda x, y: dict(beta=-0.1), "beta"),
    (lambda x, y: dict(beta=float("nan")), "beta"),
    (lambda x, y: dict(beta=float("inf")), "beta"),
    (lambda x, y: dict(loss_type="nope"), "unknown"),
    (lambda x, y: dict(loss_type=[]), "at least one"),
    (lambda x, y: dict(loss_type=None), "loss_type"),
    (lambda x, y: dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
    (lambda x, y: dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (lambda x, y: dict(ref_chosen_logps=torch.zeros(2)), "both"),
    (lambda x, y: dict(ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3)), r"shape \[2\]"),
    (
        lambda x, y: dict(loss_type="mallows_dpo", ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2)),
        "entropies",
    ),
    (lambda x, y: dict(bcr_weight=-1.0), "bcr_weight"),
    (lambda x, y: dict(nll_weight=-1.0), "nll_weight"),
    (lambda x, y: dict(loss_type="focalpo", gamma=-0.5), "gamma"),
    (
        lambda x, y: dict(loss_type="mallows_dpo", ref_logits=torch.randn(4, 5, 13), dispersion_scale=-0.29),
        "dispersion_scale",
    ),
    (lambda x, y: dict(label_smoothing=0.1), "no effect"),
    (lambda x, y: dict(simpo_gamma=1.0), "no effect"),
    (lambda x, y: dict(dispersion=torch.ones(3), loss_type="mallows_dpo"), r"shape \[2\]"),
    (lambda x, y: dict(bogus_option=1), "unknown loss option"),
    (lambda x, y: dict(backend="fast"), "unknown"),
    (lambda x, y: dict(ignore_index=1.5), "ignore_index"),
    (lambda x, y: dict(ignore_index=2**70), "ignore_index"),
    # Found by review: dispersion checked only after the pass; computed values silently overridden;
    # options read by no chosen loss; truthy strings; exo_pair smoothing that prefers the rejected answer.
    (lambda x, y: dict(loss_type="mallows_dpo", dispersion=torch.full((2,), 2.0)), "dispersion must lie"),
    (lambda x, y: dict(loss_type="mallows_dpo", dispersion=torch.full((2,), float("nan"))), "dispersion must lie"),
    (lambda x, y: dict(loss_type="ipo", chosen_num_tokens=torch.ones(2)), "computed"),
    (lambda x, y: dict(vocab_size=3), "computed"),
    (
        lambda x, y: dict(
            loss_type="mallows_dpo",
            ref_logits=torch.randn(4, 5, 13),
            ref_chosen_entropy=torch.ones(2),
            ref_rejected_entropy=torch.ones(2),
        ),
        "computed",
    ),
    (lambda x, y: dict(dispersion=torch.full((2,), 0.5)), "no effect"),
    (lambda x, y: dict(ref_chosen_entropy=torch.ones(2), ref_rejected_entropy=torch.ones(2)), "no effect"),
    (lambda x, y: dict(loss_type="focalpo", gamma=0.1, focal_gamma=0.7), "not both"),
    (lambda x, y: dict(loss_type="focalpo", focal_detach="no"), "focal_detach must be True or False"),
    (lambda x, y: dict(bcr_weight=1.0, bcr_per_token="false"), "bcr_per_token must be True or False"),
    (lambda x, y: dict(inplace_backward="no"), "inplace_backward must be True or False"),
    (lambda x, y: dict(beta=True), "beta"),
    (lambda x, y: dict(loss_type="exo_pair", label_smoothing=0.9), "label_smoothing"),
    (
        lambda x, y: dict(ref_chosen_logps=torch.zeros(2, dtype=torch.bool), ref_rejected_logps=torch.zeros(2)),
        "floating",
    ),
    (lambda x, y: dict(ref_logits=torch._neg_view(torch.randn(4, 5, 13))), "negated"),
]


@pytest.mark.parametrize("make_kwargs,match", FUSED_BAD)
def test_fused_refuses_before_any_kernel(make_kwargs, match, kernel_calls):
    x, y = _pairs()
    with pytest.raises(ValueError, match=match):
        pyfastpo.fused_preference_loss(x, y, **make_kwargs(x, y))
    assert not kernel_calls, "an argument error must surface before any pass over the logits"


def test_mallows_needs_a_vocabulary_of_two(kernel_calls):
    x = make_logits(2, 3, 1).requires_grad_()
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 2"):
        pyfastpo.fused_preference_loss(x, y, ref_logits=x.detach().clone(), loss_type="mallows_dpo")
    assert not kernel_calls


LINEAR_BAD = [
    (dict(beta=-1.0), "beta"),
    (dict(loss_type="bogus"), "unknown"),
    (dict(loss_type=["sigmoid"], loss_weights=[1.0, 2.0]), "loss_weights"),
    (dict(ref_hidden=torch.randn(4, 5, 7)), "ref_hidden shape"),
    (dict(ref_hidden=torch.randn(4, 5, 8), ref_weight=torch.randn(12, 8)), "ref_weight has 12 rows"),
    (dict(ref_hidden=torch.randn(4, 5, 8), ref_weight=torch.randn(13, 7)), "ref_weight must have shape"),
    (dict(ref_hidden=torch.randn(4, 5, 8).double()), "ref_hidden .* and ref_weight .* must share a dtype"),
    (dict(ref_weight=torch.randn(13, 8)), "only with ref_hidden"),
    (dict(bias=torch.randn(13, dtype=torch.float64)), "must share a dtype"),
    (dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2), loss_type="mallows_ipo"), "entropies"),
    (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(memory_budget_bytes=float("inf")), "memory_budget_bytes"),
    (dict(chunk_tokens=2.5), "chunk_tokens"),
    (dict(label_smoothing=0.2), "no effect"),
]


@pytest.mark.parametrize("kwargs,match", LINEAR_BAD)
def test_linear_refuses_before_any_kernel(kwargs, match, kernel_calls):
    hidden = torch.randn(4, 5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = make_labels(4, 5, 13, ignore="none")
    with pytest.raises(ValueError, match=match):
        pyfastpo.linear_preference_loss(hidden, weight, labels, **kwargs)
    assert not kernel_calls


# ------------------------------------------------------------------ conventions


def test_issue_example_mallows_ipo_reduces_to_ipo():
    """The MallowsPO paper's claim: at dispersion weight -log(phi) = 1 each Mallows loss is its
    DPO-family parent. Numbers from the issue (ipo = [23.68, 27.13])."""
    c, r = torch.tensor([-120.0, -80.0]), torch.tensor([-150.0, -60.0])
    rc, rr = torch.tensor([-125.0, -85.0]), torch.tensor([-140.0, -70.0])
    counts = dict(chosen_num_tokens=torch.tensor([100, 40]), rejected_num_tokens=torch.tensor([120, 30]))
    ipo = pyfastpo.preference_loss(c, r, rc, rr, loss_type="ipo", beta=0.1, **counts).losses
    torch.testing.assert_close(ipo, torch.tensor([23.68, 27.13]), atol=5e-3, rtol=0)
    one = torch.full((2,), math.exp(-1))
    mallows = pyfastpo.preference_loss(c, r, rc, rr, loss_type="mallows_ipo", beta=0.1, dispersion=one, **counts)
    torch.testing.assert_close(mallows.losses, ipo)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_mallows_dpo_reduces_to_cdpo_sigmoid(eps):
    g = torch.Generator().manual_seed(3)
    c, r, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 - 40 for _ in range(4))
    one = torch.full((6,), math.exp(-1), dtype=torch.float64)
    got = pyfastpo.preference_loss(c, r, rc, rr, loss_type="mallows_dpo", dispersion=one, label_smoothing=eps).losses
    h = 0.1 * ((c - rc) - (r - rr))
    want = -(1 - eps) * torch.nn.functional.logsigmoid(h) - eps * torch.nn.functional.logsigmoid(-h)
    torch.testing.assert_close(got, want)
    if eps == 0:
        torch.testing.assert_close(got, pyfastpo.preference_loss(c, r, rc, rr).losses)


def test_mallows_phi_has_no_dpo_parent_but_its_uniform_limit_is_log2():
    """MallowsPO-phi is not a reweighted DPO: its reduction is the uniform limit phi -> 1,
    where every pair costs log 2 whatever the margin."""
    c = torch.tensor([-10.0, -30.0, -5.0], dtype=torch.float64)
    r = torch.tensor([-20.0, -10.0, -5.0], dtype=torch.float64)
    out = pyfastpo.preference_loss(
        c, r, loss_type="mallows_phi", dispersion=torch.full((3,), 1 - 1e-7, dtype=torch.float64)
    )
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2), dtype=torch.float64), atol=1e-5, rtol=0)


def test_nan_dispersion_is_refused():
    """``dispersion <= 0 or > 1`` let NaN through (every comparison with NaN is False)."""
    c = torch.randn(3)
    with pytest.raises(ValueError, match="no NaN"):
        pyfastpo.preference_loss(c, c, loss_type="mallows_dpo", dispersion=torch.tensor([0.5, float("nan"), 0.5]))


def test_option_defaults_match_preference_loss_signature():
    import inspect

    from pyfastpo.losses.options import SCALAR_DEFAULTS

    params = inspect.signature(pyfastpo.preference_loss).parameters
    assert {k: params[k].default for k in SCALAR_DEFAULTS} == SCALAR_DEFAULTS
    with pytest.raises(TypeError, match="unknown loss options"):
        pyfastpo.losses.check_loss_options("sigmoid", betta=0.1)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_huge_finite_logits_of_both_signs_are_defined(backend, device):
    """Finite logits of +-1e35 sum to inf - inf = NaN: that sum must not mark the row undefined."""
    v = 4096
    x = torch.empty(v)
    x[0::2], x[1::2] = 1e35, -1e35
    logits = x.view(1, 1, v).repeat(2, 1, 1).to(device)
    labels = torch.zeros(2, 1, dtype=torch.long, device=device)
    out = pyfastpo.sequence_logps(logits, labels, backend=backend, return_entropy=True)
    torch.testing.assert_close(out.logps.cpu(), torch.full((2,), -math.log(v / 2)))
    torch.testing.assert_close(out.entropy.cpu(), torch.full((2,), math.log(v / 2)))
