"""No host synchronization inside a training step (issue 14, item 6).

On the CPU: the label check's two modes (:func:`pyfastpo.set_label_check`), and a
profiler audit showing that in ``"async"`` mode a forward+backward runs no op that
would read a GPU value back to the host. ``torch._assert_async`` is exempt: on a CPU
it reads its flag back, but on a GPU it is a device-side assert. On a GPU:
``torch.cuda.set_sync_debug_mode("error")`` around a step, ``torch.compile(mode=
"reduce-overhead")`` (CUDA graphs) against eager, and a clear error where a path
must synchronize.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import pyfastpo

# Ops that read a device value back to the host (a synchronization on a GPU).
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::equal",
    "aten::_unique2",
    "aten::unique_consecutive",
}


@pytest.fixture
def label_check():
    """Set the label check mode for one test; restore the previous mode afterwards."""
    previous = pyfastpo.set_label_check("sync")
    yield pyfastpo.set_label_check
    pyfastpo.set_label_check(previous)


def make(device="cpu", dtype=torch.float32, n=4, t=12, v=101):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, t, v, generator=g) * 2).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    return logits, labels.to(device)


def host_readbacks(fn) -> list[str]:
    """Names of the ops run by ``fn()`` that read a device value back, except under
    ``aten::_assert_async``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = []
    for e in prof.events():
        if e.name not in SYNC_OPS:
            continue
        parent, exempt = e.cpu_parent, False
        while parent is not None:
            exempt |= parent.name == "aten::_assert_async"
            parent = parent.cpu_parent
        if not exempt:
            found.append(e.name)
    return found


def step_sequence_logps(logits, labels, backend):
    x = logits.clone().requires_grad_()
    pyfastpo.sequence_logps(x * 1, labels, backend=backend).logps.sum().backward()
    return x.grad


def step_fused(logits, labels, backend):
    x = logits.clone().requires_grad_()
    out = pyfastpo.fused_preference_loss(x * 1, labels, ref_logits=logits + 0.25, backend=backend)
    out.loss.backward()
    return out.loss.detach(), x.grad


def test_set_label_check_returns_the_previous_mode_and_refuses_others(label_check):
    assert label_check("async") == "sync"
    assert label_check("sync") == "async"
    with pytest.raises(ValueError, match="label check mode must be one of"):
        label_check("off")


@pytest.mark.parametrize("step", [step_sequence_logps, step_fused])
def test_async_mode_reads_nothing_back(step, label_check):
    logits, labels = make()
    assert "aten::is_nonzero" in host_readbacks(lambda: step(logits, labels, "cpp"))  # the audit sees the check
    label_check("async")
    assert host_readbacks(lambda: step(logits, labels, "cpp")) == []


def test_async_mode_gives_the_same_numbers(label_check):
    logits, labels = make()
    want = step_fused(logits, labels, "cpp")
    label_check("async")
    got = step_fused(logits, labels, "cpp")
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.parametrize("compiled", [False, True])
def test_async_mode_still_refuses_a_bad_label(compiled, label_check):
    logits, labels = make()
    labels[2, 5] = logits.shape[-1]
    label_check("async")

    def logps(x, y):
        return pyfastpo.sequence_logps(x, y, backend="cpp").logps

    fn = torch.compile(logps, fullgraph=True, backend="aot_eager") if compiled else logps
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 101\)"):
        fn(logits, labels)
    h, w = torch.randn(4, 12, 8), torch.randn(101, 8)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 101\)"):
        pyfastpo.linear_preference_loss(h, w, labels, backend="cpp")


def test_the_synchronizing_linear_ops_are_left_out_of_cuda_graphs():
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    for op in (torch.ops.pyfastpo.linear_sequence_logps, torch.ops.pyfastpo.linear_sequence_logps_backward):
        assert tag in op.default.tags
    assert tag not in torch.ops.pyfastpo.sequence_logps.default.tags  # the logits path is captured


# ---------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in pyfastpo.available_backends("cuda")]


@cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_step_never_synchronizes(backend, label_check):
    logits, labels = make("cuda", torch.bfloat16, v=32000)
    label_check("async")
    step_fused(logits, labels, backend)  # warm-up: kernel compilation and loading may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step_sequence_logps(logits, labels, backend)
        step_fused(logits, labels, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reduce_overhead_compile_matches_eager(backend, label_check):
    logits, labels = make("cuda", torch.bfloat16, v=32000)
    label_check("async")
    want = step_fused(logits, labels, backend)

    def loss(x, ref):
        return pyfastpo.fused_preference_loss(x * 1, labels, ref_logits=ref, backend=backend).loss

    compiled = torch.compile(loss, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        x = logits.clone().requires_grad_()
        got = compiled(x, logits + 0.25)
        got.backward()
    torch.testing.assert_close(got.detach(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want[1], rtol=1.6e-2, atol=1e-5)


@cuda
def test_capturing_a_synchronizing_path_fails_clearly():
    logits, labels = make("cuda")
    h, w = torch.randn(4, 12, 8, device="cuda"), torch.randn(101, 8, device="cuda")
    for fn in (
        lambda: pyfastpo.sequence_logps(logits, labels, backend="reference"),
        lambda: pyfastpo.linear_preference_loss(h, w, labels),
    ):
        with pytest.raises(RuntimeError, match="forbids"), torch.cuda.graph(torch.cuda.CUDAGraph()):
            fn()
