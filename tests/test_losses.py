"""Every loss type against an independent formula written here, value and gradient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import pyfastpo
from pyfastpo.losses import LOSS_TYPES, dispersion_from_entropy, mallows_kendall_log_prob

B = 6
BETA = 0.3
EPS = 0.15  # label smoothing
FOCAL_GAMMA = 0.7
SIMPO_GAMMA = 0.4
TAU = 0.05


def ls(x):
    """log(sigmoid(x)), written independently of torch.nn.functional."""
    return -torch.log1p(torch.exp(-x))


def sig(x):
    return 1 / (1 + torch.exp(-x))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(B, generator=g, dtype=torch.float64)  # noqa: E731
    nc = torch.randint(1, 30, (B,), generator=g)
    nr = torch.randint(1, 30, (B,), generator=g)
    unit = lambda: torch.rand(B, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        c=-40 + 4 * r(),
        r=-42 + 4 * r(),
        rc=-41 + 4 * r(),
        rr=-41 + 4 * r(),
        nc=nc,
        nr=nr,
        # Summed token entropies: each token's entropy is at most log V.
        hc=unit() * nc * math.log(V),
        hr=unit() * nr * math.log(V),
    )


V = 1000
C_DISP = 0.29


def phi_of(x):
    hbar = (x["hc"] / (x["nc"] * math.log(V)) + x["hr"] / (x["nr"] * math.log(V))) / 2
    return hbar**C_DISP


def mallows_p(margin, phi):
    """P(chosen wins) by the textbook Mallows-Kendall marginal g(d) = h(d+1) - h(d), h(k) = k/(1-phi^k)."""
    h = lambda k: k / (1 - phi**k)  # noqa: E731
    d = margin.abs()
    g = h(d + 1) - h(d)
    return torch.where(margin >= 0, g, 1 - g)


def expected(loss_type, x):
    """Independent per-pair formulas (float64)."""
    c, r, rc, rr, nc, nr = x["c"], x["r"], x["rc"], x["rr"], x["nc"], x["nr"]
    dc, dr = c - rc, r - rr
    h = BETA * (dc - dr)
    theta = -torch.log(phi_of(x))
    formulas = {
        "sigmoid": lambda: -ls(h),
        "robust": lambda: ((1 - EPS) * -ls(h) - EPS * -ls(-h)) / (1 - 2 * EPS),
        "hinge": lambda: torch.clamp(1 - h, min=0),
        "ipo": lambda: (dc / nc - dr / nr - 1 / (2 * BETA)) ** 2,
        "exo_pair": lambda: sig(h) * (ls(h) - math.log(1 - EPS)) + sig(-h) * (ls(-h) - math.log(EPS)),
        "nca_pair": lambda: -ls(BETA * dc) - 0.5 * ls(-BETA * dc) - 0.5 * ls(-BETA * dr),
        "bco_pair": lambda: -ls(BETA * dc) - ls(-BETA * dr),
        "sppo_hard": lambda: (dc - 1 / (2 * BETA)) ** 2 + (dr + 1 / (2 * BETA)) ** 2,
        "aot": lambda: (
            (1 - EPS) * -ls(BETA * (torch.sort(c - r).values - torch.sort(rc - rr).values))
            + EPS * -ls(-BETA * (torch.sort(c - r).values - torch.sort(rc - rr).values))
        ),
        "aot_unpaired": lambda: (
            (1 - EPS) * -ls(BETA * (torch.sort(dc).values - torch.sort(dr).values))
            + EPS * -ls(-BETA * (torch.sort(dc).values - torch.sort(dr).values))
        ),
        "apo_zero": lambda: (1 - sig(BETA * dc)) + sig(BETA * dr),
        "apo_down": lambda: sig(BETA * dc) + (1 - sig(BETA * (dc - dr))),
        "discopop": lambda: -ls(h) * (1 - sig(h / TAU)) + torch.exp(-h) * sig(h / TAU),
        "sigmoid_norm": lambda: -ls(BETA * (dc / nc - dr / nr)),
        "sft": lambda: (-c.sum() / nc.sum()).expand(B),
        "focalpo": lambda: -(sig(h) ** FOCAL_GAMMA) * ls(h),
        "mallows_dpo": lambda: (1 - EPS) * -ls(theta * h) + EPS * -ls(-theta * h),
        "mallows_ipo": lambda: (theta * (dc / nc - dr / nr) - 1 / (2 * BETA)) ** 2,
        "mallows_phi": lambda: -torch.log(mallows_p(h, phi_of(x))),
        "simpo": lambda: -ls(BETA * (c / nc - r / nr) - SIMPO_GAMMA),
        "cauchy": lambda: -torch.log(0.5 + torch.atan(h) / math.pi),
    }
    return formulas[loss_type]()


# The options each loss type reads (the others are refused when set), written here independently.
OPTIONS = {
    "robust": dict(label_smoothing=EPS),
    "exo_pair": dict(label_smoothing=EPS),
    "aot": dict(label_smoothing=EPS),
    "aot_unpaired": dict(label_smoothing=EPS),
    "mallows_dpo": dict(label_smoothing=EPS, dispersion_scale=C_DISP),
    "mallows_ipo": dict(dispersion_scale=C_DISP),
    "mallows_phi": dict(dispersion_scale=C_DISP),
    "focalpo": dict(focal_gamma=FOCAL_GAMMA),
    "simpo": dict(simpo_gamma=SIMPO_GAMMA),
    "discopop": dict(discopop_tau=TAU),
}


def ours(loss_type, x, with_reference=True, **kw):
    c = x["c"].clone().requires_grad_()
    r = x["r"].clone().requires_grad_()
    kwargs = dict(
        loss_type=loss_type,
        beta=BETA,
        chosen_num_tokens=x["nc"],
        rejected_num_tokens=x["nr"],
        ref_chosen_entropy=x["hc"],
        ref_rejected_entropy=x["hr"],
        vocab_size=V,
    )
    for t in [loss_type] if isinstance(loss_type, str) else loss_type:
        kwargs.update(OPTIONS.get(t, {}))
    kwargs.update(kw)
    refs = (x["rc"], x["rr"]) if with_reference else (None, None)
    out = pyfastpo.preference_loss(c, r, *refs, **kwargs)
    out.loss.backward()
    return out, c.grad, r.grad


def test_every_loss_type_is_tested():
    x = batch()
    for t in LOSS_TYPES:  # expected() raises KeyError for a type without a formula
        expected(t, x)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_value_and_gradient(loss_type):
    x = batch()
    out, gc, gr = ours(loss_type, x)
    want = expected(loss_type, x)
    torch.testing.assert_close(out.losses, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, want.mean(), rtol=1e-10, atol=1e-10)
    c = x["c"].clone().requires_grad_()
    r = x["r"].clone().requires_grad_()
    expected(loss_type, {**x, "c": c, "r": r}).mean().backward()
    torch.testing.assert_close(gc, c.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gr, r.grad, rtol=1e-8, atol=1e-12)


def test_focal_gradient_closed_form():
    """d/dh [-p^g log p] = -p^g (1 - p) (g log p + 1); detached: -p^g (1 - p)."""
    x = batch(1)
    h = BETA * ((x["c"] - x["rc"]) - (x["r"] - x["rr"]))
    p = sig(h)
    for detach, dldh in [
        (False, -(p**FOCAL_GAMMA) * (1 - p) * (FOCAL_GAMMA * torch.log(p) + 1)),
        (True, -(p**FOCAL_GAMMA) * (1 - p)),
    ]:
        _, gc, gr = ours("focalpo", x, focal_detach=detach)
        torch.testing.assert_close(gc, dldh * BETA / B)
        torch.testing.assert_close(gr, -dldh * BETA / B)


def test_mallows_dpo_gradient_closed_form():
    """d/dh [-logsigmoid(theta h)] = -theta (1 - sigmoid(theta h))."""
    x = batch(2)
    h = BETA * ((x["c"] - x["rc"]) - (x["r"] - x["rr"]))
    theta = -torch.log(phi_of(x))
    _, gc, _ = ours("mallows_dpo", x, label_smoothing=0.0)
    torch.testing.assert_close(gc, -theta * (1 - sig(theta * h)) * BETA / B)


def brute_force_pairwise(n_items: int, d: int, phi: float) -> float:
    """P(item 0 precedes item d) under Mallows-Kendall over all permutations of n_items."""
    num = den = 0.0
    for perm in itertools.permutations(range(n_items)):
        inv = sum(1 for i in range(n_items) for j in range(i + 1, n_items) if perm[i] > perm[j])
        w = phi**inv
        den += w
        num += w * (perm.index(0) < perm.index(d))
    return num / den


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("phi", [0.2, 0.7])
def test_mallows_phi_matches_enumerated_mallows_kendall(d, phi):
    want = brute_force_pairwise(6, d, phi)
    got = (
        mallows_kendall_log_prob(torch.tensor([float(d)], dtype=torch.float64), torch.tensor(phi, dtype=torch.float64))
        .exp()
        .item()
    )
    assert got == pytest.approx(want, rel=1e-9)


def test_mallows_phi_limits():
    m = torch.tensor([-30.0, -2.0, -1.0, -0.3, 0.3, 1.0, 2.0, 30.0], dtype=torch.float64)
    # phi -> 1: uniform preferences, probability 1/2 whatever the margin.
    p_uniform = mallows_kendall_log_prob(m, torch.tensor(1 - 1e-6)).exp()
    torch.testing.assert_close(p_uniform, torch.full_like(m, 0.5), atol=1e-4, rtol=0)
    phi = torch.tensor(0.4, dtype=torch.float64)
    # Adjacent items (margin 1): 1 / (1 + phi).
    assert mallows_kendall_log_prob(torch.tensor([1.0], dtype=torch.float64), phi).exp().item() == pytest.approx(
        1 / 1.4
    )
    # Complementary: P(m) + P(-m) = 1 for m != 0.
    p = mallows_kendall_log_prob(m, phi).exp()
    torch.testing.assert_close(p + p.flip(0), torch.ones_like(m))
    # Monotone in the margin, and -> 1 (log-prob -> 0) for a large margin; finite far below.
    assert bool((p[1:] > p[:-1]).all())
    assert mallows_kendall_log_prob(torch.tensor([1e4], dtype=torch.float64), phi).item() == pytest.approx(0, abs=1e-12)
    assert torch.isfinite(mallows_kendall_log_prob(torch.tensor([-1e4], dtype=torch.float64), phi)).all()
    # phi -> 0: a certain ranking, the higher reward always wins (margins >= 1 here).
    p_sharp = mallows_kendall_log_prob(m[5:], torch.tensor(1e-6)).exp()
    torch.testing.assert_close(p_sharp, torch.ones_like(p_sharp), atol=1e-4, rtol=0)


def test_mallows_phi_gradient_is_finite_near_zero_margin():
    m = torch.tensor([-1e-9, 0.0, 1e-9, 1e-3], dtype=torch.float64, requires_grad=True)
    mallows_kendall_log_prob(m, torch.tensor(0.5)).sum().backward()
    assert torch.isfinite(m.grad).all()


def test_dispersion_from_entropy_and_direct():
    x = batch(3)
    phi = dispersion_from_entropy(x["hc"], x["hr"], x["nc"], x["nr"], V, C_DISP)
    torch.testing.assert_close(phi, phi_of(x))
    a, _, _ = ours("mallows_dpo", x)
    b, _, _ = ours("mallows_dpo", x, dispersion=phi, ref_chosen_entropy=None, ref_rejected_entropy=None)
    torch.testing.assert_close(a.losses, b.losses)
    assert "mallows/dispersion" in a.metrics


def test_bcr_and_nll_terms():
    x = batch(4)
    base, _, _ = ours("sigmoid", x)
    budget, w = 0.5, 0.7
    drop = x["rc"] - x["c"]
    out, _, _ = ours("sigmoid", x, bcr_weight=w, bcr_budget=budget)
    torch.testing.assert_close(out.losses, base.losses + w * torch.clamp(drop - budget, min=0))
    out, _, _ = ours("sigmoid", x, bcr_weight=w, bcr_budget=budget, bcr_per_token=True)
    torch.testing.assert_close(out.losses, base.losses + w * torch.clamp(drop / x["nc"] - budget, min=0))
    out, _, _ = ours("sigmoid", x, nll_weight=0.3)
    torch.testing.assert_close(out.losses, base.losses + 0.3 * -x["c"] / x["nc"])


def test_bcr_is_free_within_budget():
    x = batch(5)
    base, gc0, _ = ours("sigmoid", x)
    out, gc, _ = ours("sigmoid", x, bcr_weight=1.0, bcr_budget=1e6)
    torch.testing.assert_close(out.loss, base.loss)
    torch.testing.assert_close(gc, gc0)


def test_weighted_list_of_loss_types():
    x = batch(6)
    out, _, _ = ours(["sigmoid", "ipo", "focalpo"], x, loss_weights=[1.0, 0.25, 2.0])
    want = expected("sigmoid", x) + 0.25 * expected("ipo", x) + 2.0 * expected("focalpo", x)
    torch.testing.assert_close(out.losses, want)


def test_metrics_match_trl_definitions():
    x = batch(7)
    out, _, _ = ours("sigmoid", x)
    rc, rr = BETA * (x["c"] - x["rc"]), BETA * (x["r"] - x["rr"])
    m = out.metrics
    torch.testing.assert_close(m["rewards/chosen"], rc.mean())
    torch.testing.assert_close(m["rewards/rejected"], rr.mean())
    torch.testing.assert_close(m["rewards/margins"], (rc - rr).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (rc > rr).double().mean())
    torch.testing.assert_close(m["logps/chosen"], x["c"].mean())
    torch.testing.assert_close(m["logps/rejected"], x["r"].mean())
    torch.testing.assert_close(out.chosen_rewards, rc)


def test_reference_free_defaults_to_zero():
    x = batch(8)
    a = pyfastpo.preference_loss(x["c"], x["r"], beta=BETA)
    b = pyfastpo.preference_loss(
        x["c"], x["r"], torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64), beta=BETA
    )
    torch.testing.assert_close(a.losses, b.losses)


def test_gamma_shorthand():
    x = batch(9)
    a, _, _ = ours("focalpo", x, gamma=0.3, focal_gamma=0.05)  # focal_gamma at its default
    b, _, _ = ours("focalpo", x, focal_gamma=0.3)
    torch.testing.assert_close(a.losses, b.losses)
    with pytest.raises(ValueError, match="not both"):
        ours("focalpo", x, gamma=0.3, focal_gamma=99)
    with pytest.raises(ValueError, match="ambiguous"):
        ours(["focalpo", "simpo"], x, gamma=0.3)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "sigmoid_norm", "sft", "mallows_dpo"])
def test_zero_token_counts_give_no_nan(loss_type):
    x = batch(10)
    x["nc"] = torch.zeros(B, dtype=torch.int64)
    x["hc"] = torch.zeros(B, dtype=torch.float64)
    out, gc, gr = ours(loss_type, x)
    assert torch.isfinite(out.losses).all()
    assert all(torch.isfinite(g).all() for g in (gc, gr) if g is not None)


def test_bad_options_raise():
    x = batch(11)
    c, r = x["c"], x["r"]
    with pytest.raises(ValueError, match="unknown"):
        pyfastpo.preference_loss(c, r, loss_type="dpo2")
    with pytest.raises(ValueError, match="loss_weights"):
        pyfastpo.preference_loss(c, r, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="need chosen_num_tokens"):
        pyfastpo.preference_loss(c, r, loss_type="ipo")
    with pytest.raises(ValueError, match="need a dispersion"):
        pyfastpo.preference_loss(c, r, loss_type="mallows_dpo")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        pyfastpo.preference_loss(c, r, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair"):
        pyfastpo.preference_loss(c, r, loss_type="exo_pair")
    with pytest.raises(ValueError, match="shape"):
        pyfastpo.preference_loss(c, r[:-1])
    with pytest.raises(ValueError, match="beta"):
        pyfastpo.preference_loss(c, r, beta=0.0)
    with pytest.raises(ValueError, match="both"):
        pyfastpo.preference_loss(c, r, x["rc"])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pyfastpo.preference_loss(c, r, loss_type="mallows_dpo", dispersion=torch.zeros(B))


def test_mallows_phi_moves_from_zero_margin():
    """Training starts at policy == reference, where every margin is exactly 0: the loss
    must still have a gradient there (the one-sided m -> 0+ one), pushing the margin up."""
    m = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    mallows_kendall_log_prob(m, torch.tensor(0.5, dtype=torch.float64)).sum().backward()
    assert bool((m.grad > 0).all())


def test_sft_divides_by_the_total_token_count_like_trl():
    """TRL's sft is a cross-entropy over all chosen tokens: an empty completion adds
    nothing to the numerator and nothing to the denominator."""
    c = torch.tensor([-10.0, 0.0], dtype=torch.float64)
    out = pyfastpo.preference_loss(
        c, c.clone(), loss_type="sft", chosen_num_tokens=torch.tensor([5, 0]), rejected_num_tokens=torch.tensor([5, 5])
    )
    torch.testing.assert_close(out.losses, torch.full((2,), 2.0, dtype=torch.float64))


def test_dispersion_leaves_out_an_empty_completion():
    h, n = torch.tensor([3.0]), torch.tensor([4])
    alone = dispersion_from_entropy(h, torch.zeros(1), n, torch.zeros(1, dtype=torch.int64), V, C_DISP)
    both = dispersion_from_entropy(h, h, n, n, V, C_DISP)
    torch.testing.assert_close(alone, both)


def test_missing_rejected_logps_raises_value_error():
    with pytest.raises(ValueError, match="rejected_logps"):
        pyfastpo.preference_loss(torch.zeros(2), None)


# f-DPO: f'(t) at t = pi / pi_ref, written from the f-divergences' definitions (Wang et al.
# 2023, Table 1), not from pyfastpo's code: reverse KL f(t) = t log t, forward KL
# f(t) = -log t, JS f(t) = t log t - (t + 1) log((t + 1) / 2), alpha f(t) = (t^a - a t - (1 - a)) /
# (a (a - 1)) up to its linear part; the additive constants of f' cancel in the differences.
def f_prime(kind, u, alpha=0.5):
    t = torch.exp(u)
    return {
        "reverse_kl": torch.log(t),
        "forward_kl": 1 - 1 / t,
        "js_divergence": torch.log(2 * t / (t + 1)),
        "alpha_divergence": (t ** (alpha - 1) - 1) / (alpha - 1),
    }[kind]


F_KINDS = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3), ("alpha_divergence", 1.7)]


@pytest.mark.parametrize("kind,alpha", F_KINDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "mallows_dpo"])
def test_f_divergence_value_and_gradient(kind, alpha, loss_type):
    x = batch(3)
    x["c"], x["r"] = x["rc"] + 0.3 * (x["c"] - x["rc"]), x["rr"] + 0.3 * (x["r"] - x["rr"])  # |u| ~ 1
    c, r = x["c"].clone().requires_grad_(), x["r"].clone().requires_grad_()
    kw = dict(f_divergence_type=kind, f_alpha_divergence_coef=alpha) if kind == "alpha_divergence" else {}
    kw = kw or dict(f_divergence_type=kind)
    extra = dict(label_smoothing=EPS) if loss_type == "robust" else {}
    if loss_type == "mallows_dpo":
        extra = dict(ref_chosen_entropy=x["hc"], ref_rejected_entropy=x["hr"], vocab_size=V)
    counts = dict(chosen_num_tokens=x["nc"], rejected_num_tokens=x["nr"])
    out = pyfastpo.preference_loss(c, r, x["rc"], x["rr"], loss_type=loss_type, beta=BETA, **counts, **kw, **extra)
    out.loss.backward()
    c2, r2 = x["c"].clone().requires_grad_(), x["r"].clone().requires_grad_()
    sc, sr = f_prime(kind, c2 - x["rc"], alpha), f_prime(kind, r2 - x["rr"], alpha)
    h = BETA * (sc - sr)
    nc, nr = x["nc"].double(), x["nr"].double()
    want = {
        "sigmoid": lambda: -ls(h),
        "hinge": lambda: torch.relu(1 - h),
        "ipo": lambda: (sc / nc - sr / nr - 1 / (2 * BETA)) ** 2,
        "sigmoid_norm": lambda: -ls(BETA * (sc / nc - sr / nr)),
        "robust": lambda: (-(1 - EPS) * ls(h) + EPS * ls(-h)) / (1 - 2 * EPS),
        "mallows_dpo": lambda: -ls(-torch.log(phi_of(x)) * h),
    }[loss_type]()
    want.mean().backward()
    torch.testing.assert_close(out.losses, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.grad, c2.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(r.grad, r2.grad, rtol=1e-8, atol=1e-12)
    # Rewards stay beta times the log-ratios, as in trl.
    torch.testing.assert_close(out.chosen_rewards, BETA * (x["c"] - x["rc"]))


def test_reverse_kl_and_the_alpha_limit_are_dpo():
    x = batch(4)
    want = pyfastpo.preference_loss(x["c"], x["r"], x["rc"], x["rr"], beta=BETA).losses
    for kw in (
        dict(f_divergence_type="reverse_kl"),
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    ):
        got = pyfastpo.preference_loss(x["c"], x["r"], x["rc"], x["rr"], beta=BETA, **kw).losses
        assert torch.equal(got, want)


def test_f_divergence_options_are_checked():
    x = batch()
    args = (x["c"], x["r"], x["rc"], x["rr"])
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        pyfastpo.preference_loss(*args, f_divergence_type="kl")
    with pytest.raises(ValueError, match=r"\['nca_pair'\] read the log-ratios themselves"):
        pyfastpo.preference_loss(*args, loss_type="nca_pair", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef=0.3 has no effect"):
        pyfastpo.preference_loss(*args, f_divergence_type="js_divergence", f_alpha_divergence_coef=0.3)
    with pytest.raises(ValueError, match="f_alpha_divergence_coef must be a finite number"):
        pyfastpo.preference_loss(*args, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan"))


# The MallowsPO authors' trainer (their dpo_loss and concatenated_forward), restated: every
# log-prob divided by its length when length-normalizing, the reference's taken as 0 when
# reference-free, logit = (lc - lr) - (rc - rr) - home, or with mixing
# (lc - lr) - alpha (rc - rr) - (1 - alpha) home; the SFT term adds -coef * lc.
RELEASE = [
    dict(length_normalize=True, reference_free=True),
    dict(length_normalize=True, home_advantage=0.4, sft_weight=0.5),
    dict(mixing_alpha=0.3, home_advantage=-0.2),
    dict(reference_free=True, mixing_alpha=0.0, home_advantage=0.25, length_normalize=True),
]


@pytest.mark.parametrize("loss_type", ["mallows_dpo", "cauchy", "sigmoid"])
@pytest.mark.parametrize("opts", RELEASE, ids=lambda o: ",".join(o))
def test_mallows_release_options(loss_type, opts):
    x = batch(5)
    nc, nr = x["nc"].double(), x["nr"].double()
    norm = opts.get("length_normalize", False)
    c, r = x["c"].clone().requires_grad_(), x["r"].clone().requires_grad_()
    lc, lr = (c / nc, r / nr) if norm else (c, r)
    rc, rr = (x["rc"] / nc, x["rr"] / nr) if norm else (x["rc"], x["rr"])
    if opts.get("reference_free"):
        rc, rr = rc * 0, rr * 0
    home, alpha = opts.get("home_advantage", 0.0), opts.get("mixing_alpha")
    if alpha is None:
        logits = (lc - lr) - (rc - rr) - home
    else:
        logits = (lc - lr) - alpha * (rc - rr) - (1 - alpha) * home
    theta = -torch.log(phi_of(x))
    want = {
        "mallows_dpo": lambda: (1 - EPS) * -ls(BETA * logits * theta) + EPS * -ls(-BETA * logits * theta),
        "cauchy": lambda: -torch.log(torch.atan(BETA * logits) / math.pi + 0.5),
        "sigmoid": lambda: -ls(BETA * logits),
    }[loss_type]() - opts.get("sft_weight", 0.0) * lc
    want.mean().backward()
    # Reference-free: the reference model only matters through a Mallows loss's entropies.
    with_reference = not opts.get("reference_free") or loss_type == "mallows_dpo"
    out, gc, gr = ours(loss_type, x, with_reference=with_reference, **opts)
    torch.testing.assert_close(out.losses, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gc, c.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gr, r.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, BETA * (lc - rc).detach())


def test_mallows_release_options_are_checked():
    x = batch()
    args = (x["c"], x["r"], x["rc"], x["rr"])
    counts = dict(chosen_num_tokens=x["nc"], rejected_num_tokens=x["nr"])
    with pytest.raises(ValueError, match=r"\['ipo'\] already divide by the token counts"):
        pyfastpo.preference_loss(*args, loss_type="ipo", length_normalize=True, **counts)
    with pytest.raises(ValueError, match=r"\['length_normalize'\] need chosen_num_tokens"):
        pyfastpo.preference_loss(*args, length_normalize=True)
    with pytest.raises(ValueError, match="home_advantage=0.5 has no effect"):
        pyfastpo.preference_loss(*args, loss_type="nca_pair", home_advantage=0.5)
    with pytest.raises(ValueError, match=r"mixing_alpha must be a finite number in \[0, 1\]"):
        pyfastpo.preference_loss(*args, mixing_alpha=1.5)
    with pytest.raises(ValueError, match="use f_divergence_type='reverse_kl'"):
        pyfastpo.preference_loss(*args, home_advantage=0.1, f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="sft_weight must be"):
        pyfastpo.preference_loss(*args, sft_weight=-1)
    with pytest.raises(ValueError, match="reference_free"):
        pyfastpo.preference_loss(*args, reference_free=1)
    with pytest.raises(ValueError, match="pass no reference log-probs"):
        pyfastpo.preference_loss(*args, reference_free=True)
    with pytest.raises(ValueError, match="home_advantage has no effect with mixing_alpha=1"):
        pyfastpo.preference_loss(*args, mixing_alpha=1.0, home_advantage=0.3)


def test_nll_and_bcr_read_the_summed_log_probs_under_length_normalize():
    """length_normalize divides the loss's log-probs; the NLL and BCR terms divide by the
    counts themselves and must not do it twice."""
    c, r = torch.tensor([-20.0]), torch.tensor([-30.0])
    rc, rr = torch.tensor([-15.0]), torch.tensor([-30.0])
    counts = dict(chosen_num_tokens=torch.tensor([10]), rejected_num_tokens=torch.tensor([10]))
    for norm in (False, True):
        out = pyfastpo.preference_loss(
            c, r, rc, rr, nll_weight=1.0, bcr_weight=1.0, bcr_per_token=True, length_normalize=norm, **counts
        )
        assert out.metrics["loss/nll"].item() == pytest.approx(2.0)  # 20 nats over 10 tokens
        assert out.metrics["loss/bcr"].item() == pytest.approx(0.5)  # a 5-nat drop over 10 tokens


def test_cauchy_is_finite_far_out():
    c = torch.tensor([-1e9, -1e4, 0.0, 1e4], requires_grad=True)
    out = pyfastpo.preference_loss(c, torch.zeros(4), loss_type="cauchy", beta=1.0)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(c.grad).all()
    torch.testing.assert_close(
        out.losses[1], -torch.log(torch.atan(torch.tensor(-1e4, dtype=torch.float64)) / math.pi + 0.5).float()
    )
