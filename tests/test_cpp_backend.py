"""Tests specific to the ``cpp`` backend (the CUDA backend's: test_cuda_backend.py).

The shared parametrized backend-vs-reference tests live in test_sequence_logps.py;
these cover what is particular to the CPU driver of csrc/: the header's 16-bit
conversions and vectorized exp, lane/block boundaries of the CPU loops, every ISA
variant, in-place backward and extreme logits.
"""

from __future__ import annotations

import pytest
import torch

import pyfastpo
from pyfastpo.backends import _C, cpp_backend, native, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _supported(isa: str) -> bool:
    try:
        _C.set_isa(isa)
        return True
    except RuntimeError:
        return False
    finally:
        _C.set_isa("")


ISAS = [isa for isa in ("default", "avx2", "avx512") if _supported(isa)]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test with each instruction-set variant of the row kernels this CPU has."""
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa("")


def _check_against_reference(x, y, ignore_index=-100, grad_dtype_tol=None):
    """Forward stats and backward gradient of ``cpp`` vs ``reference`` on the same inputs."""
    ref = reference.forward(x, y, ignore_index)
    got = cpp_backend.forward(x, y, ignore_index)
    valid = y != ignore_index
    for name in ("logp", "entropy", "sum_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=2e-4, msg=name)
    torch.testing.assert_close(got.row_max[valid], ref.row_max[valid], rtol=0, atol=0)
    torch.testing.assert_close(got.log_sum[valid], ref.log_sum[valid], rtol=1e-5, atol=1e-5)
    g = torch.randn(x.shape[0])
    want = torch.empty_like(x)
    reference.backward(x, y, ref.row_max, ref.log_sum, g, ignore_index, want)
    out = torch.full_like(x, float("nan"))  # every element must be written
    cpp_backend.backward(x, y, got.row_max, got.log_sum, g, ignore_index, out)
    tol = {"rtol": 1e-5, "atol": 1e-6} if grad_dtype_tol is None else grad_dtype_tol
    torch.testing.assert_close(out, want, **tol)
    return got, out


# ---------------------------------------------------------------- header helpers


def _special_floats():
    x = torch.cat(
        [
            torch.randn(20000) * torch.logspace(-10, 10, 20000),  # wide magnitudes
            torch.randn(5000) * 1e-6,  # fp16 subnormal range
            torch.tensor(
                [
                    0.0,
                    -0.0,
                    65504.0,
                    65520.0,
                    1e6,
                    -1e6,
                    6e-8,
                    3e-8,
                    2.9e-8,
                    float("inf"),
                    float("-inf"),
                    3.0e38,
                    -3.0e38,
                    1e-40,
                ]
            ),
        ]
    )
    # Exact ties between two 16-bit neighbours test round-to-nearest-even.
    ties = (torch.randint(0, 1 << 15, (2000,), dtype=torch.int32) << 16) | 0x8000
    ties_h = (torch.randint(0x0400, 0x7B00, (2000,), dtype=torch.int32) << 13) | 0x1000
    return torch.cat([x, ties.view(torch.float32), ties_h.view(torch.float32) + 0.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_float_matches_torch_rounding(dtype):
    x = _special_floats()
    got = torch.empty(x.shape, dtype=dtype)
    _C.from_float(x.data_ptr(), got.data_ptr(), native.dtype_code(dtype), x.numel())
    want = x.to(dtype)
    keep = ~x.isnan()  # NaN payloads may differ; NaN-ness is checked below
    assert torch.equal(got.view(torch.int16)[keep], want.view(torch.int16)[keep])
    nan = torch.tensor([float("nan"), -float("nan")])
    got_nan = torch.empty(2, dtype=dtype)
    _C.from_float(nan.data_ptr(), got_nan.data_ptr(), native.dtype_code(dtype), 2)
    assert got_nan.isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_float_all_bit_patterns(dtype):
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    h = bits.view(dtype)
    got = torch.empty(h.shape, dtype=torch.float32)
    _C.to_float(h.data_ptr(), native.dtype_code(dtype), got.data_ptr(), h.numel())
    torch.testing.assert_close(got, h.float(), rtol=0, atol=0, equal_nan=True)
    # And back: every non-NaN 16-bit value survives a round trip exactly.
    back = torch.empty_like(h)
    _C.from_float(got.data_ptr(), back.data_ptr(), native.dtype_code(dtype), h.numel())
    keep = ~h.isnan()
    assert torch.equal(back.view(torch.int16)[keep], bits[keep])


def test_vectorized_exp_accuracy():
    x = torch.cat([torch.linspace(-87.3, 88.0, 200001), torch.rand(100000) * -20, torch.randn(1000) * 1e-3])
    got = torch.empty_like(x)
    _C.exp(x.data_ptr(), got.data_ptr(), x.numel())
    want = torch.exp(x.double())
    rel = ((got.double() - want) / want).abs().max().item()
    assert rel < 2.5e-7, rel  # ~2 ulp of float32
    edge = torch.tensor([-87.5, -100.0, -1e30, float("-inf")])
    out = torch.empty_like(edge)
    _C.exp(edge.data_ptr(), out.data_ptr(), edge.numel())
    assert torch.equal(out, torch.zeros(4))  # exact zeros below the float32 range, no denormals


# ---------------------------------------------------------------- the row kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1023, 1024, 1025, 4099])
def test_lane_and_block_boundaries(isa, dtype, vocab):
    torch.manual_seed(vocab)
    x = (torch.randn(3, 7, vocab) * 3).to(dtype)
    y = torch.randint(0, vocab, (3, 7))
    y[0, 2] = y[2, 6] = -100
    _check_against_reference(x, y, grad_dtype_tol=None if dtype == torch.float32 else {})


def test_strided_view_and_custom_ignore_index(isa):
    torch.manual_seed(1)
    full = torch.randn(4, 9, 300)
    x = full[:, :-1]  # a view: stride(1) == V, stride(0) == 9 * V
    y = torch.randint(0, 300, (4, 8))
    y[1, :3] = 7_000
    _check_against_reference(x, y, ignore_index=7_000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_equals_out_of_place(isa, dtype):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 2053).to(dtype)
    y = torch.randint(0, 2053, (2, 6))
    y[1, 0] = -100
    stats = cpp_backend.forward(x, y, -100)
    g = torch.randn(2)
    out = torch.empty_like(x)
    cpp_backend.backward(x, y, stats.row_max, stats.log_sum, g, -100, out)
    inplace = x.clone()
    cpp_backend.backward(inplace, y, stats.row_max, stats.log_sum, g, -100, inplace)
    assert torch.equal(inplace.view(torch.uint8), out.view(torch.uint8))


def test_huge_and_infinite_logits(isa):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 1000) * 1e4
    x[0, 0, ::3] = float("-inf")  # masked vocabulary entries
    y = torch.randint(0, 1000, (2, 5))
    y[0, 0] = 1  # a finite column
    got = cpp_backend.forward(x, y, -100)
    for t in (got.logp, got.row_max, got.log_sum, got.entropy):
        assert torch.isfinite(t).all()
    assert got.sum_logits[0, 0] == float("-inf") and torch.isfinite(got.sum_logits[1]).all()
    ref = reference.forward(x.double(), y, -100)
    torch.testing.assert_close(got.logp.double(), ref.logp, rtol=1e-6, atol=1e-2)
    # The shifted entropy keeps its digits where lse - E[x] in float32 would not.
    torch.testing.assert_close(got.entropy.double(), ref.entropy, rtol=0, atol=1e-4)
    out = torch.empty_like(x)
    cpp_backend.backward(x, y, got.row_max, got.log_sum, torch.ones(2), -100, out)
    assert torch.isfinite(out).all()
    want = torch.empty_like(x, dtype=torch.float64)
    reference.backward(x.double(), y, ref.row_max, ref.log_sum, torch.ones(2, dtype=torch.float64), -100, want)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_out_of_range_labels_are_ignored_by_the_kernel():
    """Python validates labels first; the kernel still never reads outside the row."""
    x = torch.randn(1, 3, 10)
    y = torch.tensor([[10, -5, 3]])
    stats = torch.full((5, 1, 3), float("nan"))
    _C.forward(x.data_ptr(), 0, 1, 3, 10, x.stride(0), x.stride(1), y.data_ptr(), -100, stats.data_ptr())
    assert torch.equal(stats[:, 0, :2], torch.zeros(5, 2))
    out = torch.full_like(x, float("nan"))
    _C.backward(
        x.data_ptr(),
        0,
        1,
        3,
        10,
        x.stride(0),
        x.stride(1),
        y.data_ptr(),
        stats[1].data_ptr(),
        stats[2].data_ptr(),
        torch.ones(1).data_ptr(),
        -100,
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
    )
    assert torch.equal(out[0, :2], torch.zeros(2, 10))
    assert torch.isfinite(out[0, 2]).all()


def test_deterministic():
    x = torch.randn(4, 16, 3001)
    y = torch.randint(0, 3001, (4, 16))
    a = cpp_backend.forward(x, y, -100, log_sum_sq=True)
    b = cpp_backend.forward(x, y, -100, log_sum_sq=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    plain = cpp_backend.forward(x, y, -100)
    assert plain.log_sum_sq is None and all(torch.equal(p, q) for p, q in zip(plain[:5], a[:5]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_cpp_vs_reference(dtype):
    torch.manual_seed(4)
    base = torch.randn(4, 12, 517)
    labels = torch.randint(0, 517, (4, 12))
    labels[:, :4] = -100
    results = {}
    for backend in ("reference", "cpp"):
        leaf = base.clone().to(dtype).requires_grad_()
        logits = leaf * 1.0  # non-leaf: exercises the in-place backward
        res = pyfastpo.sequence_logps(logits, labels, backend=backend, return_entropy=True)
        (res.logps * torch.arange(1.0, 5.0)).sum().backward()
        results[backend] = (res, leaf.grad)
    (ref, ref_grad), (got, got_grad) = results["reference"], results["cpp"]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_grad, ref_grad, **({} if dtype != torch.float32 else {"rtol": 1e-5, "atol": 1e-6}))


def test_cpp_is_the_cpu_default():
    assert "cpp" in pyfastpo.available_backends("cpu")
    assert cpp_backend.unavailable_reason(torch.device("meta")) is not None
