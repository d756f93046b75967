"""``python -m pyfastpo.bench`` / ``pyfastpo-bench``: argument parsing and the sweep loop.

For each path (logits, linear), size, prompt fraction and contender: one first call checked
against ``reference``, timed runs (fwd, bwd, fwd+bwd), one peak-memory run.
Writes ``results.md``, ``results.json`` and plots to ``--out`` (default
``out/bench/<device>-<YYYY-MM-DD>/``); prints the markdown tables at the end.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import sys
from pathlib import Path

import torch

from . import contenders, environment, measure
from .case import Case
from .data import parse_prompt_fractions, parse_sizes

DEFAULTS = {
    # (device type, quick): (sizes, hidden width, repeats, warmup)
    # --quick on a CPU: one shape, so that each torch.compile'd contender (TRL compiled, Liger,
    # CCE) compiles once (15-40 s each on 2 cores: most of the run); the prompt fractions vary
    # only which labels are ignored, not a shape.
    ("cpu", True): ("4x128x16384", 256, 3, 1),
    ("cpu", False): ("4x64x32000,4x128x32000,4x256x32000,4x128x128256", 512, 5, 1),
    ("cuda", True): ("4x256x32000,4x512x32000,4x512x128256", 1024, 10, 2),
    ("cuda", False): (
        "8x512x128256,8x1024x128256,8x2048x128256,8x4096x128256,8x1024x32000,8x1024x151936,8x1024x262144",
        4096,
        20,
        3,
    ),
}
PROMPT_FRACTIONS = {"cpu": "0,0.25,0.5", "cuda": "0.25"}
"""Default ``--prompt-fractions`` per device type (with or without ``--quick``): the CPU
sweeps put Liger-Kernel (which projects every position) and Cut Cross-Entropy and
pyfastpo (which project only valid ones) side by side at no, a quarter and half prompt."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BENCH_EXTRA = "bench"
"""The pyproject extra (``pip install 'pyfastpo[bench]'``) that provides :data:`EXTRA_MODULES`."""
EXTRA_MODULES = ("tqdm", "matplotlib")  # the progress bar (run); the PNG plots (report.plots)


OUT_ROOT = Path("out/bench")


def default_out(device: str, date: datetime.date | None = None) -> Path:
    """``OUT_ROOT/<device>-<YYYY-MM-DD>``: the ``<what>-<date>/`` naming of
    benchmarks/results/, so a run's folder can be committed there as it is."""
    return OUT_ROOT / f"{device}-{(date or datetime.date.today()).isoformat()}"


def missing_extra() -> str | None:
    """None when every module of the ``bench`` extra imports, else a one-line error naming the extra."""
    missing, first_error = [], None
    for module in EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as err:
            missing.append(module)
            first_error = first_error or contenders.first_line(err)
    if not missing:
        return None
    return (
        f"pyfastpo-bench: error: it needs {' and '.join(missing)}, which cannot be imported here "
        f"({first_error}); install the '{BENCH_EXTRA}' extra: pip install 'pyfastpo[{BENCH_EXTRA}]'"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pyfastpo-bench",
        description="Benchmark pyfastpo's backends against TRL's way (eager and torch.compile), Liger-Kernel and "
        "Cut Cross-Entropy: time, peak memory, bandwidth and correctness against `reference`.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help="one small size (CPU) or a few (GPU) and few repeats: 2-3 minutes on a 2-core CPU, most of it "
        "torch.compile compiling",
    )
    p.add_argument(
        "--out", help=f"directory for results.md, results.json and plots (default: {OUT_ROOT}/<device>-<YYYY-MM-DD>)"
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        metavar="NxTxV[xH]",
        help="sizes to run, comma- or space-separated, e.g. 8x256x32000 (H: the linear path's hidden "
        "width; default --hidden); default: a sweep per device, smaller with --quick",
    )
    p.add_argument("--hidden", type=int, help="hidden width H of the linear path when a size gives none")
    p.add_argument(
        "--prompt-fractions",
        nargs="+",
        metavar="F",
        help="fractions of each row that is prompt (label ignored), each in [0, 1), comma- or space-separated; "
        "every size runs at each (default: "
        + ", ".join(f"{d}: {f}" for d, f in PROMPT_FRACTIONS.items())
        + "); up to a quarter of each row is padding on top",
    )
    p.add_argument(
        "--dtype", choices=list(DTYPES), help="logits / hidden dtype (default: bfloat16 on cuda, float32 on cpu)"
    )
    p.add_argument("--path", choices=["logits", "linear", "both"], default="both")
    p.add_argument(
        "--baselines",
        default="all",
        help=f"comma-separated subset of {','.join(contenders.BASELINE_GROUPS)}, or all / none (default all)",
    )
    p.add_argument(
        "--backends",
        help="comma-separated pyfastpo backends to run (default: all available; "
        "reference always runs: it is the oracle)",
    )
    p.add_argument("--repeats", type=int, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, help="untimed runs before the timed ones")
    p.add_argument(
        "--include-interpreted", action="store_true", help="on a CPU, also run triton under its (very slow) interpreter"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also run each selected pyfastpo backend under torch.compile (time and peak memory against eager)",
    )
    p.add_argument(
        "--wpo",
        action="store_true",
        help="also run each selected pyfastpo backend with WPO's log sum p^2 (logits path): its extra cost",
    )
    p.add_argument(
        "--memory-budget-mib",
        type=int,
        help="the chunk memory budget of pyfastpo's linear path (default: its per-device default)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.out = args.out or str(default_out(args.device))
    sizes, hidden, repeats, warmup = DEFAULTS[(args.device, args.quick)]
    args.hidden = args.hidden or hidden
    try:
        args.size_list = parse_sizes(",".join(args.sizes) if args.sizes else sizes, args.hidden)
    except ValueError as err:
        p.error(f"--sizes: {err}")
    fractions = " ".join(args.prompt_fractions) if args.prompt_fractions else PROMPT_FRACTIONS[args.device]
    try:
        args.fraction_list = parse_prompt_fractions(fractions)
    except ValueError as err:
        p.error(f"--prompt-fractions: {err}")
    args.repeats = args.repeats or repeats
    args.warmup = warmup if args.warmup is None else args.warmup
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.baselines in ("all", "none"):
        args.baseline_set = frozenset(contenders.BASELINE_GROUPS) if args.baselines == "all" else frozenset()
    else:
        args.baseline_set = frozenset(b.strip() for b in args.baselines.split(",") if b.strip())
        unknown = args.baseline_set - set(contenders.BASELINE_GROUPS)
        if unknown:
            p.error(f"--baselines: unknown {sorted(unknown)}; choose from {', '.join(contenders.BASELINE_GROUPS)}")
    args.backend_set = None
    if args.backends:
        args.backend_set = frozenset(b.strip() for b in args.backends.split(",") if b.strip()) | {"reference"}
        unknown = args.backend_set - set(contenders.BACKENDS)
        if unknown:
            p.error(f"--backends: unknown {sorted(unknown)}; choose from {', '.join(contenders.BACKENDS)}")
    if args.memory_budget_mib is not None and args.memory_budget_mib < 1:
        p.error(f"--memory-budget-mib: a positive number of MiB, got {args.memory_budget_mib}")
    return args


def _row(case: Case, contender) -> dict:
    path, size = case.path, case.size
    return {
        "path": path,
        "contender": contender.name,
        "size": size.label(path),
        "n": size.n,
        "t": size.t,
        "v": size.v,
        "h": size.h if path == "linear" else None,
        "prompt_fraction": case.prompt_fraction,
        "valid_tokens": case.valid,
        "status": "ok",
        "error": "",
        "oracle": contender.oracle,
        "note": contender.note,
    }


def measure_contender(case: Case, contender, op, reference, args, device, dtype, copy_bw) -> tuple[dict, tuple]:
    """One contender at one size: its row, and its first call's ``(logps, grad)`` (the
    oracle's result is what the later contenders are checked against)."""
    if reference is None and not contender.oracle:
        raise RuntimeError("the reference (oracle) failed at this size: there is nothing to check against")
    row = _row(case, contender)
    result = case.first_call(op)  # (logps, grad, loss)
    ref = result if contender.oracle else reference
    row.update(
        measure.check(
            case.path,
            dtype,
            result[0],
            result[1],
            ref[0],
            ref[1],
            float32_logps=contender.group == "pyfastpo",
            got_loss=result[2],
            ref_loss=ref[2],
        )
    )
    if not contender.oracle:
        result = None
    prepare, forward, backward = case.callables(op)
    timing = measure.time_fwd_bwd(prepare, forward, backward, device, args.warmup, args.repeats)
    row.update(fwd_ms=timing.fwd_ms, bwd_ms=timing.bwd_ms, total_ms=timing.total_ms, min_total_ms=timing.min_total_ms)
    row["peak_bytes"] = measure.peak_fwd_bwd(prepare, forward, backward, device)
    if case.path == "logits":
        fwd_b, bwd_b = measure.logits_bytes(case.size, case.valid, case.element_size)
        row.update(
            bytes_fwd=fwd_b,
            bytes_bwd=bwd_b,
            throughput_unit="GB/s",
            throughput=(fwd_b + bwd_b) / (timing.total_ms / 1e3) / 1e9,
            throughput_fwd=fwd_b / (timing.fwd_ms / 1e3) / 1e9,
            throughput_bwd=bwd_b / (timing.bwd_ms / 1e3) / 1e9,
        )
        row["copy_fraction"] = row["throughput"] / (copy_bw / 1e9) if copy_bw else None
    else:
        fwd_f, bwd_f = measure.linear_flops(case.size, case.valid)
        row.update(
            flops_fwd=fwd_f,
            flops_bwd=bwd_f,
            throughput_unit="TFLOP/s",
            throughput=(fwd_f + bwd_f) / (timing.total_ms / 1e3) / 1e12,
            copy_fraction=None,
        )
    return row, result


def _ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r.get("baseline") and r["status"] == "ok"), None)
    for r in rows:
        ok = base is not None and r["status"] == "ok"
        r["time_ratio"] = r["total_ms"] / base["total_ms"] if ok else None
        r["mem_ratio"] = r["peak_bytes"] / base["peak_bytes"] if ok and base["peak_bytes"] else None


def run(args, argv=None) -> tuple[dict, list[dict], list[dict]]:
    """The sweep: returns (meta, rows, skipped)."""
    from tqdm.auto import tqdm

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    budget = None if args.memory_budget_mib is None else args.memory_budget_mib << 20
    options = contenders.Options(
        args.baseline_set, args.backend_set, args.include_interpreted, args.compile, args.wpo, budget
    )
    paths = ["logits", "linear"] if args.path == "both" else [args.path]
    meta = environment.describe(device, argv)
    meta.update(
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        paths=paths,
        sizes=[s.label("linear") for s in args.size_list],
        prompt_fractions=args.fraction_list,
        sources={},
    )
    copy_bytes = (1 << 30) if device.type == "cuda" else (64 << 20 if args.quick else 256 << 20)
    copy_bw = measure.copy_bandwidth(device, copy_bytes)
    meta.update(copy_bandwidth_gbs=copy_bw / 1e9, copy_bytes=copy_bytes)

    rows, skipped, runnable = [], [], {}
    for path in paths:
        runnable[path] = []
        for c in (c for c in contenders.registry() if c.path == path):
            try:
                op, source = c.build(device, dtype, options)
            except contenders.Skip as why:
                skipped.append({"path": path, "contender": c.name, "reason": str(why)})
                continue
            except Exception as err:  # a broken install: report it, never drop it
                reason = f"could not be built: {contenders.first_line(err)}"
                skipped.append({"path": path, "contender": c.name, "reason": reason})
                continue
            meta["sources"][c.name] = source
            runnable[path].append((c, op))

    cases = [(size, f) for size in args.size_list for f in args.fraction_list]
    total = sum(len(runnable[p]) for p in paths) * len(cases)
    bar = tqdm(total=total, disable=args.no_progress, file=sys.stderr, dynamic_ncols=True, unit="run")
    for path in paths:
        for size, fraction in cases:
            case = Case(path, size, dtype, device, args.seed, fraction)
            reference, size_rows = None, []
            for c, op in list(runnable[path]):
                bar.set_description(f"{path} {size.label(path)} prompt {fraction:g} {c.name}")
                try:
                    row, result = measure_contender(case, c, op, reference, args, device, dtype, copy_bw)
                    if c.oracle:
                        reference = result
                except Exception as err:  # noqa: BLE001 - one failing contender must not end the sweep
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if c.skip_on_failure and not any(r["contender"] == c.name for r in rows + size_rows):
                        skipped.append(
                            {"path": path, "contender": c.name, "reason": f"failed: {contenders.first_line(err)}"}
                        )
                        runnable[path].remove((c, op))
                        bar.total -= len(cases)
                        bar.refresh()
                        continue
                    row = _row(case, c)
                    row.update(status="error", error=contenders.first_line(err), passed=False)
                row["baseline"] = c.baseline
                size_rows.append(row)
                bar.update(1)
                gc.collect()
            _ratios(size_rows)
            rows += size_rows
            del case, reference
            gc.collect()
    bar.close()
    return meta, rows, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    error = missing_extra()  # before the sweep, not after it (the plots come last)
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.include_interpreted and args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    from . import report

    meta, rows, skipped = run(args, argv)
    out = Path(args.out)
    summary = report.write(out, meta, rows, skipped)
    text = (out / "results.md").read_text()
    print(text.split("## What each contender runs")[0].rstrip())
    print(f"\nskipped: {', '.join(s['contender'] + ' (' + s['path'] + ')' for s in skipped) or 'none'}")
    print(f"checks: {summary['checks']}; wrote {out}/results.md, results.json, {', '.join(summary['plots'])}")
    return 0 if all(r["status"] == "ok" and r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
