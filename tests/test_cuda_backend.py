"""Tests specific to the ``cuda`` backend: the extension's build and its behaviour without a
GPU; the refusal of GPUs older than the compute capability it is compiled for (setup.py:
sm_80, sm_90, sm_100 + compute_100 PTX), after which ``auto`` falls back (torch.cuda's queries
monkeypatched to describe a fake device); and, where a GPU is present, the kernels
against ``reference`` on every dtype, vocabulary shape and row alignment. The kernels'
per-row math is also replayed without a GPU: test_device_emulation.py."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

import pyfastpo
from pyfastpo import backends
from pyfastpo.backends import cuda_backend, reference

BUILT = cuda_backend._cuda is not None
REAL_RUNTIME_REASON = cuda_backend._runtime_reason
needs_extension = pytest.mark.skipif(
    not BUILT, reason="pyfastpo.backends._cuda was not built (no nvcc at install time)"
)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A one-GPU machine whose device 0 has the capability/name given to the returned setter."""

    def set_gpu(capability: tuple[int, int], name: str, *, stand_in_extension: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        if stand_in_extension and not BUILT:
            # the capability check never calls into the extension: any non-None module will do
            monkeypatch.setattr(cuda_backend, "_cuda", object())
        monkeypatch.setattr(cuda_backend, "_runtime_reason", lambda: None)  # the fake GPU's runtime starts

    return set_gpu


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_turing_is_refused_with_what_it_needs(fake_gpu, device):
    fake_gpu((7, 5), "Tesla T4", stand_in_extension=True)
    reason = cuda_backend.unavailable_reason(torch.device(device))
    assert reason is not None
    assert "8.0" in reason and "7.5" in reason and "Tesla T4" in reason and "cuda:0" in reason
    assert "triton" in reason and "reference" in reason


def test_volta_is_refused(fake_gpu):
    fake_gpu((7, 0), "Tesla V100-SXM2-16GB", stand_in_extension=True)
    reason = cuda_backend.unavailable_reason(torch.device("cuda:0"))
    assert reason is not None and "7.0" in reason and "8.0" in reason


def test_missing_device_index_is_refused(fake_gpu):
    fake_gpu((9, 0), "NVIDIA H100 80GB HBM3", stand_in_extension=True)
    reason = cuda_backend.unavailable_reason(torch.device("cuda:3"))
    assert reason is not None and "cuda:3" in reason and "1 CUDA device" in reason


@needs_extension
@pytest.mark.parametrize(
    "capability,name",
    [
        ((8, 0), "NVIDIA A100-SXM4-80GB"),
        ((8, 6), "NVIDIA GeForce RTX 3090"),
        ((8, 9), "NVIDIA L4"),
        ((9, 0), "NVIDIA H100 80GB HBM3"),
        ((10, 0), "NVIDIA B200"),
    ],
)
def test_ampere_and_newer_are_accepted(fake_gpu, capability, name):
    fake_gpu(capability, name)
    assert cuda_backend.unavailable_reason(torch.device("cuda")) is None
    assert cuda_backend.unavailable_reason(torch.device("cuda:0")) is None
    assert backends.get_backend("auto", torch.device("cuda:0"), torch.float32) is cuda_backend


def test_registry_falls_back_on_an_old_gpu(fake_gpu):
    fake_gpu((7, 5), "Tesla T4", stand_in_extension=True)
    device = torch.device("cuda:0")
    assert "7.5" in backends.unavailable_reason("cuda", device)
    assert "cuda" not in backends.available_backends(device)
    chosen = backends.get_backend("auto", device, torch.bfloat16)
    assert chosen is not cuda_backend and chosen.name in ("triton", "reference")
    with pytest.raises(ValueError, match=r"compute capability 8\.0.*7\.5 \(Tesla T4\)"):
        backends.get_backend("cuda", device, torch.bfloat16)


def test_cpu_tensors_are_still_refused_before_any_gpu_query(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("no GPU query for CPU tensors")

    monkeypatch.setattr(torch.cuda, "get_device_capability", boom)
    reason = cuda_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None


def test_a_runtime_that_does_not_start_is_reported_and_auto_falls_back(fake_gpu, monkeypatch):
    """A driver older than the extension's static CUDA runtime: every launch would fail.
    The check runs once (cached) and its reason shows in backend_reasons()."""
    fake_gpu((9, 0), "NVIDIA H100", stand_in_extension=True)
    calls = []

    class OldDriver:
        @staticmethod
        def device_count():
            calls.append(1)
            raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(cuda_backend, "_cuda", OldDriver())
    # The real check, uncached (the fixture stands a passing one in for the fake GPU).
    monkeypatch.setattr(cuda_backend, "_runtime_reason", REAL_RUNTIME_REASON.__wrapped__)
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "insufficient" in reason and "does not start" in reason
    assert "insufficient" in backends.backend_reasons("cuda")["cuda"]
    assert backends.get_backend("auto", torch.device("cuda"), torch.bfloat16).name in ("triton", "reference")
    assert calls


def test_runtime_check_is_cached():
    assert hasattr(cuda_backend._runtime_reason, "cache_info")


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- the CUDA extension


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc") or (home and glob.glob(os.path.join(home, "bin", "nvcc"))))


@pytest.mark.skipif(not _nvcc_present(), reason="nvcc is absent: pyfastpo.backends._cuda is not built by design")
def test_cuda_extension_built_and_clear_without_gpu():
    if os.environ.get("PYFASTPO_NO_CUDA"):
        pytest.skip("PYFASTPO_NO_CUDA is set: the CUDA extension was skipped on purpose")
    from pyfastpo.backends import (
        _cuda,  # built whenever nvcc is present
        cuda_backend,
    )

    if torch.cuda.is_available():
        assert _cuda.device_count() >= 1
        return
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _cuda.device_count()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _cuda.forward(0, 0, 1, 1, 1, 1, 1, 0, -100, 0, False, 0, 0)
    assert cuda_backend.unavailable_reason(torch.device("cuda")) is not None
    with pytest.raises(ValueError, match="not available"):
        pyfastpo.sequence_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 17, 4099, 32000, 50257])
def test_cuda_backend_vs_reference(dtype, vocab):
    from pyfastpo.backends import cuda_backend

    torch.manual_seed(vocab)
    full = (torch.randn(3, 9, vocab, device="cuda") * 3).to(dtype)
    # A row padded to a multiple of 64 (16-byte aligned rows, so the vector path, with a
    # scalar tail when vocab % K != 0) and the same starting one element in (misaligned
    # base pointer: the scalar path).
    padded = (torch.randn(3, 9, (vocab + 1 + 63) // 64 * 64, device="cuda") * 3).to(dtype)
    views = (full, full[:, :-1], padded[..., :vocab], padded[..., 1 : vocab + 1])
    for x in views:
        y = torch.randint(0, vocab, x.shape[:2], device="cuda")
        y[0, 1] = -100
        ref = reference.forward(x, y, -100)
        got = cuda_backend.forward(x, y, -100)
        for name in ("logp", "entropy"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=2e-4)
        # A sum of V logits cancels: its float32 rounding scales with sum |x|, not with the
        # result (50257 float32 logits of std 3 on an H100: 4 ulps of the partial sums, 2.4e-4).
        l1 = x.float().abs().sum(-1)
        diff = (got.sum_logits - ref.sum_logits).abs()
        assert bool((diff <= 2e-4 + 2 * torch.finfo(torch.float32).eps * l1).all()), diff.max()
        g = torch.randn(3, device="cuda")
        want = torch.empty_like(x)
        reference.backward(x, y, ref.row_max, ref.log_sum, g, -100, want)
        out = torch.full_like(x, float("nan"))
        cuda_backend.backward(x, y, got.row_max, got.log_sum, g, -100, out)
        torch.testing.assert_close(out, want, **({} if dtype != torch.float32 else {"rtol": 1e-5, "atol": 1e-6}))
        inplace = x.clone()
        cuda_backend.backward(inplace, y, got.row_max, got.log_sum, g, -100, inplace)
        assert torch.equal(inplace, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_past_2_31_elements(name):
    """N*T*V above 2^31 (64-bit offsets between rows; a 32-bit one would wrap): the last rows,
    far past element 2^31, match ``reference`` in the forward and the in-place backward."""
    from pyfastpo.backends import get_backend

    impl = get_backend(name, torch.device("cuda"), torch.bfloat16)
    n, t, v = 2, 8400, 128256  # 2.15e9 elements, 4.3 GB in bfloat16
    assert n * t * v > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, t, v, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.randint(0, v, (n, t), device="cuda", generator=gen)
    tail = slice(t - 8, t)
    x_tail, y_tail = x[:, tail].clone(), y[:, tail].contiguous()
    got = impl.forward(x, y, -100)
    ref = reference.forward(x_tail, y_tail, -100)
    for field in ("logp", "row_max", "log_sum", "entropy"):
        torch.testing.assert_close(getattr(got, field)[:, tail], getattr(ref, field), rtol=1e-5, atol=2e-4)
    g = torch.randn(n, device="cuda", generator=gen)
    impl.backward(x, y, got.row_max.contiguous(), got.log_sum.contiguous(), g, -100, x)
    want = torch.empty_like(x_tail)
    reference.backward(x_tail, y_tail, ref.row_max, ref.log_sum, g, -100, want)
    torch.testing.assert_close(x[:, tail], want)
