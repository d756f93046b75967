"""Per-token log-prob weights (``token_weights``) and LD-DPO (``ld_alpha``), against a
float64 log_softmax written here, forward and backward, on the CPU backends."""

from __future__ import annotations

import pytest
import torch

import pyfastpo

V = 37
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every backend this machine runs (triton under its interpreter on a CPU: tests/conftest.py).
BACKENDS = [b for b in ("reference", "cpp", "triton", "cuda") if b in pyfastpo.available_backends(DEVICE)]


def oracle_logps(logits, labels, weights):
    """sum_t w_t log softmax(logits)[labels], float64."""
    valid = labels != -100
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return (logp * valid * weights.double()).sum(1)


def make(n=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (n, t), generator=g)
    labels[:, :2] = -100
    labels[0, 6:] = -100  # a short completion
    labels[n // 2 + 1, 4:] = -100
    weights = torch.rand(n, t, generator=g) + 0.1
    return g, labels, weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_token_weights_value_and_gradient(backend, layout):
    """Contiguous logits take one launch over [N*T, 1, V]; a slice whose N and T do not
    merge takes one launch per sequence. Both in place (non-leaf logits)."""
    g, labels, weights = make()
    labels, weights = labels.to(DEVICE), weights.to(DEVICE)
    base = torch.randn(4, 10 if layout == "strided" else 9, V, generator=g).to(DEVICE).requires_grad_()
    logits = (base * 2)[:, :9]  # a non-leaf: the in-place backward
    assert logits.is_contiguous() == (layout == "contiguous")
    out = pyfastpo.sequence_logps(logits, labels, backend=backend, token_weights=weights)
    up = torch.randn(4, generator=g).to(DEVICE)
    (out.logps * up).sum().backward()
    ref_base = base.detach().double().requires_grad_()
    want = oracle_logps((ref_base * 2)[:, :9], labels, weights)
    (want * up.double()).sum().backward()
    torch.testing.assert_close(out.logps.double(), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(base.grad.double(), ref_base.grad, rtol=1e-5, atol=1e-6)
    plain = pyfastpo.sequence_logps(logits.detach(), labels, backend=backend)
    assert torch.equal(out.num_tokens, plain.num_tokens)  # counts and metrics stay unweighted


def test_token_weights_on_the_linear_path():
    g, labels, weights = make(seed=1)
    hidden = torch.randn(4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out = pyfastpo.linear_sequence_logps(hidden, weight, labels, token_weights=weights, chunk_tokens=5)
    out.logps.sum().backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    oracle_logps(h2 @ w2.t(), labels, weights).sum().backward()
    torch.testing.assert_close(out.logps, oracle_logps(hidden.detach() @ weight.detach().t(), labels, weights))
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def ld_weights_by_hand(labels, alpha):
    """LD-DPO's weights from its definition, one row at a time."""
    n = labels.shape[0]
    lengths = [int((row != -100).sum()) for row in labels]
    out = torch.zeros(labels.shape)
    for i, row in enumerate(labels):
        shared = min(lengths[i % (n // 2)], lengths[i % (n // 2) + n // 2])
        k = 0
        for t, y in enumerate(row):
            if y != -100:
                k += 1
                out[i, t] = 1.0 if k <= shared else alpha
    return out


def test_ld_token_weights_follow_the_definition():
    _, labels, _ = make()
    for alpha in (0.0, 0.3, 1.0):
        assert torch.equal(pyfastpo.ld_token_weights(labels, alpha), ld_weights_by_hand(labels, alpha))


@pytest.mark.parametrize("entry", ["fused", "linear"])
def test_ld_alpha_weights_policy_and_reference(entry):
    g, labels, _ = make(seed=2)
    alpha = 0.4
    w = ld_weights_by_hand(labels, alpha)
    if entry == "fused":
        logits, ref = torch.randn(4, 9, V, generator=g), torch.randn(4, 9, V, generator=g)
        out = pyfastpo.fused_preference_loss(logits, labels, ref_logits=ref, ld_alpha=alpha, backend="cpp")
    else:
        hidden, ref_hidden = torch.randn(4, 9, 8, generator=g), torch.randn(4, 9, 8, generator=g)
        weight = torch.randn(V, 8, generator=g)
        out = pyfastpo.linear_preference_loss(
            hidden, weight, labels, ref_hidden=ref_hidden, ld_alpha=alpha, backend="cpp"
        )
        logits, ref = hidden @ weight.t(), ref_hidden @ weight.t()
    pol, rf = oracle_logps(logits, labels, w), oracle_logps(ref, labels, w)
    want = pyfastpo.preference_loss(pol[:2], pol[2:], rf[:2], rf[2:]).loss
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unweighted_logps_beside_the_weighted_ones(backend):
    """With token_weights, ``unweighted_logps`` is the plain sum, and a loss reading both
    gets both gradients (per-token scale g_w w_t + g_u), in one backward."""
    g, labels, weights = make(seed=3)
    labels, weights = labels.to(DEVICE), weights.to(DEVICE)
    base = torch.randn(4, 9, V, generator=g).to(DEVICE).requires_grad_()
    out = pyfastpo.sequence_logps(base * 1, labels, backend=backend, token_weights=weights)
    up_w, up_u = torch.randn(4, generator=g).to(DEVICE), torch.randn(4, generator=g).to(DEVICE)
    ((out.logps * up_w).sum() + (out.unweighted_logps * up_u).sum()).backward()
    ref = base.detach().double().requires_grad_()
    want_w, want_u = oracle_logps(ref, labels, weights), oracle_logps(ref, labels, torch.ones_like(weights))
    ((want_w * up_w.double()).sum() + (want_u * up_u.double()).sum()).backward()
    torch.testing.assert_close(out.unweighted_logps.double(), want_u, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(base.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)
    assert pyfastpo.sequence_logps(base.detach(), labels, backend=backend).unweighted_logps is None


def ld_loss_by_hand(logits, ref, labels, alpha, loss_type, **kw):
    """LD-DPO's loss as trl 1.13 computes it, from float64 log_softmax: the pair terms on the
    weighted log-probs, trl's ``sft`` (and pyfastpo's nll_weight / sft_weight) on the plain
    chosen ones, WPO's weights from the plain per-token log-probs."""
    valid = labels != -100
    w = ld_weights_by_hand(labels, alpha).double()
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * valid
    ref_logp = torch.log_softmax(ref.double(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * valid
    pol, rf, plain = (logp * w).sum(1), (ref_logp * w).sum(1), logp.sum(1)
    n = valid.sum(1).double()
    h = 0.1 * ((pol[:2] - rf[:2]) - (pol[2:] - rf[2:]))
    losses = -torch.nn.functional.logsigmoid(h)
    if loss_type == ["sigmoid", "sft"]:
        losses = losses + (-plain[:2].sum() / n[:2].sum())
    losses = losses + kw.get("nll_weight", 0.0) * (-plain[:2] / n[:2]) + kw.get("sft_weight", 0.0) * (-plain[:2])
    if kw.get("use_weighting"):
        lsq = torch.logsumexp(2 * torch.log_softmax(logits.double(), -1), -1)
        mean = ((logp - lsq * valid).sum(1) / n).detach()
        losses = losses * (torch.exp(mean[:2]) * torch.exp(mean[2:]))
    return losses.mean()


LD_COMBINATIONS = {
    "sft type": dict(loss_type=["sigmoid", "sft"]),
    "nll_weight": dict(nll_weight=0.7),
    "sft_weight": dict(sft_weight=0.3),
    "use_weighting": dict(use_weighting=True),
}


@pytest.mark.parametrize("entry", ["fused", "linear"])
@pytest.mark.parametrize("name", list(LD_COMBINATIONS))
def test_ld_alpha_with_the_terms_that_read_plain_logps(entry, name):
    """ld_alpha with trl's ``sft`` type, nll_weight, sft_weight and WPO: each reads the plain
    log-probs (as trl does), the pair loss the weighted ones; value and gradient."""
    g, labels, _ = make(seed=4)
    kw = dict(LD_COMBINATIONS[name])
    loss_type = kw.pop("loss_type", "sigmoid")
    alpha = 0.3
    if entry == "fused":
        logits = torch.randn(4, 9, V, generator=g, requires_grad=True)
        ref = torch.randn(4, 9, V, generator=g)
        out = pyfastpo.fused_preference_loss(
            logits * 1, labels, ref_logits=ref, ld_alpha=alpha, loss_type=loss_type, backend="cpp", **kw
        )
        leaf, x, x_ref = logits, logits.detach().double().requires_grad_(), ref
        want = ld_loss_by_hand(x, x_ref, labels, alpha, loss_type, **kw)
    else:
        hidden = torch.randn(4, 9, 8, generator=g, requires_grad=True)
        ref_hidden, weight = torch.randn(4, 9, 8, generator=g), torch.randn(V, 8, generator=g)
        out = pyfastpo.linear_preference_loss(
            hidden, weight, labels, ref_hidden=ref_hidden, ld_alpha=alpha, loss_type=loss_type, backend="cpp", **kw
        )
        leaf, x = hidden, hidden.detach().double().requires_grad_()
        want = ld_loss_by_hand(x @ weight.double().t(), ref_hidden @ weight.t(), labels, alpha, loss_type, **kw)
    out.loss.backward()
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), x.grad, rtol=1e-4, atol=1e-6)


def test_bad_token_weights_and_ld_alpha_are_refused():
    _, labels, weights = make()
    logits = torch.randn(4, 9, V)
    with pytest.raises(ValueError, match="token_weights must have the labels' shape"):
        pyfastpo.sequence_logps(logits, labels, token_weights=weights[:, 1:])
    with pytest.raises(ValueError, match="token_weights must be a floating tensor"):
        pyfastpo.sequence_logps(logits, labels, token_weights=labels)
    with pytest.raises(ValueError, match=r"token_weights are constants"):
        pyfastpo.sequence_logps(logits, labels, token_weights=weights.requires_grad_())
    with pytest.raises(ValueError, match="pass no reference inputs"):
        pyfastpo.fused_preference_loss(logits, labels, ref_logits=logits, reference_free=True)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"ld_alpha must be a number in \[0, 1\]"):
            pyfastpo.fused_preference_loss(logits, labels, ld_alpha=bad)
