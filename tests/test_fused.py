"""fused_preference_loss against the same computation written out with a log_softmax."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, backend_device_pairs, make_labels, make_logits, oracle

import pyfastpo

N, T, V = 4, 6, 97


def inputs(seed=0, dtype=torch.float32):
    logits = make_logits(N, T, V, dtype, "shifted", seed=seed)
    ref_logits = make_logits(N, T, V, dtype, "contiguous", seed=seed + 10)
    labels = make_labels(N, T, V, "random", seed=seed + 20)
    labels[:, :2] = IGNORE  # a prompt
    return logits, ref_logits, labels


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "focalpo", "mallows_dpo", "mallows_phi", "simpo"])
def test_matches_unfused_oracle(backend, device, loss_type):
    logits, ref_logits, labels = (x.to(device) for x in inputs())
    leaf = logits.detach().clone().requires_grad_()
    out = pyfastpo.fused_preference_loss(
        leaf, labels, ref_logits=ref_logits, loss_type=loss_type, beta=0.2, backend=backend, bcr_weight=0.1
    )
    out.loss.backward()

    pol, ref = oracle(logits, labels), oracle(ref_logits, labels)
    x = logits.detach().double().requires_grad_()
    lsm = torch.log_softmax(x, -1)
    valid = labels != IGNORE
    tok = lsm.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1) * valid
    nc, nr = pol["num_tokens"].chunk(2)
    hc, hr = ref["entropy"].chunk(2)
    want = pyfastpo.preference_loss(
        *tok.sum(1).chunk(2),
        *ref["logps"].chunk(2),
        loss_type=loss_type,
        beta=0.2,
        bcr_weight=0.1,
        chosen_num_tokens=nc,
        rejected_num_tokens=nr,
        ref_chosen_entropy=hc,
        ref_rejected_entropy=hr,
        vocab_size=V,
    )
    want.loss.backward()
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.reference.logps.double(), ref["logps"], rtol=1e-5, atol=1e-4)
    for key, value in want.metrics.items():
        torch.testing.assert_close(out.metrics[key].double(), value, rtol=1e-4, atol=1e-5)


def test_logits_metrics_follow_trl():
    logits, _, labels = inputs(1)
    out = pyfastpo.fused_preference_loss(logits, labels)
    valid = labels != IGNORE
    for name, half in zip(("chosen", "rejected"), (slice(0, N // 2), slice(N // 2, N))):
        want = logits[half][valid[half]].double().mean(-1).sum() / valid[half].sum()
        torch.testing.assert_close(out.metrics[f"logits/{name}"].double(), want, rtol=1e-5, atol=1e-6)


def test_precomputed_reference_equals_reference_logits():
    logits, ref_logits, labels = inputs(2)
    a = pyfastpo.fused_preference_loss(logits, labels, ref_logits=ref_logits)
    ref = pyfastpo.sequence_logps(ref_logits, labels).logps
    b = pyfastpo.fused_preference_loss(logits, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])
    torch.testing.assert_close(a.loss, b.loss)
    assert b.reference is None


def test_mallows_with_precomputed_reference_needs_entropies():
    logits, _, labels = inputs(3)
    with pytest.raises(ValueError, match="need the reference model.s token entropies"):
        pyfastpo.fused_preference_loss(
            logits, labels, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2), loss_type="mallows_dpo"
        )


def test_bad_batches():
    logits, ref_logits, labels = inputs(4)
    with pytest.raises(ValueError, match="even"):
        pyfastpo.fused_preference_loss(logits[:3], labels[:3])
    with pytest.raises(ValueError, match="ref_logits shape"):
        pyfastpo.fused_preference_loss(logits, labels, ref_logits=ref_logits[:, :-1])
    with pytest.raises(ValueError, match="not both"):
        pyfastpo.fused_preference_loss(
            logits, labels, ref_logits=ref_logits, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2)
        )
