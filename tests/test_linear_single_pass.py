"""The fused linear path's single-pass mode (gradients in the forward) against the two-pass
path and the float64 materialized oracle of tests/test_linear.py; the mode switch."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, backend_device_pairs
from test_linear import assert_matches, leaves, make, oracle, ours

import pyfastpo

CASES = {
    "sigmoid + BCR": dict(loss_type="sigmoid", beta=0.5, bcr_weight=0.2),
    "loss list": dict(loss_type=["sigmoid", "ipo", "focalpo"], loss_weights=[1.0, 0.5, 0.25]),
    "NLL term": dict(loss_type="hinge", nll_weight=0.3),
    "Mallows, reference entropies": dict(loss_type="mallows_dpo"),
    "LD-DPO with NLL": dict(ld_alpha=0.4, nll_weight=0.2),
    "WPO": dict(use_weighting=True),
    "SFT term, length-normalized": dict(loss_type="mallows_phi", sft_weight=0.1, length_normalize=True),
}


def max_pair_tokens(labels) -> int:
    counts = (labels != IGNORE).sum(1)
    half = counts.shape[0] // 2
    return int((counts[:half] + counts[half:]).max())


def assert_same_step(a, b, rtol, atol):
    """Two runs of ours(): loss, per-pair losses, metrics, policy stats and gradients."""
    torch.testing.assert_close(a[0].loss, b[0].loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(a[0].losses, b[0].losses.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(a[0].policy.logps, b[0].policy.logps.detach(), rtol=rtol, atol=atol)
    assert a[0].metrics.keys() == b[0].metrics.keys()
    for k in a[0].metrics:
        torch.testing.assert_close(a[0].metrics[k], b[0].metrics[k], rtol=rtol, atol=atol)
    for x, y in zip(a[1:], b[1:]):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("name", list(CASES))
def test_single_pass_equals_two_passes_and_the_oracle(backend, device, name):
    inputs = make(device=device)
    kw = dict(CASES[name], backend=backend)
    single = ours(*inputs, single_pass=True, **kw)
    two = ours(*inputs, single_pass=False, **kw)
    assert single[0].mode.startswith("single-pass") and two[0].mode == "two-pass: single_pass=False"
    assert_same_step(single, two, 1e-5, 1e-6)
    assert_matches(single, oracle(*inputs, **CASES[name]), 1e-5, 1e-6)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_any_grouping_of_pairs_gives_the_same_step(groups):
    """Chunks of one pair, two pairs, or the whole batch: the same numbers (float64)."""
    inputs = make(dtype=torch.float64)
    labels = inputs[-1]
    per_pair = max_pair_tokens(labels)
    chunk = per_pair if groups == 1 else 2 * per_pair if groups == 2 else 10_000
    single = ours(*inputs, backend="reference", chunk_tokens=chunk, single_pass=True)
    assert single[0].mode.startswith("single-pass")
    assert_same_step(single, ours(*inputs, backend="reference", single_pass=False), 1e-12, 1e-13)


def test_precomputed_reference_frozen_weight_no_bias_and_a_scaled_gradient():
    hidden, ref_hidden, weight, _, labels = make(with_bias=False)
    ref = pyfastpo.linear_sequence_logps(ref_hidden, weight, labels).logps
    grads = []
    for single_pass in (True, False):
        h = hidden.clone().requires_grad_()
        out = pyfastpo.linear_preference_loss(
            h, weight, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], single_pass=single_pass
        )
        (out.loss * 0.37).backward()  # the incoming gradient scales what the forward computed
        grads.append(h.grad)
        assert weight.grad is None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


def test_bfloat16_single_pass_matches_two_passes():
    inputs = make(dtype=torch.bfloat16)
    single = ours(*inputs, backend="cpp", single_pass=True)
    two = ours(*inputs, backend="cpp", single_pass=False)
    assert_same_step(single, two, 1e-2, 1e-2)
    assert_matches(single, oracle(*inputs), 2e-2, 2e-2)


def test_the_mode_switches_at_the_budget_boundary():
    inputs = make()
    labels = inputs[-1]
    per_pair = max_pair_tokens(labels)
    fits = ours(*inputs, chunk_tokens=per_pair)[0]
    assert fits.mode.startswith("single-pass")
    over = ours(*inputs, chunk_tokens=per_pair - 1)[0]
    assert over.mode == f"two-pass: a pair has {per_pair} valid tokens, more than a chunk's {per_pair - 1}"
    with pytest.raises(ValueError, match="single_pass=True cannot run here: two-pass: a pair has"):
        ours(*inputs, chunk_tokens=per_pair - 1, single_pass=True)
    # The budget in bytes sets the same chunk: V * (4 + 4) bytes per float32 token.
    v = inputs[2].shape[0]
    assert ours(*inputs, memory_budget_bytes=per_pair * v * 8)[0].mode.startswith("single-pass")
    assert ours(*inputs, memory_budget_bytes=per_pair * v * 8 - 1)[0].mode.startswith("two-pass")


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", ["sigmoid", "sft"]])
def test_losses_that_read_the_whole_batch_take_two_passes(loss_type):
    inputs = make()
    out = ours(*inputs, loss_type=loss_type)
    assert out[0].mode.startswith("two-pass: loss type") and "reads the whole batch" in out[0].mode
    assert_matches(out, oracle(*inputs, loss_type=loss_type), 1e-5, 1e-6)
    with pytest.raises(ValueError, match="single_pass=True cannot run here"):
        ours(*inputs, loss_type=loss_type, single_pass=True)


def test_without_gradients_one_pass_is_the_forward():
    hidden, ref_hidden, weight, bias, labels = make()
    with torch.no_grad():
        out = pyfastpo.linear_preference_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    assert out.mode.startswith("two-pass: no gradient is needed")
    frozen = pyfastpo.linear_preference_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    assert frozen.mode.startswith("two-pass: no gradient is needed") and not frozen.loss.requires_grad


def test_only_the_loss_is_differentiable_and_backward_runs_once():
    hidden, ref_hidden, weight, bias, labels = make()
    h, w = leaves(hidden, weight)
    out = pyfastpo.linear_preference_loss(h, w, labels, bias=bias, ref_hidden=ref_hidden)
    assert out.mode.startswith("single-pass") and out.loss.requires_grad
    assert not out.losses.requires_grad and not out.policy.logps.requires_grad
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used by a first backward; .* pass single_pass=False"):
        out.loss.backward()
    out = pyfastpo.linear_preference_loss(h, w, labels, bias=bias, ref_hidden=ref_hidden)
    (g,) = torch.autograd.grad(out.loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once only"):
        g.sum().backward()


def test_bad_single_pass_flag():
    hidden, _, weight, _, labels = make()
    with pytest.raises(ValueError, match="single_pass must be None"):
        pyfastpo.linear_preference_loss(hidden, weight, labels, single_pass="yes")


def test_int32_and_bad_labels_with_precomputed_reference():
    """Without a streamed reference nothing else checks the labels first: the single pass
    converts them (int32 here) and refuses an out-of-range one before any kernel runs."""
    hidden, ref_hidden, weight, bias, labels = make()
    ref = pyfastpo.linear_sequence_logps(ref_hidden, weight, labels, bias=bias).logps
    kw = dict(bias=bias, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], backend="cpp")
    runs = [pyfastpo.linear_preference_loss(*leaves(hidden, weight), labels.int(), single_pass=s, **kw) for s in (1, 0)]
    assert runs[0].mode.startswith("single-pass")
    torch.testing.assert_close(runs[0].loss, runs[1].loss)
    bad = labels.clone()
    bad[0, 5] = 10**6
    with pytest.raises(ValueError, match="label"):
        pyfastpo.linear_preference_loss(*leaves(hidden, weight), bad, single_pass=True, **kw)


def test_scalar_tensor_options_are_not_sliced_by_pair():
    inputs = make(dtype=torch.float64)
    labels = inputs[-1]
    kw = dict(loss_type=["sigmoid", "ipo"], loss_weights=torch.tensor([1.0, 0.5]), beta=torch.tensor(0.3))
    single = ours(*inputs, backend="reference", chunk_tokens=max_pair_tokens(labels), single_pass=True, **kw)
    assert_same_step(single, ours(*inputs, backend="reference", single_pass=False, **kw), 1e-12, 1e-13)


def test_bfloat16_gradients_scale_in_float32():
    """The incoming gradient (1/3 here) multiplies the stored bf16 gradients in float32: no
    bf16-rounded scale (bf16(1/3) = 0.33398 would bias every gradient by +0.2%)."""
    hidden, ref_hidden, weight, bias, labels = make(dtype=torch.bfloat16)
    grads = []
    for scale in (1.0, 1 / 3):
        h, w = leaves(hidden, weight)
        out = pyfastpo.linear_preference_loss(h, w, labels, ref_hidden=ref_hidden, single_pass=True)
        (out.loss * scale).backward()
        grads.append(w.grad.double())
    ratio = grads[1].abs().sum() / grads[0].abs().sum()
    assert abs(ratio - 1 / 3) < 1e-4, float(ratio)


def test_float16_and_other_graded_inputs_take_two_passes():
    hidden, ref_hidden, weight, bias, labels = make()
    out = ours(hidden.half(), ref_hidden.half(), weight.half(), None, labels, backend="reference")
    assert out[0].mode.startswith("two-pass: float16")
    ref = pyfastpo.linear_sequence_logps(ref_hidden, weight, labels).logps.detach().requires_grad_()
    h = hidden.clone().requires_grad_()
    out = pyfastpo.linear_preference_loss(h, weight, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])
    assert out.mode == "two-pass: a reference log-prob or loss option tensor requires grad"
    out.loss.backward()
    assert ref.grad is not None and h.grad is not None
