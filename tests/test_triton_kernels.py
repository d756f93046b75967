"""Kernel-level tests of the Triton backend (block boundaries, online rescaling,
dtypes, extreme logits, in-place backward, ignored rows, strides).

Runs on a GPU when there is one, else under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). Sizes are small: the
interpreter executes every program in Python. The oracle is
:mod:`pyfastpo.backends.reference` on the same values in float64.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import pyfastpo  # noqa: E402
from pyfastpo.backends import reference, triton_backend  # noqa: E402
from pyfastpo.kernels.config import launch_config  # noqa: E402
from pyfastpo.kernels.logps_backward import logps_backward  # noqa: E402
from pyfastpo.kernels.logps_forward import logps_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
BLOCK = 16  # the block size these tests force, so that boundaries sit at small V
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(n, t, v, dtype=torch.float32, scale=3.0, seed=0, ignore_frac=0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < ignore_frac] = IGNORE
    labels[0, 0] = 0 if v > 0 else IGNORE  # at least one valid token, at column 0
    return logits.to(DEVICE), labels.to(DEVICE)


def oracle(logits, labels, grad_scale):
    """Reference stats and gradient (float64) of the exact values in ``logits``."""
    x = logits.double()
    stats = reference.forward(x, labels, IGNORE)
    grad = torch.empty_like(x)
    reference.backward(x, labels, stats.row_max, stats.log_sum, grad_scale.double(), IGNORE, grad)
    return stats, grad


def run_triton(logits, labels, grad_scale, block_v=BLOCK, out=None):
    n, t, _ = logits.shape
    stats = [s.view(n, t) for s in logps_forward(logits, labels, IGNORE, block_v=block_v)]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    logps_backward(logits, labels, stats[1], stats[2], grad_scale, IGNORE, out, block_v=block_v)
    return stats, out


def grad_tol(dtype):
    """Gradient tolerance: float32 rounding of exp((x - m) - log s), or one 16-bit rounding."""
    return dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=2**-7)


def check(logits, labels, block_v=BLOCK, atol=2e-5, rtol=1e-5):
    grad_scale = torch.randn(logits.shape[0], device=logits.device)
    (logp, m, log_s, ent, zsum), grad = run_triton(logits, labels, grad_scale, block_v)
    ref, ref_grad = oracle(logits, labels, grad_scale)
    valid = labels != IGNORE
    pairs = (("logp", logp, ref.logp), ("entropy", ent, ref.entropy), ("sum_logits", zsum, ref.sum_logits))
    for name, got, want in pairs:
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=name)
        assert torch.all(got[~valid] == 0), name  # exactly 0 at ignored tokens
    torch.testing.assert_close(m[valid].double(), ref.row_max[valid], atol=0, rtol=0)
    torch.testing.assert_close(log_s[valid].double(), ref.log_sum[valid], atol=atol, rtol=rtol)
    # The gradient in the logits' dtype: one rounding of the float32 value.
    assert grad.dtype == logits.dtype
    torch.testing.assert_close(grad.double(), ref_grad.to(logits.dtype).double(), **grad_tol(logits.dtype))
    assert torch.all(grad[~valid] == 0)


@pytest.mark.parametrize("v", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_block_boundaries(v):
    logits, labels = make_inputs(2, 3, v, seed=v)
    labels[1, 2] = v - 1  # the last column as a target
    check(logits, labels)


@pytest.mark.parametrize("descending", [False, True])
def test_online_rescale_across_blocks(descending):
    # Sorted rows: ascending, the max grows in every block (a rescale at each step);
    # descending, the first block holds it. Wide spread so the rescales matter.
    logits, labels = make_inputs(2, 2, 5 * BLOCK + 3, scale=20.0, seed=1)
    logits = logits.sort(dim=-1, descending=descending).values
    check(logits, labels, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(dtype):
    logits, labels = make_inputs(2, 3, 2 * BLOCK + 7, dtype=dtype, seed=2)
    check(logits, labels)


def test_target_gradient_in_float32_for_16bit():
    # p_y ~ 1: g * (1 - p_y) must be computed before rounding to bf16, not as g - g*p_y.
    logits, labels = make_inputs(1, 2, 40, dtype=torch.bfloat16, scale=1.0, ignore_frac=0.0, seed=3)
    logits[0, :, 7] = 10.0  # 1 - p_y ~ 3e-3, below bf16's spacing near 1 (2**-8)
    labels[:] = 7
    g = torch.ones(1, device=logits.device)
    _, grad = run_triton(logits, labels, g)
    _, ref_grad = oracle(logits, labels, g)
    assert torch.all(grad[0, :, 7] > 0)
    torch.testing.assert_close(grad.double(), ref_grad.bfloat16().double(), atol=1e-20, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite(dtype):
    logits, labels = make_inputs(2, 3, 3 * BLOCK + 1, dtype=dtype, scale=1e4, seed=4)
    grad_scale = torch.randn(2, device=logits.device)
    stats, grad = run_triton(logits, labels, grad_scale)
    for s in stats:
        assert torch.isfinite(s).all()
    assert torch.isfinite(grad).all()
    ref, _ = oracle(logits, labels, grad_scale)
    # logp = (x_y - m) - log s and the entropy are kept relative to the max, so
    # they are accurate in absolute terms even at logits of size 1e4.
    torch.testing.assert_close(stats[0].double(), ref.logp, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(stats[3].double(), ref.entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(stats[4].double(), ref.sum_logits, atol=0.5, rtol=1e-6)


def test_minus_inf_logits():
    # A masked vocabulary: whole leading blocks of -inf, then finite values.
    logits, labels = make_inputs(1, 3, 4 * BLOCK, seed=5, ignore_frac=0.0)
    logits[0, 0, : 2 * BLOCK + 3] = float("-inf")
    logits[0, 1, BLOCK:] = float("-inf")
    labels[0] = torch.tensor([3 * BLOCK, 2, 5])
    grad_scale = torch.ones(1, device=logits.device)
    (logp, m, log_s, ent, _), grad = run_triton(logits, labels, grad_scale)
    ref, ref_grad = oracle(logits, labels, grad_scale)
    for got, want in ((logp, ref.logp), (m, ref.row_max), (log_s, ref.log_sum), (ent, ref.entropy)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, **grad_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place(dtype):
    logits, labels = make_inputs(2, 4, 2 * BLOCK + 3, dtype=dtype, seed=6)
    grad_scale = torch.randn(2, device=logits.device)
    (_, m, log_s, _, _), fresh = run_triton(logits, labels, grad_scale)
    inplace = logits.clone()
    logps_backward(inplace, labels, m.view(2, 4), log_s.view(2, 4), grad_scale, IGNORE, inplace, block_v=BLOCK)
    assert torch.equal(inplace, fresh)


def test_ignored_rows_zero_gradient_over_garbage():
    logits, labels = make_inputs(3, 4, 2 * BLOCK + 1, seed=7)
    labels[1] = IGNORE  # a whole sequence ignored
    labels[2, 1:3] = IGNORE
    out = torch.full_like(logits, float("nan"))
    grad_scale = torch.randn(3, device=logits.device)
    (logp, _, _, ent, zsum), grad = run_triton(logits, labels, grad_scale, out=out)
    ignored = labels == IGNORE
    assert torch.all(grad[ignored] == 0)
    assert torch.isfinite(grad).all()
    for s in (logp, ent, zsum):
        assert torch.all(s[1] == 0)


def test_ignored_rows_are_never_read():
    # NaN logits in ignored rows must not leak into anything.
    logits, labels = make_inputs(2, 3, BLOCK + 2, seed=8)
    labels[0, 1] = IGNORE
    labels[1, 0] = IGNORE
    logits[0, 1] = float("nan")
    logits[1, 0] = float("nan")
    check(logits, labels)


def test_strided_logits_and_out():
    # logits[:, :-1] is a view (stride_n != T * V); out is a view into a wider buffer.
    base, labels = make_inputs(2, 5, 2 * BLOCK + 3, seed=9)
    logits, labels = base[:, :-1], labels[:, 1:].contiguous()
    assert not logits.is_contiguous()
    grad_scale = torch.randn(2, device=base.device)
    wide = torch.full((2, 4, 3 * BLOCK), float("nan"), device=base.device)
    out = wide[:, :, 5 : 5 + logits.shape[-1]]
    (logp, _, _, ent, _), grad = run_triton(logits, labels, grad_scale, out=out)
    ref, ref_grad = oracle(logits, labels, grad_scale)
    torch.testing.assert_close(logp.double(), ref.logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref.entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_grad, **grad_tol(torch.float32))
    assert torch.isnan(wide[:, :, :5]).all() and torch.isnan(wide[:, :, 5 + logits.shape[-1] :]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_launch_config(dtype):
    # No block override: the table's own block (one block covering V here).
    logits, labels = make_inputs(2, 2, 300, dtype=dtype, seed=10)
    check(logits, labels, block_v=None)


def test_launch_config_table():
    for dtype, cap in ((torch.float32, 2048), (torch.bfloat16, 4096), (torch.float16, 4096)):
        for v in (1, 7, 256, 1000, 32000, 128256, 262144):
            block, warps = launch_config(v, dtype)
            assert block & (block - 1) == 0 and block == min(triton.next_power_of_2(v), cap)
            assert 1 <= warps <= 8 and warps & (warps - 1) == 0
        assert launch_config(262144, dtype) == (cap, 8)
    with pytest.raises(ValueError):
        launch_config(100, torch.float32, block_v=24)
    assert launch_config(32000, torch.bfloat16, 1024, num_warps=2) == (1024, 2)
    with pytest.raises(ValueError, match="num_warps"):
        launch_config(100, torch.float32, num_warps=3)


def test_warps_override_gives_the_same_numbers():
    """The GPU check sweeps BLOCK_V x num_warps: every configuration computes the same thing."""
    logits, labels = make_inputs(2, 3, 300, dtype=torch.float32, seed=11)
    base = logps_forward(logits, labels, IGNORE, block_v=64)
    other = logps_forward(logits, labels, IGNORE, block_v=64, num_warps=1)
    for a, b in zip(base, other):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_empty_inputs():
    logits = torch.randn(0, 3, 10, device=DEVICE)
    labels = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    stats = triton_backend.forward(logits, labels, IGNORE)
    assert stats.log_sum_sq is None and all(s.shape == (0, 3) for s in stats[:5])
    triton_backend.backward(logits, labels, stats.row_max, stats.log_sum, torch.ones(0, device=DEVICE), IGNORE, logits)


def test_unavailable_reason(monkeypatch):
    cuda_reason = triton_backend.unavailable_reason(torch.device("cuda"))
    assert (cuda_reason is None) == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in triton_backend.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_public_api_matches_reference(dtype, inplace):
    leaf, labels = make_inputs(4, 3, 50, dtype=dtype, seed=11)
    weights = torch.randn(4, device=leaf.device)
    results = {}
    for backend in ("triton", "reference"):
        x = leaf.detach().clone().requires_grad_(True)
        logits = x * 1.0  # non-leaf, so inplace_backward actually applies
        out = pyfastpo.sequence_logps(logits, labels, backend=backend, return_entropy=True, inplace_backward=inplace)
        (out.logps * weights).sum().backward()
        results[backend] = (out, x.grad)
    (got, got_grad), (want, want_grad) = results["triton"], results["reference"]
    torch.testing.assert_close(got.logps, want.logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.mean_logits, want.mean_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.num_tokens, want.num_tokens)
    torch.testing.assert_close(got_grad, want_grad, **grad_tol(dtype))


@pytest.mark.parametrize("block_v", [16, 64])
def test_log_sum_sq_across_blocks(block_v):
    """WPO's statistic with several blocks and a masked tail (V = 53), a masked vocabulary
    (-inf logits) and an ignored token, against float64."""
    from pyfastpo.kernels.logps_forward import logps_forward

    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 3, 53, generator=g) * 4).to(DEVICE)
    logits[0, 1, 40:] = float("-inf")
    labels = torch.randint(0, 40, (2, 3), generator=g).to(DEVICE)
    labels[1, 2] = IGNORE
    got = logps_forward(logits, labels, IGNORE, block_v=block_v, log_sum_sq=True)[5].view(2, 3)
    x = logits.double()
    want = (torch.logsumexp(2 * x, -1) - 2 * torch.logsumexp(x, -1)) * (labels != IGNORE)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
