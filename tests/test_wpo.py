"""WPO: the per-token statistic ``log sum_v p_v^2`` from the streaming pass, on every
backend, against float64; and the per-pair weights against trl 1.13's
formula, written here."""

from __future__ import annotations

import pytest
import torch

import pyfastpo

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WITH_STAT = pyfastpo.available_backends(DEVICE)


def make(n=4, t=7, v=53, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return logits.to(DEVICE), labels.to(DEVICE)


def log_sum_sq_f64(logits, labels):
    """sum over valid tokens of log sum_v p_v^2, in float64, as trl writes it: lse(2x) - 2 lse(x)."""
    x = logits.double()
    per_token = torch.logsumexp(2 * x, -1) - 2 * torch.logsumexp(x, -1)
    return (per_token * (labels != -100)).sum(1)


@pytest.mark.parametrize("backend", WITH_STAT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [53, 3001])
def test_log_sum_sq_matches_float64(backend, dtype, v):
    """Odd V within one block and across several (the C++ kernel's blocks are 1024), with a
    masked vocabulary (-inf logits) in one row."""
    logits, labels = make(v=v, dtype=dtype)
    logits[0, 3, v // 2 :] = float("-inf")
    labels[0, 3] = 1
    out = pyfastpo.sequence_logps(logits, labels, backend=backend, return_log_sum_sq=True)
    torch.testing.assert_close(out.log_sum_sq.double(), log_sum_sq_f64(logits, labels), rtol=1e-5, atol=1e-5)
    plain = pyfastpo.sequence_logps(logits, labels, backend=backend)
    assert plain.log_sum_sq is None and torch.equal(plain.logps, out.logps)


def test_log_sum_sq_on_the_linear_path():
    _, labels = make()
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 7, 8, generator=g).to(DEVICE), torch.randn(53, 8, generator=g).to(DEVICE)
    out = pyfastpo.linear_sequence_logps(hidden, weight, labels, return_log_sum_sq=True, chunk_tokens=4)
    torch.testing.assert_close(
        out.log_sum_sq.double(), log_sum_sq_f64(hidden @ weight.t(), labels), rtol=1e-5, atol=1e-5
    )


def trl_wpo_weights(logits, labels):
    """trl 1.13's use_weighting weights, per pair (its Eq. 2 code, restated)."""
    x = logits.double()
    mask = labels != -100
    logp = torch.log_softmax(x, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    log_denom = torch.logsumexp(2 * x, -1) - 2 * torch.logsumexp(x, -1)
    mean = ((logp - log_denom) * mask).sum(1) / mask.sum(1).clamp_min(1)
    w = torch.exp(mean)
    return w[: len(w) // 2] * w[len(w) // 2 :]


@pytest.mark.parametrize("entry", ["fused", "linear"])
def test_use_weighting_weights_each_pair_like_trl(entry):
    logits, labels = make(seed=2)
    g = torch.Generator().manual_seed(3)
    if entry == "linear":
        hidden, weight = torch.randn(4, 7, 8, generator=g).to(DEVICE), torch.randn(53, 8, generator=g).to(DEVICE)
        logits = hidden @ weight.t()
        ref = logits + 0.3
        out = pyfastpo.linear_preference_loss(hidden, weight, labels, ref_hidden=hidden + 0.1, use_weighting=True)
        plain = pyfastpo.linear_preference_loss(hidden, weight, labels, ref_hidden=hidden + 0.1)
    else:
        ref = logits + 0.3 * torch.randn(logits.shape, generator=g).to(DEVICE)
        out = pyfastpo.fused_preference_loss(logits, labels, ref_logits=ref, use_weighting=True)
        plain = pyfastpo.fused_preference_loss(logits, labels, ref_logits=ref)
    want = plain.losses.double() * trl_wpo_weights(logits, labels)
    torch.testing.assert_close(out.losses.double(), want, rtol=1e-5, atol=1e-7)


def test_the_weights_are_constants():
    logits, labels = make(seed=4)
    x = logits.clone().requires_grad_()
    out = pyfastpo.fused_preference_loss(x * 1, labels, ref_logits=logits + 0.2, use_weighting=True)
    out.loss.backward()
    y = logits.clone().requires_grad_()
    plain = pyfastpo.fused_preference_loss(y * 1, labels, ref_logits=logits + 0.2)
    w = pyfastpo.wpo_pair_weights(pyfastpo.sequence_logps(logits, labels, return_log_sum_sq=True)).to(
        plain.losses.dtype
    )
    (plain.losses * w).mean().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_bad_combinations_are_refused():
    logits, labels = make()
    with pytest.raises(ValueError, match="'aot' and 'aot_unpaired' sort across the batch"):
        pyfastpo.fused_preference_loss(logits, labels, loss_type="aot", use_weighting=True)
    with pytest.raises(ValueError, match="use_weighting must be True or False"):
        pyfastpo.fused_preference_loss(logits, labels, use_weighting=1)
