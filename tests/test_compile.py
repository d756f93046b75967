"""torch.compile: the public functions trace with zero graph breaks on the CPU backends, and
a fullgraph compiled forward + backward matches eager (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from helpers import make_labels, make_logits

import pyfastpo

N, T, V, H = 4, 6, 50, 16
BACKENDS = ["cpp", "reference"]


def _inputs():
    torch.manual_seed(0)
    logits = make_logits(N, T, V)
    labels = make_labels(N, T, V)
    hidden = torch.randn(N, T, H)
    weight = torch.randn(V, H) / H**0.5
    return logits, labels, hidden, weight


def _seq(backend):
    def f(leaf, labels):
        out = pyfastpo.sequence_logps(leaf * 1, labels, backend=backend, return_entropy=True)
        return out.logps.sum() + 0 * out.entropy.sum(), out.logps

    return f


def _fused(backend):
    def f(leaf, labels):
        ref = leaf.detach() + 0.1
        out = pyfastpo.fused_preference_loss(leaf * 1, labels, ref_logits=ref, backend=backend, loss_type="sigmoid")
        return out.loss, out.policy.logps

    return f


def _linear(backend):
    def f(hidden, weight, labels):
        out = pyfastpo.linear_preference_loss(
            hidden, weight, labels, ref_hidden=hidden.detach() * 0.9, backend=backend, chunk_tokens=5
        )
        return out.loss, out.policy.logps

    return f


CASES = {"sequence_logps": _seq, "fused_preference_loss": _fused, "linear_preference_loss": _linear}


def _args(name):
    logits, labels, hidden, weight = _inputs()
    if name == "linear_preference_loss":
        return (hidden.requires_grad_(), weight.requires_grad_(), labels)
    return (logits.requires_grad_(), labels)


def _run(fn, args):
    """(loss, logps, gradients of the differentiable inputs) of one forward + backward."""
    args = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    loss, logps = fn(*args)
    loss.backward()
    return loss.detach(), logps.detach(), [a.grad for a in args if a.requires_grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_zero_graph_breaks(name, backend):
    dynamo.reset()
    explanation = dynamo.explain(CASES[name](backend))(*_args(name))
    assert explanation.graph_break_count == 0, [str(b.reason).split("\n")[0] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compiled_matches_eager(name, backend):
    fn = CASES[name](backend)
    args = _args(name)
    want = _run(fn, args)
    dynamo.reset()
    got = _run(torch.compile(fn, fullgraph=True, dynamic=False), args)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w)


def test_label_out_of_range_raises_from_inside_the_compiled_op():
    logits, labels, _, _ = _inputs()
    labels[1, 2] = V
    compiled = torch.compile(lambda x, y: pyfastpo.sequence_logps(x, y, backend="cpp").logps, fullgraph=True)
    dynamo.reset()
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*labels\[1, 2\] = {V}"):
        compiled(logits, labels)


def test_eager_in_place_backward_is_kept():
    """Eager keeps writing the gradient into the logits' storage (no second buffer)."""
    logits, labels, _, _ = _inputs()
    leaf = logits.requires_grad_()
    x = leaf * 1
    version = x._version
    out = pyfastpo.sequence_logps(x, labels, backend="cpp")
    grads = torch.autograd.grad(out.logps.sum(), x)
    assert grads[0].data_ptr() == x.data_ptr() and x._version > version


def test_compiled_step_memory_and_leaf_safety():
    """Under compile the backward writes a fresh tensor (dynamo does not guard on is_leaf, so
    in place could overwrite a leaf the caller owns): a compiled step's peak is eager's plus
    about one logits-sized buffer, and a leaf passed after a non-leaf stays untouched."""
    from pyfastpo.memory import peak_memory

    n, t, v, h = 4, 32, 4000, 16
    torch.manual_seed(0)
    hidden, weight = torch.randn(n, t, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    labels = make_labels(n, t, v)

    def step(x, w, y):
        return pyfastpo.sequence_logps(x @ w.t(), y, backend="cpp").logps.sum()

    dynamo.reset()
    peaks = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True, dynamic=False))):
        fn(hidden, weight, labels).backward()  # compiles
        peaks[name] = peak_memory(lambda fn=fn: fn(hidden, weight, labels).backward())[1]
    logits_bytes = n * t * v * 4
    assert peaks["compiled"] <= peaks["eager"] + logits_bytes * 5 // 4, (peaks, logits_bytes)

    def loss(logits, y):
        return pyfastpo.sequence_logps(logits, y, backend="cpp").logps.sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=False)
    compiled(hidden @ weight.t(), labels).backward()  # first a non-leaf input
    leaf = torch.randn(n, t, v, requires_grad=True)
    before = leaf.detach().clone()
    compiled(leaf, labels).backward()  # then a leaf: the same graph, no recompile
    assert torch.equal(leaf.detach(), before), "a leaf the caller owns was overwritten"
    want = before.clone().requires_grad_()
    loss(want, labels).backward()
    torch.testing.assert_close(leaf.grad, want.grad)
