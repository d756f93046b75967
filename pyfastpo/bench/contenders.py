"""The contenders: every pyfastpo backend and the ways trainers compute the same thing.

Two paths, each with its own op signature:

- ``logits``: ``op(logits [N,T,V], labels [N,T]) -> logps [N]``, differentiable
  in the logits. The benchmark backpropagates a fixed random ``dL/dlogps``.
- ``linear``: ``op(hidden [N,T,H], weight [V,H], labels) -> (loss, logps [N])``,
  a reference-free sigmoid DPO loss (beta 0.1) from the last hidden states and
  the lm_head; differentiable in ``hidden`` and ``weight``.

A contender's ``build(device, dtype, options)`` returns ``(op, source)`` (source:
the implementation it runs, with versions, for the report) or raises
:class:`Skip` with the reason it cannot run here (library not installed, wrong
device, dtype, not selected); the sweep lists every skipped contender with that
reason rather than dropping it. Heavy imports (trl, liger-kernel,
cut-cross-entropy) happen inside ``build``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyfastpo.backends import BACKENDS, KERNEL_DTYPES, unavailable_reason
from pyfastpo.linear import linear_preference_loss
from pyfastpo.losses import preference_loss
from pyfastpo.sequence_logps import sequence_logps
from pyfastpo.version import __version__

from .data import IGNORE, trl_way_logps
from .environment import dist_version

BETA = 0.1

BASELINE_GROUPS = {
    "trl": "TRL's selective_log_softmax + masked sum, eager (logits path)",
    "compile": "the same under torch.compile (logits path)",
    "logsoftmax": "a full float32 log_softmax + gather (logits path; what pyfastpo.demo compares against)",
    "materialized": "hidden @ W.T, then TRL's way (linear path)",
    "liger": "Liger-Kernel's LigerFusedLinearDPOLoss (linear path)",
    "cce": "Cut Cross-Entropy's linear_cross_entropy(reduction='none') + the DPO loss (linear path; "
    "impl='cce' on a GPU, impl='torch_compile' on a CPU)",
}
"""``--baselines`` names and what each adds (pyfastpo's own backends are always run)."""


class Skip(Exception):
    """Raised by ``Contender.build``: this contender cannot run here; the message says why."""


@dataclass(frozen=True)
class Options:
    """What the command line lets a contender know when it is built."""

    baselines: frozenset
    backends: frozenset | None = None  # None: every backend
    include_interpreted: bool = False
    compile: bool = False  # --compile: also pyfastpo's backends under torch.compile
    wpo: bool = False  # --wpo: also pyfastpo's backends with WPO's log sum p^2 (logits path)
    memory_budget_bytes: int | None = None  # --memory-budget-mib: pyfastpo's linear chunk budget (None: default)


@dataclass(frozen=True)
class Contender:
    name: str
    path: str  # "logits" or "linear"
    group: str  # "pyfastpo" or a key of BASELINE_GROUPS
    description: str
    build: Callable[[torch.device, torch.dtype, Options], tuple[Callable, str]]
    oracle: bool = False  # the ``reference`` every other contender is checked against
    baseline: bool = False  # the denominator of this path's time and memory ratios
    skip_on_failure: bool = False  # a first-call failure (e.g. compile) skips it for the rest of the sweep
    note: str = ""


# ---------------------------------------------------------------- pyfastpo backends


def _check_backend(name: str, device: torch.device, dtype: torch.dtype, options: Options) -> None:
    if options.backends is not None and name not in options.backends:
        raise Skip(f"not selected (--backends {','.join(sorted(options.backends))})")
    if name == "triton" and device.type == "cpu" and not options.include_interpreted:
        raise Skip(
            "on a CPU triton runs only under its interpreter (TRITON_INTERPRET=1), far too slow to "
            "time; pass --include-interpreted to run it anyway"
        )
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise Skip(f"backend unavailable on {device.type}: {reason}")
    if name != "reference" and dtype not in KERNEL_DTYPES:
        raise Skip(f"backend {name!r} takes float32/bfloat16/float16, not {dtype}")


def _compiled(op, source: str, compiled: bool, options: Options):
    """``op`` as is, or (``compiled``) under ``torch.compile`` when ``--compile`` asked for it."""
    if not compiled:
        return op, source
    if not options.compile:
        raise Skip("not selected (pass --compile)")
    return torch.compile(op), f"torch {torch.__version__} torch.compile({source})"


def _pyfastpo_logits(name: str, compiled: bool = False, wpo: bool = False):
    def build(device, dtype, options):
        _check_backend(name, device, dtype, options)
        if wpo and not options.wpo:
            raise Skip("not selected (pass --wpo)")

        def op(logits, labels):
            return sequence_logps(logits, labels, backend=name, return_log_sum_sq=wpo).logps

        extra = ", return_log_sum_sq=True" if wpo else ""
        return _compiled(op, f"pyfastpo {__version__} sequence_logps(backend={name!r}{extra})", compiled, options)

    return build


def _pyfastpo_linear(name: str, compiled: bool = False, single_pass: bool | None = None):
    def build(device, dtype, options):
        _check_backend(name, device, dtype, options)

        budget = options.memory_budget_bytes

        def op(hidden, weight, labels):
            out = linear_preference_loss(
                hidden,
                weight,
                labels,
                loss_type="sigmoid",
                beta=BETA,
                backend=name,
                single_pass=single_pass,
                memory_budget_bytes=budget,
            )
            return out.loss, out.policy.logps

        extra = "" if single_pass is None else f", single_pass={single_pass}"
        extra += "" if budget is None else f", memory_budget_bytes={budget}"
        source = f"pyfastpo {__version__} linear_preference_loss(backend={name!r}{extra})"
        return _compiled(op, source, compiled, options)

    return build


# ---------------------------------------------------------------- TRL's way


def _selective_log_softmax_fallback(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The algorithm of ``trl.trainer.utils.selective_log_softmax`` (trl 1.13), for when trl
    is not installed: float32/64 gathers the target logit and subtracts a per-row
    logsumexp (a Python loop over the batch to bound peak memory); other dtypes
    take a per-row ``log_softmax`` in the input dtype, then gather."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = [torch.log_softmax(r, dim=-1).gather(-1, i.unsqueeze(-1)).squeeze(-1) for r, i in zip(logits, index)]
    return torch.stack(rows)


def _selective_log_softmax():
    """(function, where it came from): trl's own when importable, else the fallback."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception as err:  # trl missing or broken: say so in the report
        return _selective_log_softmax_fallback, f"pyfastpo's restatement (trl not importable: {first_line(err)})"
    import trl

    return selective_log_softmax, f"trl {trl.__version__} trl.trainer.utils.selective_log_softmax"


def _trl_op():
    fn, source = _selective_log_softmax()

    def op(logits, labels):
        valid = labels != IGNORE
        return (fn(logits, torch.where(valid, labels, 0)) * valid).sum(-1)

    return op, source


def _need(group: str, options: Options) -> None:
    if group not in options.baselines:
        raise Skip(f"not selected (--baselines {','.join(sorted(options.baselines)) or 'none'})")


def _build_trl(device, dtype, options):
    _need("trl", options)
    return _trl_op()


def _build_trl_compiled(device, dtype, options):
    _need("compile", options)
    op, source = _trl_op()
    return torch.compile(op), f"torch {torch.__version__} torch.compile({source})"


def _build_logsoftmax(device, dtype, options):
    _need("logsoftmax", options)
    return trl_way_logps, "pyfastpo.bench.data.trl_way_logps: float32 log_softmax + gather + masked sum"


def _build_materialized(device, dtype, options):
    _need("materialized", options)
    logps_of, source = _trl_op()

    def op(hidden, weight, labels):
        logps = logps_of(hidden @ weight.t(), labels)
        return preference_loss(*logps.chunk(2), loss_type="sigmoid", beta=BETA).loss, logps

    return op, f"hidden @ weight.T, then {source}, then pyfastpo.preference_loss"


# ---------------------------------------------------------------- fused-linear libraries


def _import(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise Skip(f"{pip_name} is not installed (pip install {pip_name}): {first_line(err)}") from None


def _build_liger(device, dtype, options):
    _need("liger", options)
    mod = _import("liger_kernel.chunked_loss", "liger-kernel")
    loss_fn = mod.LigerFusedLinearDPOLoss(
        beta=BETA, use_ref_model=False, average_log_prob=False, loss_type="sigmoid", ignore_index=IGNORE
    )

    def op(hidden, weight, labels):
        loss, aux = loss_fn(weight, hidden, labels)  # note Liger's argument order: (lin_weight, _input, target)
        return loss, torch.cat([aux[0], aux[1]])  # policy chosen / rejected summed logps

    return op, f"liger-kernel {dist_version('liger-kernel')} LigerFusedLinearDPOLoss(use_ref_model=False)"


CCE_IMPL = {"cuda": "cce", "cpu": "torch_compile"}
"""Cut Cross-Entropy's ``impl`` per device type: its Triton kernels on a GPU (they need a
CUDA driver), its ``torch.compile`` implementation on a CPU."""


def _build_cce(device, dtype, options):
    _need("cce", options)
    impl = CCE_IMPL.get(device.type)
    if impl is None:
        raise Skip(f"Cut Cross-Entropy has no implementation for {device.type} devices (cuda: cce, cpu: torch_compile)")
    mod = _import("cut_cross_entropy", "cut-cross-entropy")

    def op(hidden, weight, labels):
        nll = mod.linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="none", impl=impl)
        # Per-token losses are 0 at ignored positions. A matrix-vector product, not .sum(-1):
        # sum's backward hands CCE an expanded (stride-0) gradient, which its backward cannot .view().
        nll = nll.float()
        logps = -(nll @ nll.new_ones(nll.shape[-1]))
        return preference_loss(*logps.chunk(2), loss_type="sigmoid", beta=BETA).loss, logps

    return op, (
        f"cut-cross-entropy {dist_version('cut-cross-entropy')} linear_cross_entropy(reduction='none', "
        f"impl={impl!r}), then pyfastpo.preference_loss"
    )


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------- the registry


def _compiled_contender(backend: str, path: str) -> Contender:
    """pyfastpo's ``backend`` on ``path`` under torch.compile (``--compile``): its time and peak
    memory next to eager's (compiled code cannot reuse the logits' storage in the backward)."""
    name, fn = ("pyfastpo", "sequence_logps") if path == "logits" else ("pyfastpo-linear", "linear_preference_loss")
    build = (_pyfastpo_logits if path == "logits" else _pyfastpo_linear)(backend, compiled=True)
    return Contender(
        f"{name}[{backend}]+compile",
        path,
        "pyfastpo",
        f"torch.compile(pyfastpo.{fn}(backend={backend!r}))",
        build,
        skip_on_failure=True,
    )


def registry() -> list[Contender]:
    """Every contender, oracle first on each path, then pyfastpo, then the baselines."""
    backends = ["reference"] + [b for b in BACKENDS if b != "reference"]
    out = []
    for b in backends:
        out.append(
            Contender(
                f"pyfastpo[{b}]",
                "logits",
                "pyfastpo",
                f"pyfastpo.sequence_logps(backend={b!r})",
                _pyfastpo_logits(b),
                oracle=b == "reference",
            )
        )
    out += [_compiled_contender(b, "logits") for b in backends if b != "reference"]
    out += [
        Contender(
            f"pyfastpo[{b}]+wpo",
            "logits",
            "pyfastpo",
            f"pyfastpo.sequence_logps(backend={b!r}, return_log_sum_sq=True): WPO's extra statistic in the same pass",
            _pyfastpo_logits(b, wpo=True),
        )
        for b in backends
        if b != "reference"
    ]
    out += [
        Contender("trl-way", "logits", "trl", BASELINE_GROUPS["trl"], _build_trl, baseline=True),
        Contender(
            "trl-way+compile",
            "logits",
            "compile",
            BASELINE_GROUPS["compile"],
            _build_trl_compiled,
            skip_on_failure=True,
        ),
        Contender("log_softmax+gather", "logits", "logsoftmax", BASELINE_GROUPS["logsoftmax"], _build_logsoftmax),
    ]
    for b in backends:
        # The oracle takes two passes: the automatic mode (one pass where it can) is checked against it.
        out.append(
            Contender(
                f"pyfastpo-linear[{b}]",
                "linear",
                "pyfastpo",
                f"pyfastpo.linear_preference_loss(backend={b!r})"
                + (", two passes" if b == "reference" else ": one pass where every pair fits a chunk, else two"),
                _pyfastpo_linear(b, single_pass=False if b == "reference" else None),
                oracle=b == "reference",
            )
        )
    out += [
        Contender(
            f"pyfastpo-linear[{b}]+two-pass",
            "linear",
            "pyfastpo",
            f"pyfastpo.linear_preference_loss(backend={b!r}, single_pass=False): the two-pass mode, for comparison",
            _pyfastpo_linear(b, single_pass=False),
        )
        for b in backends
        if b != "reference"
    ]
    out += [_compiled_contender(b, "linear") for b in backends if b != "reference"]
    out += [
        Contender(
            "materialized",
            "linear",
            "materialized",
            BASELINE_GROUPS["materialized"],
            _build_materialized,
            baseline=True,
        ),
        Contender(
            "liger",
            "linear",
            "liger",
            BASELINE_GROUPS["liger"],
            _build_liger,
            skip_on_failure=True,
            note="computes the gradients inside its forward (torch.compile'd chunks of one chosen/rejected "
            "pair, every position projected, prompt or not); its bwd is only their hand-off",
        ),
        Contender(
            "cce",
            "linear",
            "cce",
            BASELINE_GROUPS["cce"],
            _build_cce,
            skip_on_failure=True,
            note="on a GPU its Triton kernels, whose default gradient filtering (filter_eps) drops tiny "
            "gradient entries; on a CPU impl='torch_compile': the valid tokens' logits materialized at once "
            "under torch.compile",
        ),
    ]
    return out
