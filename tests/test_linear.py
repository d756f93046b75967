"""linear_preference_loss against a float64 materialized oracle (hidden @ W.T + b, then reference)."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, backend_device_pairs

import pyfastpo
from pyfastpo.memory import peak_memory

N, T, H, V = 4, 9, 16, 75


def make(seed=0, dtype=torch.float32, device="cpu", with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T + 1, H, generator=g, dtype=torch.float64)[:, 1:]  # a strided view
    ref_hidden = hidden + 0.1 * torch.randn(N, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3
    bias = torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, :3] = IGNORE  # prompt
    labels[1, -2:] = IGNORE  # padding
    labels[2] = IGNORE  # a sequence with no completion token
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(ref_hidden), cast(weight), cast(bias), labels.to(device)


def leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def oracle(hidden, ref_hidden, weight, bias, labels, **kw):
    h, w, b = leaves(*(None if x is None else x.double() for x in (hidden, weight, bias)))
    logits = h @ w.t() + (0 if b is None else b)
    with torch.no_grad():
        ref_logits = ref_hidden.double() @ w.t() + (0 if b is None else b)
    out = pyfastpo.fused_preference_loss(logits, labels, ref_logits=ref_logits, backend="reference", **kw)
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def ours(hidden, ref_hidden, weight, bias, labels, **kw):
    h, w, b = leaves(hidden, weight, bias)
    out = pyfastpo.linear_preference_loss(h, w, labels, bias=b, ref_hidden=ref_hidden, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def assert_matches(got, want, rtol, atol):
    out, *grads = got
    ref, *ref_grads = want
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.policy.logps.double(), ref.policy.logps, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(out.reference.entropy.double(), ref.reference.entropy, rtol=rtol, atol=atol * 10)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g.double(), r, rtol=rtol * 10, atol=atol)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "focalpo", "mallows_dpo"])
def test_matches_materialized_oracle(backend, device, loss_type):
    inputs = make(device=device)
    kw = dict(loss_type=loss_type, beta=0.5, bcr_weight=0.2)
    assert_matches(ours(*inputs, backend=backend, chunk_tokens=5, **kw), oracle(*inputs, **kw), 1e-5, 1e-6)


def test_bfloat16_within_bf16_tolerance():
    inputs = make(dtype=torch.bfloat16)
    assert_matches(ours(*inputs, backend="cpp"), oracle(*inputs), 2e-2, 2e-2)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunk_size_does_not_change_the_result(chunk):
    inputs = make(dtype=torch.float64)
    want = oracle(*inputs, loss_type="sigmoid")
    assert_matches(ours(*inputs, backend="reference", chunk_tokens=chunk), want, 1e-12, 1e-12)


def test_memory_budget_sets_the_chunk():
    inputs = make(dtype=torch.float64)
    want = oracle(*inputs)
    assert_matches(ours(*inputs, backend="reference", memory_budget_bytes=3 * V * 12), want, 1e-12, 1e-12)


def test_frozen_weight_gets_no_gradient():
    hidden, ref_hidden, weight, bias, labels = make()
    h = hidden.clone().requires_grad_()
    out = pyfastpo.linear_preference_loss(h, weight, labels, bias=bias, ref_hidden=ref_hidden)
    out.loss.backward()
    _, want_h, _, _ = oracle(hidden, ref_hidden, weight, bias, labels)
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(h.grad.double(), want_h, rtol=1e-4, atol=1e-6)


def test_no_bias_and_precomputed_reference():
    hidden, ref_hidden, weight, _, labels = make(with_bias=False)
    with_ref = ours(hidden, ref_hidden, weight, None, labels)
    ref = with_ref[0].reference.logps
    h, w = leaves(hidden, weight)
    out = pyfastpo.linear_preference_loss(h, w, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])
    out.loss.backward()
    torch.testing.assert_close(out.loss, with_ref[0].loss)
    torch.testing.assert_close(w.grad, with_ref[2])


def test_separate_reference_head():
    hidden, ref_hidden, weight, bias, labels = make()
    ref_weight = weight + 0.05
    out = pyfastpo.linear_preference_loss(
        hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight
    )
    ref_logits = ref_hidden.double() @ ref_weight.double().t()  # ref_bias not given: no bias
    want = pyfastpo.sequence_logps(ref_logits, labels).logps
    torch.testing.assert_close(out.reference.logps.double(), want, rtol=1e-5, atol=1e-5)


def test_peak_memory_is_bounded_by_the_chunk():
    """With a small chunk, the forward+backward holds far less than the full logits:
    at most the gradients, the gathered hidden states and a few chunk-sized buffers."""
    n, t, h, v, chunk = 8, 64, 32, 4000, 4
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, t, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, : t // 2] = IGNORE

    def step():
        out = pyfastpo.linear_preference_loss(hidden, weight, labels, backend="cpp", chunk_tokens=chunk)
        return torch.autograd.grad(out.loss, (hidden, weight))

    _, peak = peak_memory(step)
    full_logits = n * t * v * 4
    grads = hidden.numel() * 4 + 2 * weight.numel() * 4  # grad_hidden, float32 accumulator + returned grad
    chunk_bytes = chunk * v * 4
    bound = grads + 8 * chunk_bytes + 64 * n * t * 4 + (1 << 16)
    assert peak <= bound, f"peak {peak} > bound {bound}"
    assert peak < full_logits / 4


def test_bad_inputs():
    hidden, ref_hidden, weight, bias, labels = make()
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\]"):
        pyfastpo.linear_preference_loss(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="bias must have shape"):
        pyfastpo.linear_preference_loss(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="share a dtype"):
        pyfastpo.linear_preference_loss(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        pyfastpo.linear_preference_loss(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="even"):
        pyfastpo.linear_preference_loss(hidden[:3], weight, labels[:3])
    bad = labels.clone()
    bad[0, -1] = V
    with pytest.raises(ValueError, match=r"labels must be in \[0, 75\)"):
        pyfastpo.linear_preference_loss(hidden, weight, bad)
    with pytest.raises(ValueError, match="ref_hidden shape"):
        pyfastpo.linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden[:, 1:])


def test_bfloat16_peak_memory_has_no_weight_sized_temporaries():
    """On the CPU the 16-bit path accumulates the weight gradient in place: its peak stays
    within the float32 accumulator, the returned gradient and chunk-sized buffers."""
    n, t, h, v, chunk = 4, 16, 256, 8192, 4
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, t, h, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n, t), generator=g)

    def step():
        out = pyfastpo.linear_preference_loss(hidden, weight, labels, backend="cpp", chunk_tokens=chunk)
        return torch.autograd.grad(out.loss, (hidden, weight))

    _, peak = peak_memory(step)
    # What this torch build's own bf16 CPU matmuls of one chunk (the projection and the
    # hidden gradient) hold beyond their outputs: some oneDNN builds (torch 2.11) pack the
    # weight into a copy. That is the library's memory, not a pyfastpo temporary.
    w = weight.detach()
    h_chunk, g_chunk = hidden.detach()[0, :chunk], torch.randn(chunk, v, generator=g).bfloat16()
    library = max(
        peak_memory(lambda: h_chunk @ w.t())[1] - chunk * v * 2,
        peak_memory(lambda: g_chunk @ w)[1] - chunk * h * 2,
        0,
    )
    accumulator, returned = v * h * 4, v * h * 2
    bound = accumulator + returned + 16 * chunk * v * 4 + hidden.numel() * 4 + library + (1 << 16)
    assert peak <= bound, f"peak {peak} > bound {bound}"


def test_default_chunk_budget_is_per_device_type():
    """1 GiB of chunk logits on CUDA (each chunk rewrites the float32 weight-gradient
    accumulator: small chunks are slow there), 256 MiB elsewhere; explicit values win."""
    from pyfastpo.linear_inputs import chunk_tokens_for as _chunk_tokens

    per_token = 128256 * (2 + 4)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _chunk_tokens(None, None, 128256, torch.bfloat16, cuda) == (1 << 30) // per_token
    assert _chunk_tokens(None, None, 128256, torch.bfloat16, cpu) == (256 << 20) // per_token
    assert _chunk_tokens(None, None, 128256, torch.bfloat16, torch.device("meta")) == (256 << 20) // per_token
    assert _chunk_tokens(None, 1 << 20, 128256, torch.bfloat16, cuda) == 1
    assert _chunk_tokens(7, None, 128256, torch.bfloat16, cuda) == 7
