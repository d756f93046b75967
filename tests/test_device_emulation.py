"""The CUDA kernels' math, checked on the CPU: ``pyfastpo.backends._C`` carries a host replay of
``cuda_logps.cu``'s per-row forward and backward compiled from the same header with the
device's exp and max (``csrc/device_emulation.cpp``): ex2 with a flush to zero,
fmaxf, the base-2 fast pass (4 16-byte vectors per re-base) and the exact pass that
redoes a row the fast pass cannot finish, NaNs counted only when a row's sum is NaN,
the target column fixed up after the row. Host and device must agree on every row,
special ones included: before the fix the device's ``expf`` returned subnormals
(``expf(-100) = 3.8e-44``) where the host returns 0, so a row of only -inf logits got
entropy ~0.017 and a +inf row a finite entropy on CUDA while the CPU gave NaN."""

from __future__ import annotations

import pytest
import torch

from pyfastpo.backends import _C, cpp_backend

EXP_LO = -87.33654  # PFPO_EXP_LO in csrc/logps_math.h
UNROLL = 4  # kUnroll in csrc/cuda_logps.cu: 16-byte vectors per step of a thread


def device_forward(row: torch.Tensor, y: int, threads: int, offset: int = 0, log_sum_sq: bool = False) -> list[float]:
    """The emulated kernel on ``row`` placed ``offset`` floats past a 16-byte boundary
    (the kernel peels the elements before the next boundary); ``log_sum_sq``: WPO's
    instantiation, one value more at the end."""
    buf = torch.empty(row.numel() + 8, dtype=torch.float32)
    base = (-(buf.data_ptr() // 4)) % 4  # first 16-byte aligned element of buf
    view = buf[base + offset : base + offset + row.numel()]
    view.copy_(row.float())
    assert view.data_ptr() % 16 == 4 * offset
    return _C.emulate_device_forward(view.data_ptr(), view.numel(), y, threads, log_sum_sq)


def host_forward(row: torch.Tensor, y: int) -> list[float]:
    stats = cpp_backend.forward(row.float().view(1, 1, -1), torch.tensor([[y]]), -100)
    return [float(s) for s in stats[:5]]


def _rows():
    g = torch.Generator().manual_seed(0)
    v = 1003  # odd: a scalar tail after the 16-byte vectors
    rand = lambda: torch.randn(v, generator=g) * 4  # noqa: E731
    masked = rand()
    masked[::3] = float("-inf")
    subnormal_range = torch.zeros(v)
    subnormal_range[1:] = -torch.linspace(85.0, 105.0, v - 1)  # shifts where expf is subnormal
    rows = {
        "random": rand(),
        "masked -inf": masked,
        "shifts around the subnormal range": subnormal_range,
        "huge finite of both signs": torch.tensor([1e35, -1e35]).repeat(v // 2 + 1)[:v],
        "offset 1e6": rand() + 1e6,
        "offset 3e7 (past the base-2 fast range)": rand() + 3e7,
        "offset 1.6e7 (|c| near 1)": rand() + 1.6e7,
        "offset -1.6e7": rand() - 1.6e7,
        "one logit -3e38 (x log2e overflows)": torch.cat([rand()[:-1], torch.tensor([-3e38])]),
        "long, 4-vector steps": torch.randn(8003, generator=g) * 4,
        "all -inf": torch.full((v,), float("-inf")),
    }
    for name, where in (("+inf", 17), ("NaN", 400)):
        r = rand()
        r[where] = float("inf") if name == "+inf" else float("nan")
        rows[name] = r
    return rows


ROWS = _rows()


def test_unroll_matches_the_kernel():
    import pathlib
    import re

    source = (pathlib.Path(__file__).parents[1] / "csrc" / "cuda_logps.cu").read_text()
    emulation = (pathlib.Path(__file__).parents[1] / "csrc" / "device_emulation.cpp").read_text()
    pattern = r"constexpr int kUnroll = (\d+);"
    assert int(re.search(pattern, source).group(1)) == int(re.search(pattern, emulation).group(1)) == UNROLL


def test_one_exp_constant_everywhere():
    import pathlib
    import re

    header = (pathlib.Path(__file__).parents[1] / "csrc" / "logps_math.h").read_text()
    value = float(re.search(r"PFPO_EXP_LO = (-[0-9.]+)f;", header).group(1))
    from pyfastpo.kernels.flushed_exp import EXP_LO as triton_lo

    assert value == EXP_LO == float(getattr(triton_lo, "value", triton_lo))


def test_device_exp_follows_the_host_rule():
    x = torch.cat([torch.linspace(-120, 88, 20001), torch.tensor([EXP_LO, float("-inf"), float("nan")])])
    host, device = torch.empty_like(x), torch.empty_like(x)
    _C.exp(x.data_ptr(), host.data_ptr(), x.numel())
    _C.device_exp(x.data_ptr(), device.data_ptr(), x.numel())
    nan = torch.isnan(x)
    low = (x < EXP_LO) | nan
    assert torch.all(host[low] == 0) and torch.all(device[low & ~nan] == 0), "exactly 0, never a subnormal"
    assert torch.isnan(device[nan]).all(), "the device's ex2 keeps NaN (only undefined rows reach it)"
    tiny = torch.finfo(torch.float32).tiny
    assert torch.all(device[~low] >= tiny) and torch.all(host[~low] >= tiny)
    # The device computes 2^(x log2 e): rounding x log2 e costs ~|x| 6e-8 relative (ex2.approx
    # adds ~2^-22 on the GPU itself, which this host emulation does not reproduce).
    rel = (host[~low].double() - device[~low].double()).abs() / host[~low].double()
    assert torch.all(rel <= 3e-7 + x[~low].double().abs() * 1e-7)


@pytest.mark.parametrize("threads,offset", [(128, 0), (256, 0), (512, 0), (128, 1), (256, 3)])
@pytest.mark.parametrize("name", list(ROWS))
def test_device_forward_matches_host(name, threads, offset):
    row = ROWS[name]
    y = 1 if name != "huge finite of both signs" else 0
    dev, host = device_forward(row, y, threads, offset), host_forward(row, y)
    labels = ("logp", "row_max", "log_sum", "entropy", "sum_logits")
    for label, d, h in zip(labels, dev, host):
        if label == "sum_logits" and name == "huge finite of both signs":
            continue  # inf - inf: NaN or +-inf depending on the summation order, a metric only
        assert (d != d) == (h != h), (label, d, h)  # NaN in both or neither
        if h == h:
            assert d == pytest.approx(h, rel=2e-5, abs=2e-5), (label, d, h)
    undefined = name in ("all -inf", "+inf", "NaN")
    assert undefined == (dev[2] != dev[2]), "undefined rows have NaN log s on the device too"
    # Plain rows (finite max below 2^24 in size, no NaN; -inf logits allowed) are finished
    # by the one-read fast pass; the rest are read again by the exact pass.
    exact = undefined or name in ("offset 3e7 (past the base-2 fast range)", "huge finite of both signs")
    assert dev[5] == (0.0 if exact else 1.0), "which pass finished the row"


FAST_ROWS = [
    "random",
    "offset 1e6",
    "offset 1.6e7 (|c| near 1)",
    "offset -1.6e7",
    "long, 4-vector steps",
    "shifts around the subnormal range",
    "masked -inf",
    "one logit -3e38 (x log2e overflows)",
]


@pytest.mark.parametrize("name", FAST_ROWS)
def test_fast_pass_precision(name):
    """The base-2 fast pass against float64 truth: log s, entropy and logp to float32 precision
    at any offset it takes (d2 = fma(x, log2e, -m2) carries m2's rounding, which cancels)."""
    row = ROWS[name]
    dev = device_forward(row, 1, 128)
    assert dev[5] == 1.0
    x = row.double()
    m = x.max()
    log_s = torch.log(torch.exp(x - m).sum())
    p = torch.exp(x - m - log_s)
    entropy = -(p * torch.where(p > 0, torch.log(p), 0.0)).sum()
    assert dev[2] == pytest.approx(float(log_s), rel=1e-6, abs=1e-6)
    assert dev[3] == pytest.approx(float(entropy), rel=1e-6, abs=1e-6)
    assert dev[0] == pytest.approx(float(x[1] - m - log_s), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("threads,offset", [(128, 0), (512, 0), (256, 3)])
@pytest.mark.parametrize("name", list(ROWS))
def test_wpo_statistic_on_the_device(name, threads, offset):
    """The WPO instantiation (q beside the state, both passes): its first six outputs are
    the plain kernel's, bit for bit; log sum p^2 matches float64 where the row is defined
    (at any offset the fast pass takes: c cancels), NaN where it is not, and the host's."""
    row = ROWS[name]
    y = 1 if name != "huge finite of both signs" else 0
    plain = device_forward(row, y, threads, offset)
    *first, sq = device_forward(row, y, threads, offset, log_sum_sq=True)
    assert first == pytest.approx(plain, rel=0, abs=0, nan_ok=True), "the plain statistics are unchanged"
    host = float(cpp_backend.forward(row.float().view(1, 1, -1), torch.tensor([[y]]), -100, log_sum_sq=True)[5])
    if name in ("all -inf", "+inf", "NaN"):
        assert sq != sq and host != host
        return
    x = row.double()
    truth = float(torch.logsumexp(2 * torch.log_softmax(x, -1), -1))
    assert sq == pytest.approx(truth, rel=2e-6, abs=2e-6), (sq, truth)
    assert sq == pytest.approx(host, rel=2e-6, abs=2e-6)


@pytest.mark.parametrize("v", [1, 2, 3])
def test_near_certain_tokens_never_get_positive_logp(v):
    """Rows of one or a few logits, one far above the rest: log s >= 0 and entropy >= 0, so
    logp <= 0 (the fast pass's max element adds 2^c, not exactly 1, and log2(s) - c
    could round to -1e-8 before the clamp)."""
    for m in torch.linspace(-50, 50, 1001).tolist():
        row = torch.full((v,), m - 200.0)
        row[0] = m
        logp, _, log_s, entropy, _, fast = device_forward(row, 0, 128)
        assert fast == 1.0 and log_s >= 0.0 and entropy >= 0.0 and logp <= 0.0, (v, m, logp, log_s, entropy)


def _backward_schedule(v: int, k: int, threads: int, y: int, lead: int = 0) -> dict:
    """cuda_logps.cu's backward, vector path, as each thread's ordered reads ('r') and
    writes ('w', element, 'target' or 'other'): the peeled lead (one element per
    thread), groups of UNROLL vectors i, i + threads, ..., the remaining vectors one by
    one, the target's owner
    reading x_y first and writing it last, the tail."""
    lead = min(lead, v)
    nvec = (v - lead) // k
    schedule = {}
    for tid in range(threads):
        ops = []
        if tid < lead:
            ops += [("r", tid), ("w", tid, "target" if tid == y else "other")]
        owner = lead <= y < lead + nvec * k and ((y - lead) // k) % threads == tid
        if owner:
            ops.append(("r", y))
        i = tid
        vectors = []
        while i + (UNROLL - 1) * threads < nvec:
            vectors.append(tuple(i + u * threads for u in range(UNROLL)))
            i += UNROLL * threads
        while i < nvec:
            vectors.append((i,))
            i += threads
        for group in vectors:
            ops += [("r", lead + j * k + c) for j in group for c in range(k)]
            ops += [("w", lead + j * k + c, "other") for j in group for c in range(k)]
        if owner:
            ops.append(("w", y, "target"))
        for e in range(lead + nvec * k + tid, v, threads):
            ops += [("r", e), ("w", e, "target" if e == y else "other")]
        schedule[tid] = ops
    return schedule


@pytest.mark.parametrize("k,threads,lead", [(8, 32, 0), (4, 64, 0), (8, 96, 0), (8, 32, 5), (4, 64, 3)])
def test_in_place_backward_schedule_is_race_free(k, threads, lead):
    """A model of the kernel's element ownership (the host replay above checks its math,
    not this): with out == logits, no thread reads an element after any thread wrote it,
    every element is written by exactly one thread, the target's last write is
    g (1 - p_y) — for a target in the unrolled vectors, the remaining ones or the tail."""
    for v in list(range(0, 3 * threads * k + 2 * k + 3, 7)) + [10 * threads * k + 7]:
        for y in {0, 1, lead, max(v - 1, 0), v // 2, (v // k) * k, lead + threads * k, UNROLL * threads * k + k}:
            if y >= v:
                continue
            writer, final, read = {}, {}, {}
            for tid, ops in _backward_schedule(v, k, threads, y, lead).items():
                for op in ops:
                    if op[0] == "r":
                        assert writer.get(op[1], tid) == tid, (v, y, tid, op)
                        read.setdefault(op[1], set()).add(tid)
                    else:
                        assert writer.setdefault(op[1], tid) == tid, ("two writers", v, y, op)
                        final[op[1]] = op[2]
            assert set(writer) == set(range(v)), "every element written"
            assert all(read[e] <= {writer[e]} for e in read), "read only by its writer"
            assert all(final[e] == ("target" if e == y else "other") for e in range(v))
