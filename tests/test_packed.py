"""Packed sequences (padding-free): packed rows against the same sequences padded, one per row."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, backend_device_pairs, grad_tolerances
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpo

V = 37  # odd
LENS = [5, 3, 6, 4, 2, 7, 4, 5]  # 8 sequences: 4 chosen, then their 4 rejected partners
T = 12
ALL_IGNORED = 3  # this sequence has no valid token


def layout(lens, t):
    """Greedy packing in order: ``[(row, start, length)]`` per sequence and the row count.
    A row's unused tail is padding that belongs to its last sequence."""
    where, row, used = [], 0, 0
    for n in lens:
        if used + n > t:
            row, used = row + 1, 0
        where.append((row, used, n))
        used += n
    return where, row + 1


def make_case(lens=LENS, t=T, v=V, dtype=torch.float32, seed=0, shifted=False, all_ignored=ALL_IGNORED):
    """Packed logits ``[R, t, v]`` (a ``base[:, :-1]`` view when ``shifted``: N and T do not
    merge), labels, position_ids, cu_seqlens, the padded counterparts ``[S, Lmax, v]`` and the
    layout. Labels: a random prompt, the last position of each sequence ignored (it would
    predict the next one's first token), random ignored tokens; never zero logits."""
    g = torch.Generator().manual_seed(seed)
    where, rows = layout(lens, t)
    base = torch.randn(rows, t + 1, v, generator=g, dtype=torch.float64) * 3
    logits64 = base[:, :-1] if shifted else base[:, 1:].contiguous()
    labels = torch.full((rows, t), IGNORE, dtype=torch.int64)
    position_ids = torch.zeros(rows, t, dtype=torch.int64)
    lmax = max(lens)
    padded64 = torch.randn(len(lens), lmax, v, generator=g, dtype=torch.float64) * 3
    padded_labels = torch.full((len(lens), lmax), IGNORE, dtype=torch.int64)
    for s, (r, a, n) in enumerate(where):
        lab = torch.randint(0, v, (n,), generator=g)
        lab[torch.rand(n, generator=g) < 0.25] = IGNORE
        lab[: int(torch.randint(0, 2, (1,), generator=g))] = IGNORE  # a prompt token, sometimes
        lab[-1] = IGNORE
        if s == all_ignored:
            lab[:] = IGNORE
        labels[r, a : a + n] = lab
        position_ids[r, a : a + n] = torch.arange(n)
        padded64[s, :n] = logits64[r, a : a + n]
        padded_labels[s, :n] = lab
    for r in range(rows):  # trailing padding continues the last sequence's positions (not 0)
        last = max(a + n for (rr, a, n) in where if rr == r)
        position_ids[r, last:] = torch.arange(1, t - last + 1) + position_ids[r, last - 1]
    starts = [r * t + a for (r, a, n) in where]
    cu_seqlens = torch.tensor(starts + [rows * t])
    packed = logits64.to(dtype)
    return dict(
        logits=packed,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        padded=padded64.to(dtype),
        padded_labels=padded_labels,
        where=where,
    )


def unpack_grad(grad, where, lmax):
    """``[S, lmax, V]`` per-sequence view of a packed gradient, and the padding's part."""
    out = grad.new_zeros(len(where), lmax, grad.shape[-1])
    covered = torch.zeros(grad.shape[:2], dtype=torch.bool)
    for s, (r, a, n) in enumerate(where):
        out[s, :n] = grad[r, a : a + n]
        covered[r, a : a + n] = True
    return out, grad[~covered]


def nonleaf(x):
    """A non-leaf copy of ``x`` with the same strides (so an in-place backward can run), and its leaf."""
    base = x._base if x._base is not None else x
    leaf = base.detach().clone().requires_grad_()
    y = (leaf * 1).as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset())
    return y, leaf


def stat_tol(dtype):
    return dict(atol=1e-4, rtol=1e-5) if dtype != torch.float64 else dict(atol=1e-10, rtol=1e-10)


FIELDS = ("logps", "entropy", "mean_logits", "log_sum_sq", "unweighted_logps")


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
@pytest.mark.parametrize("shifted,inplace", [(False, True), (True, True), (True, False)])
def test_sequence_logps_packed_matches_padded(backend, device, dtype, how, shifted, inplace):
    case = make_case(dtype=dtype, shifted=shifted, seed=2 * shifted + (how == "cu_seqlens"))
    g = torch.Generator().manual_seed(5)
    weights_padded = torch.rand(case["padded_labels"].shape, generator=g) + 0.5
    weights = torch.zeros(case["labels"].shape)
    for s, (r, a, n) in enumerate(case["where"]):
        weights[r, a : a + n] = weights_padded[s, :n]
    scale = torch.randn(len(case["where"]), generator=g, dtype=torch.float64) + 2
    dev = lambda x: x.to(device)  # noqa: E731
    kw = dict(backend=backend, return_entropy=True, return_log_sum_sq=True)

    x, leaf = nonleaf(dev(case["logits"]))
    if not inplace:
        x = leaf = dev(case["logits"]).detach().requires_grad_()
    got = pyfastpo.sequence_logps(
        x,
        dev(case["labels"]),
        token_weights=dev(weights),
        inplace_backward=inplace,
        **{how: dev(case[how])},
        **kw,
    )
    ((got.logps + 0.3 * got.unweighted_logps) * dev(scale).to(got.logps.dtype)).sum().backward()

    px, pleaf = nonleaf(dev(case["padded"]))
    want = pyfastpo.sequence_logps(px, dev(case["padded_labels"]), token_weights=dev(weights_padded), **kw)
    ((want.logps + 0.3 * want.unweighted_logps) * dev(scale).to(want.logps.dtype)).sum().backward()

    assert got.logps.shape == (len(LENS),)
    assert torch.equal(got.num_tokens, want.num_tokens)
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), **stat_tol(dtype), msg=field)
    assert got.num_tokens[ALL_IGNORED] == 0 and got.logps[ALL_IGNORED] == 0 and got.mean_logits[ALL_IGNORED] == 0
    grad, padding = unpack_grad(leaf.grad.as_strided(x.shape, x.stride(), x.storage_offset()).cpu(), case["where"], 7)
    torch.testing.assert_close(grad, pleaf.grad.cpu(), **grad_tolerances(dtype))
    assert padding.numel() > 0 and torch.all(padding == 0)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_position_ids_and_cu_seqlens_agree(backend, device):
    case = make_case(seed=3)
    outs = [
        pyfastpo.sequence_logps(
            case["logits"].to(device), case["labels"].to(device), backend=backend, **{how: case[how].to(device)}
        )
        for how in ("position_ids", "cu_seqlens")
    ]
    for a, b in zip(*outs):
        assert (a is None and b is None) or torch.equal(a, b)


def test_one_sequence_per_row_is_the_plain_result():
    """Packing with one sequence per row (cu_seqlens at the row starts) is the unpacked op."""
    case = make_case(seed=4)
    logits, labels = case["padded"], case["padded_labels"]
    n, t = labels.shape
    packed = pyfastpo.sequence_logps(logits, labels, cu_seqlens=torch.arange(0, n * t + 1, t), return_entropy=True)
    plain = pyfastpo.sequence_logps(logits, labels, return_entropy=True)
    for field in ("logps", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(packed, field), getattr(plain, field), atol=1e-5, rtol=1e-6)
    assert torch.equal(packed.num_tokens, plain.num_tokens)


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(1, 9), min_size=1, max_size=7),
    extra=st.integers(0, 3),
    v=st.integers(2, 40),
    seed=st.integers(0, 10_000),
)
def test_packed_matches_padded_property(lens, extra, v, seed):
    case = make_case(lens=lens, t=max(lens) + extra, v=v, seed=seed, all_ignored=-1)
    x, leaf = nonleaf(case["logits"])
    got = pyfastpo.sequence_logps(x, case["labels"], position_ids=case["position_ids"], backend="cpp")
    px, pleaf = nonleaf(case["padded"])
    want = pyfastpo.sequence_logps(px, case["padded_labels"], backend="cpp")
    scale = torch.linspace(0.5, 1.5, len(lens))
    (got.logps * scale).sum().backward()
    (want.logps * scale).sum().backward()
    torch.testing.assert_close(got.logps, want.logps, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.num_tokens, want.num_tokens)
    grad, padding = unpack_grad(leaf.grad, case["where"], max(lens))
    torch.testing.assert_close(grad, pleaf.grad, **grad_tolerances(torch.float32))
    assert torch.all(padding == 0)


def test_ld_token_weights_per_segment():
    case = make_case(seed=6)
    packed = pyfastpo.ld_token_weights(case["labels"], 0.3, position_ids=case["position_ids"])
    padded = pyfastpo.ld_token_weights(case["padded_labels"], 0.3)
    for s, (r, a, n) in enumerate(case["where"]):
        assert torch.equal(packed[r, a : a + n], padded[s, :n])
    assert packed.sum() == sum(packed[r, a : a + n].sum() for (r, a, n) in case["where"])


FUSED_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "ipo_ld": dict(loss_type="ipo", ld_alpha=0.4),
    "mallows_wpo": dict(loss_type="mallows_dpo", use_weighting=True),
    "focal_ld_wpo": dict(loss_type=["focalpo", "sigmoid"], loss_weights=[1.0, 0.5], ld_alpha=0.7, use_weighting=True),
    "simpo_nll": dict(loss_type="simpo", nll_weight=0.3),
}


def pair_case(dtype=torch.float32, seed=7):
    """Packed policy and reference logits (reference packed the same way) and padded copies."""
    case = make_case(dtype=dtype, seed=seed, all_ignored=-1)
    ref = make_case(dtype=dtype, seed=seed + 1, all_ignored=-1)
    return case, ref["logits"], ref["padded"]


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("name", sorted(FUSED_CASES))
@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
def test_fused_packed_matches_padded(backend, device, name, how):
    case, ref_logits, ref_padded = pair_case()
    kwargs = dict(FUSED_CASES[name], backend=backend, beta=0.2)
    reference = name != "simpo_nll"
    dev = lambda x: x.to(device)  # noqa: E731
    x, leaf = nonleaf(dev(case["logits"]))
    got = pyfastpo.fused_preference_loss(
        x,
        dev(case["labels"]),
        ref_logits=dev(ref_logits) if reference else None,
        **{how: dev(case[how])},
        **kwargs,
    )
    got.loss.backward()
    px, pleaf = nonleaf(dev(case["padded"]))
    want = pyfastpo.fused_preference_loss(
        px, dev(case["padded_labels"]), ref_logits=dev(ref_padded) if reference else None, **kwargs
    )
    want.loss.backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    for field in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), **tol, msg=field)
    assert got.metrics.keys() == want.metrics.keys()
    for key in want.metrics:
        torch.testing.assert_close(got.metrics[key], want.metrics[key], **tol, msg=key)
    grad, padding = unpack_grad(leaf.grad.cpu(), case["where"], max(LENS))
    torch.testing.assert_close(grad, pleaf.grad.cpu(), atol=1e-6, rtol=1e-4)
    assert torch.all(padding == 0)


def test_fused_packed_with_precomputed_reference_and_bf16():
    case, _, _ = pair_case(dtype=torch.bfloat16, seed=9)
    ref = torch.randn(len(LENS)) - 5
    out = []
    for logits, labels, pack in (
        (case["logits"], case["labels"], dict(cu_seqlens=case["cu_seqlens"])),
        (case["padded"], case["padded_labels"], {}),
    ):
        x, leaf = nonleaf(logits)
        res = pyfastpo.fused_preference_loss(
            x,
            labels,
            ref_chosen_logps=ref[:4],
            ref_rejected_logps=ref[4:],
            loss_type="robust",
            label_smoothing=0.1,
            **pack,
        )
        res.loss.backward()
        out.append((res, leaf.grad))
    (got, g_got), (want, g_want) = out
    torch.testing.assert_close(got.losses, want.losses, atol=1e-5, rtol=1e-5)
    grad, _ = unpack_grad(g_got, case["where"], max(LENS))
    torch.testing.assert_close(grad, g_want, **grad_tolerances(torch.bfloat16))


H = 10


def linear_case(seed=11):
    """Packed hidden states ``[R, T, H]`` (a strided view) with their labels, and the padded copies."""
    case = make_case(seed=seed, all_ignored=-1)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case["labels"].shape[0], T + 1, H, generator=g, dtype=torch.float64)[:, 1:]
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    padded = torch.randn(len(LENS), max(LENS), H, generator=g, dtype=torch.float64)
    ref_padded = padded.clone()
    for s, (r, a, n) in enumerate(case["where"]):
        padded[s, :n], ref_padded[s, :n] = hidden[r, a : a + n], ref_hidden[r, a : a + n]
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    f = lambda x: x.float()  # noqa: E731
    return case, f(hidden), f(ref_hidden), f(padded), f(ref_padded), f(weight), f(bias)


def unpack_hidden_grad(grad, where):
    out = grad.new_zeros(len(where), max(LENS), grad.shape[-1])
    for s, (r, a, n) in enumerate(where):
        out[s, :n] = grad[r, a : a + n]
    return out


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_linear_sequence_logps_packed_matches_padded(backend, device):
    case, hidden, _, padded, _, weight, bias = (x if isinstance(x, dict) else x.to(device) for x in linear_case())
    runs = []
    for hid, labels, pack in (
        (hidden, case["labels"], dict(position_ids=case["position_ids"])),
        (padded, case["padded_labels"], {}),
    ):
        h, w, b = (x.detach().clone().requires_grad_() for x in (hid, weight, bias))
        out = pyfastpo.linear_sequence_logps(
            h,
            w,
            labels.to(device),
            bias=b,
            backend=backend,
            chunk_tokens=5,
            return_entropy=True,
            return_log_sum_sq=True,
            **{k: v.to(device) for k, v in pack.items()},
        )
        (out.logps * torch.linspace(0.5, 2, len(LENS), device=device)).sum().backward()
        runs.append((out, h.grad, w.grad, b.grad))
    (got, gh, gw, gb), (want, wh, ww, wb) = runs
    assert torch.equal(got.num_tokens, want.num_tokens)
    for field in ("logps", "entropy", "mean_logits", "log_sum_sq"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-4, rtol=1e-5, msg=field)
    torch.testing.assert_close(
        unpack_hidden_grad(gh, case["where"]),
        wh * (case["padded_labels"] != IGNORE).to(device)[..., None],
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(gw, ww, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, wb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sigmoid", "mallows_wpo", "focal_ld_wpo"])
def test_linear_preference_loss_packed_matches_padded(name):
    case, hidden, ref_hidden, padded, ref_padded, weight, bias = linear_case(seed=13)
    runs = []
    for hid, ref, labels, pack in (
        (hidden, ref_hidden, case["labels"], dict(cu_seqlens=case["cu_seqlens"])),
        (padded, ref_padded, case["padded_labels"], {}),
    ):
        h, w, b = (x.detach().clone().requires_grad_() for x in (hid, weight, bias))
        out = pyfastpo.linear_preference_loss(
            h, w, labels, bias=b, ref_hidden=ref, beta=0.2, chunk_tokens=6, **FUSED_CASES[name], **pack
        )
        out.loss.backward()
        runs.append((out, h.grad, w.grad, b.grad))
    (got, gh, gw, gb), (want, wh, ww, wb) = runs
    assert got.mode.startswith("two-pass: packed sequences")
    for field in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-5, rtol=1e-5, msg=field)
    torch.testing.assert_close(unpack_hidden_grad(gh, case["where"]), wh, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw, ww, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gb, wb, atol=1e-6, rtol=1e-4)


def test_linear_single_pass_refuses_packed():
    case, hidden, _, _, _, weight, _ = linear_case()
    with pytest.raises(ValueError, match="single_pass=True cannot run here: two-pass: packed sequences"):
        pyfastpo.linear_preference_loss(
            hidden.requires_grad_(), weight, case["labels"], position_ids=case["position_ids"], single_pass=True
        )


def bad_inputs():
    case = make_case(seed=1)
    pos, cu = case["position_ids"], case["cu_seqlens"]
    n, t = case["labels"].shape
    shifted_row = pos.clone()
    shifted_row[1, 0] = 3
    negative = pos.clone()
    negative[0, 2] = -1
    crossing = torch.tensor([0, 5, t + 2, n * t])
    return case, {
        "both": (dict(position_ids=pos, cu_seqlens=cu), "not both"),
        "position_ids shape": (dict(position_ids=pos[:, :-1]), "position_ids must have the labels' shape"),
        "position_ids float": (dict(position_ids=pos.float()), "position_ids must be an integer tensor"),
        "position_ids 1-d": (dict(position_ids=pos.reshape(-1)), "position_ids must have 2 dimension"),
        "position_ids negative": (dict(position_ids=negative), "non-negative"),
        "row not starting a sequence": (dict(position_ids=shifted_row), r"position_ids\[1, 0\] = 3"),
        "cu_seqlens start": (dict(cu_seqlens=cu[1:]), "start at 0"),
        "cu_seqlens end": (dict(cu_seqlens=cu[:-1]), "end at N\\*T"),
        "cu_seqlens 2-d": (dict(cu_seqlens=cu[None]), "cu_seqlens must have 1 dimension"),
        "cu_seqlens repeated": (dict(cu_seqlens=torch.cat((cu[:2], cu[1:]))), "strictly increasing"),
        "cu_seqlens crossing rows": (dict(cu_seqlens=crossing), "crossing rows"),
        "cu_seqlens float": (dict(cu_seqlens=cu.float()), "cu_seqlens must be an integer tensor"),
    }


@pytest.mark.parametrize("name", sorted(bad_inputs()[1]))
@pytest.mark.parametrize("entry", ["sequence_logps", "fused", "linear", "ld_token_weights"])
def test_bad_packing_raises_before_any_kernel(name, entry, monkeypatch):
    case, bad = bad_inputs()
    kwargs, match = bad[name]
    from pyfastpo.backends import cpp_backend

    monkeypatch.setattr(cpp_backend, "forward", lambda *a, **k: pytest.fail("a kernel ran"))
    logits, labels = case["logits"], case["labels"]
    with pytest.raises(ValueError, match=match):
        if entry == "sequence_logps":
            pyfastpo.sequence_logps(logits, labels, backend="cpp", **kwargs)
        elif entry == "fused":
            pyfastpo.fused_preference_loss(logits, labels, backend="cpp", **kwargs)
        elif entry == "linear":
            hidden = torch.randn(*labels.shape, 4)
            pyfastpo.linear_preference_loss(hidden, torch.randn(V, 4), labels, backend="cpp", **kwargs)
        else:
            pyfastpo.ld_token_weights(labels, 0.5, **kwargs)


def test_odd_number_of_packed_sequences_raises():
    case = make_case(lens=LENS[:5], seed=2)
    with pytest.raises(ValueError, match="packed logits must hold an even"):
        pyfastpo.fused_preference_loss(case["logits"], case["labels"], position_ids=case["position_ids"])
    hidden = torch.randn(*case["labels"].shape, 4)
    with pytest.raises(ValueError, match="packed hidden states must hold an even"):
        pyfastpo.linear_preference_loss(hidden, torch.randn(V, 4), case["labels"], cu_seqlens=case["cu_seqlens"])


def test_bad_label_in_packed_batch_raises():
    case = make_case(seed=2)
    labels = case["labels"].clone()
    labels[0, 1] = V
    with pytest.raises(ValueError, match="labels must be in"):
        pyfastpo.sequence_logps(case["logits"], labels, position_ids=case["position_ids"])
